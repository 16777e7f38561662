"""Mamba-2 layers (``M``): the ``in_proj`` output ``[z | x | B | C | dt]`` and conv input ``[x | B | C]``.

Head ``h`` reads B/C group ``h // heads_per_group``. A width keeps the first ``heads_per_group`` heads of
*every* group and the first ``head_dim`` channels of every kept head; B, C, the group count and the state
size are never cut. This module is the only place that layout is written down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import LayerKind, Width, check_values, per_layer, width_fields
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
class MambaSection:
    """``[model.mamba]``: the Mamba-2 layers' settings, under transformers' ``Mamba2Config`` names. Older configs
    write them flat (``mamba_num_heads``, ``ssm_state_size``, ``conv_kernel``, …: ``MambaKind.legacy_keys``),
    which still load."""

    num_heads: int | list[int] = 8  # heads per Mamba layer (one per layer where they differ)
    head_dim: int | list[int] = 16  # channels per head
    n_groups: int = 1  # B/C groups; every group holds the same number of heads
    state_size: int = 16
    conv_kernel: int = 4
    chunk_size: int = 64  # the chunked scan's chunk
    time_step_min: float = 1e-3  # softplus(dt) is clamped below at this (as transformers does)
    time_step_max: float = 0.1  # only used to initialise dt_bias
    # the range softplus(dt) is clamped to; None: [time_step_min, inf) (NemotronH). Mamba2 checkpoints carry their
    # own (transformers' default there: [0, inf), no clamp)
    time_step_limit: list[float] | None = None
    use_bias: bool = False  # in_proj / out_proj biases
    use_conv_bias: bool = True


@dataclass(frozen=True)
class MambaWidth:
    """Kept prefix of a Mamba-2 layer: heads per group (every group keeps the same count) and
    channels per head (one shared prefix of the head dimension)."""

    heads_per_group: int
    head_dim: int


class MambaKind(LayerKind):
    char, name, width = "M", "mamba", MambaWidth
    module = "mamba2:Mamba2Mixer"
    section = MambaSection
    legacy_keys = {"mamba_num_heads": "num_heads", "mamba_head_dim": "head_dim", "mamba_n_groups": "n_groups",
                   "ssm_state_size": "state_size", **{k: k for k in ("conv_kernel", "chunk_size", "time_step_min",
                                                                     "time_step_max", "time_step_limit", "use_bias",
                                                                     "use_conv_bias")}}
    fields = {"heads_per_group": "mamba_heads", "head_dim": "mamba_head_dim"}
    scores = {"heads_per_group": "head", "head_dim": "channel"}
    uniform_keywords = {"mamba_heads_per_group": "heads_per_group", "mamba_head_dim": "head_dim"}
    prune_grid = {"heads_per_group": "heads", "head_dim": "channels"}

    def heads(self, config: ModelConfig) -> list[int]:
        """Heads of every Mamba layer."""
        return per_layer(config.mamba.num_heads, config.count(self.char), "[model.mamba] num_heads")

    def head_dims(self, config: ModelConfig) -> list[int]:
        """Channels per head of every Mamba layer."""
        return per_layer(config.mamba.head_dim, config.count(self.char), "[model.mamba] head_dim")

    def check_section(self, config: ModelConfig, section: Any) -> None:
        s = section
        check_values(s, "[model.mamba] ", positive=("n_groups", "state_size", "conv_kernel", "chunk_size"),
                     finite=("time_step_min", "time_step_max"), flags=("use_bias", "use_conv_bias"))
        if not 0 < s.time_step_min <= s.time_step_max:
            raise ConfigError(f"[model.mamba] time_step_min and time_step_max must satisfy 0 < min <= max (dt_bias "
                              f"is initialised on a log scale between them), got {s.time_step_min!r} and "
                              f"{s.time_step_max!r}")
        limit = s.time_step_limit
        if limit is not None and not (isinstance(limit, (list, tuple)) and len(limit) == 2
                                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)
                                      and 0 <= limit[0] < limit[1]):
            raise ConfigError(f"[model.mamba] time_step_limit must be [low, high] with 0 <= low < high, got {limit!r}")
        self.head_dims(config)
        for i, h in enumerate(self.heads(config)):
            if h % s.n_groups:
                raise ConfigError(f"[model.mamba] num_heads={h} (Mamba layer {i}) is not a multiple of n_groups="
                                  f"{s.n_groups}; every group must hold the same number of heads")

    def full_width(self, config: ModelConfig, k: int) -> MambaWidth:
        return MambaWidth(self.heads(config)[k] // config.mamba.n_groups, self.head_dims(config)[k])

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        return {}  # the kind's widths live in its section (sub_section)

    def sub_section(self, config: ModelConfig, widths: list[Width]) -> MambaSection:
        s = config.mamba
        if not widths:
            return s
        heads = [w.heads_per_group * s.n_groups for w in widths]
        dims = [w.head_dim for w in widths]
        return dataclasses.replace(s, num_heads=heads[0] if len(set(heads)) == 1 else heads,
                                   head_dim=dims[0] if len(set(dims)) == 1 else dims)

    def _runs(self, config: ModelConfig, full: MambaWidth, w: dict[str, Any]) -> tuple[Run, Run, Run]:
        g = config.mamba.n_groups
        channels = Run(g, full.heads_per_group, full.head_dim, w["heads_per_group"], w["head_dim"],
                       "heads_per_group", "head_dim")
        heads = Run(g, full.heads_per_group, 1, w["heads_per_group"], None, "heads_per_group")
        return channels, heads, Run.fixed(2 * g * config.mamba.state_size)

    def layout(self, config: ModelConfig, full: MambaWidth, width: Width | Mapping[str, Any], hidden: Any) -> Layout:
        channels, heads, bc = self._runs(config, full, width_fields(width))
        hid = Dim.of(Run.prefix(config.hidden_size, hidden, "hidden"))
        in_rows, conv_rows = Dim.of(channels, channels, bc, heads), Dim.of(channels, bc)
        one = Dim.of(Run.fixed(1))
        out: Layout = {
            "in_proj.weight": (in_rows, hid),
            "conv1d.weight": (conv_rows, one, Dim.of(Run.fixed(config.mamba.conv_kernel))),
            "dt_bias": (Dim.of(heads),), "A_log": (Dim.of(heads),), "D": (Dim.of(heads),),
            "norm.weight": (Dim.of(channels),),
            "out_proj.weight": (hid, Dim.of(channels)),
        }
        if config.mamba.use_bias:
            out["in_proj.bias"], out["out_proj.bias"] = (in_rows,), (hid,)
        if config.mamba.use_conv_bias:
            out["conv1d.bias"] = (conv_rows,)
        return out

    def inner(self, config: ModelConfig, full: MambaWidth, width: Width | Mapping[str, Any] | None = None) -> Run:
        return self._runs(config, full, width_fields(width or full))[0]

    def saved_bytes_per_token(self, config: ModelConfig, width: MambaWidth, hidden: int, scan_chunk: int, mode: str,
                              documents: float) -> float:
        g, n = config.mamba.n_groups, config.mamba.state_size
        heads = g * width.heads_per_group
        di = heads * width.head_dim
        c, doc = SAVED_BYTES[mode], DOCUMENT_BYTES
        return (c[0] * hidden + c[1] * di + c[2] * g * n + c[3] * heads + c[4] * heads * scan_chunk
                + c[5] * di * n / scan_chunk + documents * (doc[0] * di + doc[1] * g * n))

    def extra_flops_per_token(self, config: ModelConfig, width: MambaWidth, context: int) -> float:
        """The chunked scan: ``C·Bᵀ`` and the intra-chunk products, and the state updates."""
        heads = config.mamba.n_groups * width.heads_per_group
        di, gn, n = heads * width.head_dim, config.mamba.n_groups * config.mamba.state_size, config.mamba.state_size
        return 2 * config.mamba.chunk_size * (gn + di) + 6 * di * n

    def state_bytes(self, config: ModelConfig, width: Width | Mapping[str, Any], *, batch: int, context: int,
                    dtype_bytes: int, state_bytes: int) -> Any:
        """The conv window over ``[x | B | C]`` (``conv_kernel − 1`` steps, model dtype) and the SSM state
        ``[heads, head_dim, state]`` (``state_bytes``, as the decode step keeps it); not growing with context."""
        w = width_fields(width)
        g, n = config.mamba.n_groups, config.mamba.state_size
        d_inner = g * w["heads_per_group"] * w["head_dim"]
        window = config.mamba.conv_kernel - 1
        return batch * ((d_inner + 2 * g * n) * window * dtype_bytes + d_inner * n * state_bytes)

    @property
    def state_name(self) -> str:
        return "mamba_state"


MAMBA_KIND = MambaKind()
