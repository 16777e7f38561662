"""Grouped-query attention layers (``*``): query head ``j`` reads KV head ``j // heads_per_kv_group``
(transformers' ``repeat_kv`` order), so a width keeps the first ``heads_per_kv_group`` query heads of every
KV group; the KV heads and the head dimension are never cut.

Worked example — 2 KV heads, 3 query heads per KV head, head_dim 2, keeping 2 per group: ``q_proj`` (and its
bias, Qwen2) keeps rows [0, 1, 2, 3, 6, 7, 8, 9] (heads 0, 1, 3, 4) and ``o_proj`` the same columns; ``k_proj``,
``v_proj`` and the per-head q/k norms (Qwen3, one weight of head_dim shared by every head) keep everything."""

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
# Coefficients of d and q (query width); packed documents add 8.9·q (per-document gather / scatter).
SAVED_BYTES = {"fp32": (13.0, 11.2), "autocast": (14.6, 5.6), "bf16": (10.6, 5.6)}
DOCUMENT_BYTES = 8.9


@dataclass(frozen=True)
class AttentionWidth:
    """Kept prefix of query heads inside each KV group; the KV heads themselves are always kept."""

    heads_per_kv_group: int


class AttentionKind(LayerKind):
    char, name, width = "*", "attention", AttentionWidth
    module = "attention:Attention"
    attends, hf_layer_type = True, "full_attention"
    fields = {"heads_per_kv_group": "attention_heads"}
    scores = {"heads_per_kv_group": "head"}
    uniform_keywords = {"attention_heads_per_kv_group": "heads_per_kv_group"}
    prune_grid = {"heads_per_kv_group": "heads"}

    def full_width(self, config: ModelConfig, k: int) -> AttentionWidth:
        return AttentionWidth(config.attention_heads_list()[k] // config.num_key_value_heads)

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        if not widths:
            return {}
        return {"num_attention_heads": [w.heads_per_kv_group * config.num_key_value_heads for w in widths]}

    def inner(self, config: ModelConfig, full: AttentionWidth,
              width: Width | Mapping[str, Any] | None = None) -> Run:
        w = width_fields(width or full)
        return Run(config.num_key_value_heads, full.heads_per_kv_group, config.attention_head_dim,
                   w["heads_per_kv_group"], None, "heads_per_kv_group")

    def layout(self, config: ModelConfig, full: AttentionWidth, width: Width | Mapping[str, Any],
               hidden: Any) -> Layout:
        q = Dim.of(self.inner(config, full, width))
        kv = Dim.of(Run.fixed(config.num_key_value_heads * config.attention_head_dim))
        hid = Dim.of(Run.prefix(config.hidden_size, hidden, "hidden"))
        out: Layout = {"q_proj.weight": (q, hid), "k_proj.weight": (kv, hid), "v_proj.weight": (kv, hid),
                       "o_proj.weight": (hid, q)}
        if config.attention_bias:
            out.update({"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)})
        if config.attention_out_bias:
            out["o_proj.bias"] = (hid,)
        if config.qk_norm:
            head = Dim.of(Run.fixed(config.attention_head_dim))
            out["q_norm.weight"], out["k_norm.weight"] = (head,), (head,)
        return out

    def saved_bytes_per_token(self, config: ModelConfig, width: AttentionWidth, hidden: int, scan_chunk: int,
                              mode: str, documents: float) -> float:
        q = config.num_key_value_heads * width.heads_per_kv_group * config.attention_head_dim
        c = SAVED_BYTES[mode]
        return c[0] * hidden + c[1] * q + documents * DOCUMENT_BYTES * q

    def extra_flops_per_token(self, config: ModelConfig, width: AttentionWidth, context: int) -> float:
        """Scores and their weighted sum over ``context`` keys (causal: half on average)."""
        q = config.num_key_value_heads * width.heads_per_kv_group * config.attention_head_dim
        return 2 * 2 * q * context / 2

    def state_bytes(self, config: ModelConfig, width: Width | Mapping[str, Any], *, batch: int, context: int,
                    dtype_bytes: int, state_bytes: int) -> Any:
        """K and V for ``context`` tokens: every KV head is kept, so no width choice changes it."""
        return 2 * batch * context * config.num_key_value_heads * config.attention_head_dim * dtype_bytes

    @property
    def state_name(self) -> str:
        return "kv_cache"


ATTENTION_KIND = AttentionKind()
