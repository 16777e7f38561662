"""Mamba-2 layers (``M``): the ``in_proj`` output ``[z | x | B | C | dt]`` and conv input ``[x | B | C]``.

Head ``h`` reads B/C group ``h // heads_per_group``. A width keeps the first ``heads_per_group`` heads of
*every* group and the first ``head_dim`` channels of every kept head; B, C, the group count and the state
size are never cut. This module is the only place that layout is written down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import LayerKind, Width, width_fields
from .layout import Dim, Layout, Run

if TYPE_CHECKING:
    from ..config import ModelConfig


# Bytes saved for backward per token, by precision mode ("fp32": fp32 weights; "autocast": fp32 weights under bf16
# autocast; "bf16": bf16 weights, as FSDP2's MixedPrecisionPolicy runs them), as coefficients of the widths. Counted
# with torch.autograd.graph.saved_tensors_hooks on this code, least-squares over 11 Mamba, 7 attention and 4 MLP
# shapes (Mamba and MLP within 5 %, attention 15 %; bench/bench_plan.py).
# Coefficients of d, Di, G·N, H, H·L, Di·N/L; packed documents add (Di, G·N) for the masked conv taps.
SAVED_BYTES = {"fp32": (8.4, 46.1, 53.1, 96.4, 9.5, 12.0), "autocast": (3.7, 40.1, 31.6, 119.5, 5.9, 7.3),
               "bf16": (6.4, 45.2, 38.3, 84.1, 9.9, 14.4)}
DOCUMENT_BYTES = (4.0, 7.0)


@dataclass(frozen=True)
class MambaWidth:
    """Kept prefix of a Mamba-2 layer: heads per group (every group keeps the same count) and
    channels per head (one shared prefix of the head dimension)."""

    heads_per_group: int
    head_dim: int


class MambaKind(LayerKind):
    char, name, width = "M", "mamba", MambaWidth
    module = "mamba2:Mamba2Mixer"
    fields = {"heads_per_group": "mamba_heads", "head_dim": "mamba_head_dim"}
    scores = {"heads_per_group": "head", "head_dim": "channel"}
    uniform_keywords = {"mamba_heads_per_group": "heads_per_group", "mamba_head_dim": "head_dim"}
    prune_grid = {"heads_per_group": "heads", "head_dim": "channels"}

    def full_width(self, config: ModelConfig, k: int) -> MambaWidth:
        return MambaWidth(config.mamba_heads_list()[k] // config.mamba_n_groups, config.mamba_head_dims_list()[k])

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        if not widths:
            return {}
        return {"mamba_num_heads": [w.heads_per_group * config.mamba_n_groups for w in widths],
                "mamba_head_dim": [w.head_dim for w in widths]}

    def _runs(self, config: ModelConfig, full: MambaWidth, w: dict[str, Any]) -> tuple[Run, Run, Run]:
        g = config.mamba_n_groups
        channels = Run(g, full.heads_per_group, full.head_dim, w["heads_per_group"], w["head_dim"],
                       "heads_per_group", "head_dim")
        heads = Run(g, full.heads_per_group, 1, w["heads_per_group"], None, "heads_per_group")
        return channels, heads, Run.fixed(2 * g * config.ssm_state_size)

    def layout(self, config: ModelConfig, full: MambaWidth, width: Width | Mapping[str, Any], hidden: Any) -> Layout:
        channels, heads, bc = self._runs(config, full, width_fields(width))
        hid = Dim.of(Run.prefix(config.hidden_size, hidden, "hidden"))
        in_rows, conv_rows = Dim.of(channels, channels, bc, heads), Dim.of(channels, bc)
        one = Dim.of(Run.fixed(1))
        out: Layout = {
            "in_proj.weight": (in_rows, hid),
            "conv1d.weight": (conv_rows, one, Dim.of(Run.fixed(config.conv_kernel))),
            "dt_bias": (Dim.of(heads),), "A_log": (Dim.of(heads),), "D": (Dim.of(heads),),
            "norm.weight": (Dim.of(channels),),
            "out_proj.weight": (hid, Dim.of(channels)),
        }
        if config.use_bias:
            out["in_proj.bias"], out["out_proj.bias"] = (in_rows,), (hid,)
        if config.use_conv_bias:
            out["conv1d.bias"] = (conv_rows,)
        return out

    def inner(self, config: ModelConfig, full: MambaWidth, width: Width | Mapping[str, Any] | None = None) -> Run:
        return self._runs(config, full, width_fields(width or full))[0]

    def saved_bytes_per_token(self, config: ModelConfig, width: MambaWidth, hidden: int, scan_chunk: int, mode: str,
                              documents: float) -> float:
        g, n = config.mamba_n_groups, config.ssm_state_size
        heads = g * width.heads_per_group
        di = heads * width.head_dim
        c, doc = SAVED_BYTES[mode], DOCUMENT_BYTES
        return (c[0] * hidden + c[1] * di + c[2] * g * n + c[3] * heads + c[4] * heads * scan_chunk
                + c[5] * di * n / scan_chunk + documents * (doc[0] * di + doc[1] * g * n))

    def extra_flops_per_token(self, config: ModelConfig, width: MambaWidth, context: int) -> float:
        """The chunked scan: ``C·Bᵀ`` and the intra-chunk products, and the state updates."""
        heads = config.mamba_n_groups * width.heads_per_group
        di, gn, n = heads * width.head_dim, config.mamba_n_groups * config.ssm_state_size, config.ssm_state_size
        return 2 * config.chunk_size * (gn + di) + 6 * di * n

    def state_bytes(self, config: ModelConfig, width: Width | Mapping[str, Any], *, batch: int, context: int,
                    dtype_bytes: int, state_bytes: int) -> Any:
        """The conv window over ``[x | B | C]`` (``conv_kernel − 1`` steps, model dtype) and the SSM state
        ``[heads, head_dim, state]`` (``state_bytes``, as the decode step keeps it); not growing with context."""
        w = width_fields(width)
        g, n = config.mamba_n_groups, config.ssm_state_size
        d_inner = g * w["heads_per_group"] * w["head_dim"]
        return batch * ((d_inner + 2 * g * n) * (config.conv_kernel - 1) * dtype_bytes + d_inner * n * state_bytes)

    @property
    def state_name(self) -> str:
        return "mamba_state"


MAMBA_KIND = MambaKind()
