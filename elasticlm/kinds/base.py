"""The interface every layer kind implements (see :mod:`elasticlm.kinds`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .layout import Layout, Run, layout_size

if TYPE_CHECKING:
    from ..config import ModelConfig

Width = Any  # a frozen dataclass of ints, one per elastic field of the kind (MambaWidth, AttentionWidth, …)


def width_fields(width: Width | Mapping[str, Any]) -> dict[str, Any]:
    """A width as ``{field: value}`` (a Mapping of expected widths passes through)."""
    return dict(width) if isinstance(width, Mapping) else dataclasses.asdict(width)


class LayerKind:
    """A layer kind: pattern character, width type and everything that follows from a width choice.

    ``fields`` maps each width field to its elastic axis name (the ``[elastic]`` table's key and the
    router's axis) and ``scores`` to the importance score key it is ranked by. Layouts describe the
    *mixer's* parameters under their state-dict names (the block's pre-norm is common to every kind).
    """

    char: ClassVar[str]
    name: ClassVar[str]
    width: ClassVar[type]
    fields: ClassVar[dict[str, str]]  # width field → elastic axis
    scores: ClassVar[dict[str, str]]  # width field → importance score key
    uniform_keywords: ClassVar[dict[str, str]]  # Subnet.uniform keyword → width field
    observed: ClassVar[str]  # the observer key of the activation in the inner layout (importance)
    # width field → how `elasticlm prune` searches it: "heads" / "channels" (a grid of fractions, see
    # elastic/prune.py) or "fill" (solved so that the count meets the budget; one field in all kinds at most)
    prune_grid: ClassVar[dict[str, str]]

    # -- config ------------------------------------------------------------------------------
    def full_width(self, config: ModelConfig, k: int) -> Width:
        """The parent's width of the ``k``-th layer of this kind."""
        raise NotImplementedError

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        """The per-kind ModelConfig fields of a model whose layers of this kind have ``widths`` (in order);
        ``{}`` when there are none (the parent's values stay)."""
        raise NotImplementedError

    # -- parameters --------------------------------------------------------------------------
    def layout(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any], hidden: Any) -> Layout:
        """What ``width`` (and hidden size ``hidden``) keeps of each mixer parameter of a layer whose parent
        width is ``full``. Widths may be expectations when only sizes are asked for."""
        raise NotImplementedError

    def inner(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any] | None = None) -> Run:
        """The layout of the activation just before the output projection (soft masks, importance)."""
        raise NotImplementedError

    def parameters(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any], hidden: Any) -> Any:
        """Parameters of one block (pre-norm + mixer); multilinear in the widths."""
        return layout_size(self.layout(config, full, width, hidden)) + hidden

    def active_parameters(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any],
                          hidden: Any) -> Any:
        """Parameters one token uses (all of them, except in a mixture of experts)."""
        return self.parameters(config, full, width, hidden)

    def minimum(self, config: ModelConfig, field: str) -> int:
        """The smallest value width ``field`` may take (1 unless the kind needs more)."""
        return 1

    # -- training plan (elasticlm.train.plan) -------------------------------------------------
    def saved_bytes_per_token(self, config: ModelConfig, width: Width, hidden: int, scan_chunk: int, mode: str,
                              documents: float) -> float:
        """Bytes one block of this kind saves for backward per token, in precision ``mode`` ("fp32",
        "autocast", "bf16"); ``documents`` scales what packed-document masking adds (0: none)."""
        raise NotImplementedError

    def extra_flops_per_token(self, config: ModelConfig, width: Width, context: int) -> float:
        """Forward FLOPs per token beyond the 2·parameters of its matmuls (attention scores, scans)."""
        return 0.0

    # -- deployment memory -------------------------------------------------------------------
    def state_bytes(self, config: ModelConfig, width: Width | Mapping[str, Any], *, batch: int, context: int,
                    dtype_bytes: int, state_bytes: int) -> Any:
        """Inference state of one layer (KV cache, recurrent state) beyond its weights; 0 by default."""
        return 0

    @property
    def state_name(self) -> str | None:
        """The key its state is reported under by :func:`~elasticlm.elastic.space.memory_bytes` (None: none)."""
        return None


__all__ = ["LayerKind", "Width", "width_fields"]
