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


class PackedWeights:
    """Inference-time memo of sliced weights that are copies rather than views.

    A grouped prefix (kept Mamba heads and head channels inside every group, kept query heads inside
    every KV group) is not one strided view, so slicing it copies; decoding would copy those rows at
    every token. Under ``torch.inference_mode`` the copies are kept per (width, hidden size) and
    reused while the parameters are unchanged (their in-place version counters are part of the
    key, so an optimizer step or ``load_state_dict`` invalidates them). Training never uses it.
    ``clear()`` frees the memory.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.enabled = True  # False for sharded models (HybridLM.mark_sharded)
        self.entries: dict[object, dict[str, torch.Tensor]] = {}

    def get(self, key: object, module: nn.Module, make) -> dict[str, torch.Tensor]:
        """``make()`` (the slices of ``module``'s tensors for ``key``), memoised while they are unchanged."""
        if not (self.enabled and torch.is_inference_mode_enabled()):
            return make()
        params = [*module.parameters(), *module.buffers()]
        full_key = (key, tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        hit = self.entries.get(full_key)
        if hit is None:
            stale = [k for k in self.entries if k[0] == key]
            for k in stale:
                del self.entries[k]
            while len(self.entries) >= self.limit:
                del self.entries[next(iter(self.entries))]
            hit = self.entries[full_key] = compact_copies(make(), params)
        return hit

    def clear(self) -> None:
        self.entries.clear()

    def nbytes(self) -> int:
        return sum(t.nbytes() if isinstance(t, Int8Weight) else t.numel() * t.element_size()
                   for e in self.entries.values() for t in e.values())
