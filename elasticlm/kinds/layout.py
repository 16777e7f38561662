"""What a width choice keeps of a parameter, written once per layer kind and read by everything else.

A layer kind describes each of its parameters as one :class:`Dim` per tensor dimension; a ``Dim`` is a
concatenation of :class:`Run` s. A ``Run`` is ``groups × per_group units × inner entries``, of which a
sub-model keeps the first ``keep`` units of *every* group and the first ``keep_inner`` entries of every
kept unit. Slicing (views where possible), exact parameter counts (also of *expected* widths), the
index lists of kept entries, permutations for reordering and the router's soft masks all derive from
these descriptions, so a layout such as Mamba's ``[z | x | B | C | dt]`` is written in one place.

Worked example — a Mamba ``in_proj`` with 2 groups × 2 heads × 3 channels, 4 B/C rows and 4 dt rows,
keeping 1 head per group and 2 channels per head::

    heads = Run(groups=2, per_group=2, inner=3, keep=1, keep_inner=2)
    rows  = Dim((heads, heads, Run.fixed(4), Run(2, 2, 1, keep=1)))   # z, x, B|C, dt
    rows.kept_indices()  → [0, 1, 6, 7,   12, 13, 18, 19,   24, 25, 26, 27,   28, 30]
    rows.size()          → 14
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..int8 import Int8Weight


@dataclass(frozen=True)
class Run:
    """``groups × per_group × inner`` consecutive entries (group-major); a sub-model keeps the first
    ``keep`` units of every group and the first ``keep_inner`` entries of every kept unit.

    ``keep`` / ``keep_inner`` may be expectations (floats or tensors) when only :meth:`size` is asked for.

    >>> Run(groups=2, per_group=3, inner=2, keep=2, keep_inner=1).kept_indices()
    [0, 2, 6, 8]
    >>> Run.prefix(5, 3).kept_indices(), Run.fixed(3).kept_indices()
    ([0, 1, 2], [0, 1, 2])
    """

    groups: int
    per_group: int
    inner: int = 1
    keep: Any = None  # None: every unit
    keep_inner: Any = None  # None: every entry of a unit
    unit: str | None = None  # the width field (or "hidden") that orders and cuts the units
    entry: str | None = None  # the width field that orders and cuts the entries of a unit

    @classmethod
    def prefix(cls, full: int, keep: Any, unit: str | None = None) -> Run:
        """The first ``keep`` of ``full`` entries (hidden size, FFN neurons)."""
        return cls(1, full, 1, keep, None, unit)

    @classmethod
    def fixed(cls, size: int) -> Run:
        """Entries no width choice cuts (Mamba's B and C, the KV heads)."""
        return cls(1, 1, size)

    @property
    def full_size(self) -> int:
        return self.groups * self.per_group * self.inner

    @property
    def units(self) -> Any:
        return self.per_group if self.keep is None else self.keep

    @property
    def entries(self) -> Any:
        return self.inner if self.keep_inner is None else self.keep_inner

    @property
    def is_full(self) -> bool:
        return self.units == self.per_group and self.entries == self.inner

    @property
    def prefix_length(self) -> Any:
        """How many leading entries the kept set is, when it is one prefix (whole units of one group, or a
        prefix of its first unit); None otherwise."""
        if self.groups != 1:
            return None
        if self.entries == self.inner:
            return self.units * self.inner
        return self.entries if self.units == 1 else None

    def size(self) -> Any:
        """Kept entries; multilinear in ``keep`` and ``keep_inner``."""
        return self.groups * self.units * self.entries

    def kept_indices(self, offset: int = 0) -> list[int]:
        return [offset + (g * self.per_group + u) * self.inner + c
                for g in range(self.groups) for u in range(int(self.units)) for c in range(int(self.entries))]

    def permutation(self, units: torch.Tensor | None, inner: torch.Tensor | None) -> torch.Tensor:
        """Source index of every entry after reordering: ``units`` [groups, per_group] (or [per_group], shared by
        every group) is the new order of units inside each group, ``inner`` [inner] the new order of the entries
        of every unit; None keeps an order.

        >>> Run(2, 2, 2).permutation(torch.tensor([1, 0]), torch.tensor([1, 0])).tolist()
        [3, 2, 1, 0, 7, 6, 5, 4]
        """
        g, per, n = self.groups, self.per_group, self.inner
        u = torch.arange(per).expand(g, per) if units is None else units.reshape(-1, per).expand(g, per)
        c = torch.arange(n) if inner is None else inner
        base = (torch.arange(g)[:, None] * per + u) * n  # [g, per]
        return (base[..., None] + c).reshape(-1)

    def mask(self, units: torch.Tensor | None, inner: torch.Tensor | None) -> torch.Tensor | None:
        """A soft mask over the run's entries from per-unit and per-entry masks (``[per_group]``, ``[inner]``;
        None: 1): entry ``(g, u, c)`` gets ``units[u] · inner[c]``. The one-hot staircase of a width choice is
        this run's kept set. None when both are None."""
        if units is None and inner is None:
            return None
        ref = units if units is not None else inner
        u = torch.ones(self.per_group, device=ref.device, dtype=ref.dtype) if units is None else units
        c = torch.ones(self.inner, device=ref.device, dtype=ref.dtype) if inner is None else inner
        return (u[:, None] * c[None, :]).expand(self.groups, -1, -1).reshape(-1)


@dataclass(frozen=True)
class Dim:
    """One tensor dimension of a parameter: runs laid end to end."""

    runs: tuple[Run, ...]

    @classmethod
    def of(cls, *runs: Run) -> Dim:
        return cls(tuple(runs))

    def size(self) -> Any:
        total: Any = 0
        for r in self.runs:
            total = total + r.size()
        return total

    @property
    def full_size(self) -> int:
        return sum(r.full_size for r in self.runs)

    def kept_indices(self) -> list[int]:
        out, offset = [], 0
        for r in self.runs:
            out += r.kept_indices(offset)
            offset += r.full_size
        return out

    @property
    def is_view(self) -> bool:
        """True when slicing keeps one prefix (or everything): a view of the full tensor, not a copy."""
        if all(r.is_full for r in self.runs):
            return True
        if len(self.runs) > 1:
            return False
        return self.runs[0].prefix_length is not None

    def slice(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """``w`` with only the kept entries along ``dim``: a view when the kept entries are one prefix (or all)."""
        if len(self.runs) == 1:
            return _slice_run(w, dim, self.runs[0])
        if all(r.is_full for r in self.runs):
            return w
        parts = w.split([r.full_size for r in self.runs], dim=dim)
        return torch.cat([_slice_run(p, dim, r) for p, r in zip(parts, self.runs, strict=True)], dim=dim)


    def permutation(self, orders: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Source index of every entry after reordering by ``orders`` (width field or "hidden" → the new
        order of its units, per group as ``[groups, per_group]`` or shared as ``[per_group]``)."""
        out, offset = [], 0
        for r in self.runs:
            out.append(r.permutation(orders.get(r.unit) if r.unit else None,
                                     orders.get(r.entry) if r.entry else None) + offset)
            offset += r.full_size
        return torch.cat(out)


def _slice_run(w: torch.Tensor, dim: int, r: Run) -> torch.Tensor:
    if r.is_full:
        return w
    if r.prefix_length is not None:  # one prefix: a view
        return w.narrow(dim, 0, r.prefix_length)
    shape = list(w.shape)
    v = w.reshape(shape[:dim] + [r.groups, r.per_group, r.inner] + shape[dim + 1:])
    index = [slice(None)] * v.dim()
    index[dim + 1], index[dim + 2] = slice(0, r.units), slice(0, r.entries)
    return v[tuple(index)].reshape(shape[:dim] + [r.size()] + shape[dim + 1:])


Layout = dict[str, tuple[Dim, ...]]  # parameter name (as in the layer's state_dict) → one Dim per tensor dim


def layout_size(layout: Layout) -> Any:
    """Kept parameters of a layout (exact; the expectation when the widths are expectations)."""
    total: Any = 0
    for dims in layout.values():
        n: Any = 1
        for d in dims:
            n = n * d.size()
        total = total + n
    return total


def slice_params(params: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Every parameter of ``params`` cut to what ``layout`` keeps (views where possible)."""
    out = {}
    for name, dims in layout.items():
        w = params[name]
        if isinstance(w, Int8Weight):  # rows of the scales go with the rows of the weight; columns share a scale
            q, scale = w.q, w.scale
            for axis, d in enumerate(dims):
                q = d.slice(q, axis)
                scale = d.slice(scale, axis) if axis < len(dims) - 1 else scale
            out[name] = Int8Weight(q, scale)
            continue
        for axis, d in enumerate(dims):
            w = d.slice(w, axis)
        out[name] = w
    return out


def kept_indices(layout: Layout) -> dict[str, list[list[int]]]:
    """Per parameter, per dimension, the kept indices of the full tensor (in order)."""
    return {name: [d.kept_indices() for d in dims] for name, dims in layout.items()}


def check_shapes(params: dict[str, torch.Tensor], layout: Layout, where: str) -> None:
    """Raise ValueError unless every parameter has the layout's full shape (a layout must describe its module)."""
    for name, dims in layout.items():
        want: Sequence[int] = tuple(d.full_size for d in dims)
        if name not in params or tuple(params[name].shape) != want:
            got = tuple(params[name].shape) if name in params else None
            raise ValueError(f"{where}: layout says {name} is {want}, the module has {got}")


__all__ = ["Dim", "Layout", "Run", "check_shapes", "kept_indices", "layout_size", "slice_params"]
