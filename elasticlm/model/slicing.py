"""Prefix slicing along one weight axis, group-aware, as views (no copies, no masks).

Every nested sub-model keeps a *prefix* of each axis; for grouped axes (Mamba heads inside
their B/C group, query heads inside their KV group) the prefix is taken inside every group.
These helpers do the index arithmetic once, for rows (``dim=0``) or columns (``dim=1``).
"""

from __future__ import annotations

import torch


def grouped_prefix(w: torch.Tensor, dim: int, groups: int, per_group: int, keep: int, inner: int = 1,
                   keep_inner: int | None = None) -> torch.Tensor:
    """Keep the first ``keep`` of ``per_group`` units in each of ``groups`` groups along ``dim``,
    where each unit spans ``inner`` consecutive entries of which the first ``keep_inner`` are kept.

    Worked example — Mamba heads, 2 groups × 3 heads × 2 channels (rows ``g h c``):

        rows = [000 001 010 011 020 021 | 100 101 110 111 120 121]
        grouped_prefix(w, 0, groups=2, per_group=3, keep=2, inner=2, keep_inner=1)
             → rows [000 010 | 100 110]

    With ``keep == per_group`` and ``keep_inner == inner`` the tensor is returned unchanged.
    """
    keep_inner = inner if keep_inner is None else keep_inner
    if keep == per_group and keep_inner == inner:
        return w
    shape = list(w.shape)
    assert shape[dim] == groups * per_group * inner, (shape, dim, groups, per_group, inner)
    split = shape[:dim] + [groups, per_group, inner] + shape[dim + 1:]
    v = w.reshape(split)
    index = [slice(None)] * len(split)
    index[dim + 1] = slice(0, keep)
    index[dim + 2] = slice(0, keep_inner)
    v = v[tuple(index)]
    return v.reshape(shape[:dim] + [groups * keep * keep_inner] + shape[dim + 1:])


def prefix(w: torch.Tensor, dim: int, keep: int) -> torch.Tensor:
    """The first ``keep`` entries along ``dim`` (a view)."""
    return w if w.shape[dim] == keep else w.narrow(dim, 0, keep)
