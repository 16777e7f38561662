"""Prefix views of weights, and the inference-time memo of sliced copies.

What a sub-model keeps of each parameter is its layer kind's layout (:mod:`elasticlm.kinds.layout`), which
slices group-aware prefixes (Mamba heads inside their B/C group, query heads inside their KV group); the
helpers here serve the parts every kind shares (the hidden prefix of norms, embeddings and head).
"""

from __future__ import annotations

import torch
from torch import nn

from ..int8 import Int8Weight
from .serving import decode_layout


def prefix(w: torch.Tensor, dim: int, keep: int) -> torch.Tensor:
    """The first ``keep`` entries along ``dim`` (a view)."""
    return w if w.shape[dim] == keep else w.narrow(dim, 0, keep)


def compact_copies(sliced: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every tensor of ``sliced`` that is not a view of ``params`` its own compact storage,
    in the decoding layout (:func:`~elasticlm.model.serving.decode_layout`).

    A grouped prefix is copied rows of the full width; its column (or row) prefix is then a view of
    that copy. Kept as is, it holds the unused part in memory and streams slower when decoding.
    """
    owned = {p.untyped_storage().data_ptr() for p in params}

    def compact(v: torch.Tensor | Int8Weight) -> torch.Tensor | Int8Weight:
        if isinstance(v, Int8Weight):  # the int8 kernel reads row-contiguous weights (see elasticlm.int8)
            rows = v.q if v.q.dim() == 2 else None
            ready = rows is None or rows.untyped_storage().data_ptr() == v.kernel_rows.untyped_storage().data_ptr()
            return v if ready and v.q.untyped_storage().data_ptr() in owned else v.compact()
        if v.untyped_storage().data_ptr() in owned:
            return v
        c = decode_layout(v)
        if c.untyped_storage().nbytes() > c.numel() * c.element_size():  # a view of a larger copy
            c = decode_layout(c.clone(memory_format=torch.contiguous_format))
        return c

    return {k: compact(v) for k, v in sliced.items()}


class SliceMemo:
    """Inference-time memo of the blocks' sliced weights, owned by whoever runs the model — a
    :class:`~elasticlm.elastic.deployment.Deployment` across requests — never by the model.

    A grouped prefix (kept Mamba heads and head channels inside every group, kept query heads inside
    every KV group) is not one strided view, so slicing it copies; every new generation (every batch a
    server starts) would copy those rows again. Under ``torch.inference_mode`` the compact slices are
    kept per (layer, hidden size, width) and reused while the block's parameters are unchanged (their
    in-place version counters and storages are part of the key, so an optimizer step, ``load_state_dict``
    or a layout change invalidates them). ``clear()`` frees the memory.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.entries: dict[object, dict[str, torch.Tensor]] = {}

    def get(self, key: object, module: nn.Module, make) -> dict[str, torch.Tensor]:
        """``make()`` (the slices of ``module``'s tensors for ``key``), compacted and memoised while they are
        unchanged; outside inference mode (training) simply ``make()``."""
        if not torch.is_inference_mode_enabled():
            return make()
        params = [*module.parameters(), *module.buffers()]
        full_key = (key, tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        hit = self.entries.get(full_key)
        if hit is None:
            for k in [k for k in self.entries if k[0] == key]:  # stale: the weights changed since
                del self.entries[k]
            while len(self.entries) >= self.limit:
                del self.entries[next(iter(self.entries))]
            hit = self.entries[full_key] = compact_copies(make(), params)
        return hit

    def clear(self) -> None:
        self.entries.clear()

    def nbytes(self, owned: set[int] = frozenset()) -> int:
        """Bytes the memo holds beyond the storages in ``owned`` (the parameters' ``data_ptr``s)."""
        seen: set[int] = set()
        total = 0
        for entry in self.entries.values():
            for t in entry.values():
                for part in ((t.q, t.scale) if isinstance(t, Int8Weight) else (t,)):
                    ptr = part.untyped_storage().data_ptr()
                    if ptr not in owned and ptr not in seen:
                        seen.add(ptr)
                        total += part.untyped_storage().nbytes()
        return total
