"""One spec per layer kind: its width type, its config fields, its parameters' layouts, its state memory.

Everything that depends on a layer's kind — building and slicing its mixer, exact and expected parameter
counts, deployment memory, the router's soft masks, importance scores and reordering — asks the kind's
:class:`~elasticlm.kinds.base.LayerKind` in :data:`KINDS` instead of branching on the pattern character.
A new kind is one module here and one entry below (plus its ``nn.Module`` in :mod:`elasticlm.model`).
"""

from __future__ import annotations

from .attention import ATTENTION_KIND, AttentionWidth
from .base import LayerKind, Width, width_fields
from .layout import Dim, Layout, Run, kept_indices, layout_size, slice_params
from .mamba import MAMBA_KIND, MambaWidth
from .mlp import MLP_KIND, MlpWidth
from .moe import MOE_KIND, MoeWidth
from .sliding_attention import SLIDING_ATTENTION_KIND, SlidingAttentionWidth

KINDS: dict[str, LayerKind] = {k.char: k for k in (MAMBA_KIND, ATTENTION_KIND, MLP_KIND, MOE_KIND,
                                                   SLIDING_ATTENTION_KIND)}


def kind_of(char: str) -> LayerKind:
    """The spec of pattern character ``char`` (KeyError names the known ones)."""
    try:
        return KINDS[char]
    except KeyError:
        raise KeyError(f"unknown layer kind {char!r}; known: {sorted(KINDS)}") from None


def kind_of_width(width: object) -> LayerKind:
    for k in KINDS.values():
        if isinstance(width, k.width):
            return k
    raise TypeError(f"{width!r} is not a layer width")


__all__ = ["ATTENTION_KIND", "KINDS", "MAMBA_KIND", "MLP_KIND", "MOE_KIND", "SLIDING_ATTENTION_KIND", "AttentionWidth",
           "Dim", "LayerKind", "Layout", "MambaWidth", "MlpWidth", "MoeWidth", "Run", "SlidingAttentionWidth", "Width",
           "kept_indices", "kind_of", "kind_of_width", "layout_size", "slice_params", "width_fields"]
