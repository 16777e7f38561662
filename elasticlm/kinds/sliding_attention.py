"""Sliding-window attention layers (``W``): grouped-query attention in which a query sees only the last ``window``
positions, itself included — Mistral's layers, Gemma's and Qwen2/3's ``sliding_attention`` layers between full ones.

The parameters and everything a width choice does to them are full attention's (``kinds/attention.py``): a width
keeps the first ``heads_per_kv_group`` query heads of every KV group, and both kinds share the elastic axis
``attention_heads``. What the window changes is the cost of a token: a layer keeps at most ``window - 1`` past keys
and values (its decode state stops growing), and a query scores at most ``window`` keys.

Its settings are a section of the model config (TOML ``[model.sliding_attention]``)::

    window = 4096        # keys a query sees, itself included (transformers' sliding_window)
    num_heads = 8        # query heads per sliding layer (an int, or one per sliding layer); default:
                         # num_attention_heads

Worked example — window 3: the query at position 5 sees keys 3, 4, 5; after 10 tokens the layer holds the keys of
positions 8 and 9 (what the next query, at 10, needs besides its own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .attention import AttentionKind
from .base import Width, per_layer

if TYPE_CHECKING:
    from ..config import ModelConfig


@dataclass(frozen=True)
class SlidingAttentionWidth:
    """Kept prefix of query heads inside each KV group (as full attention's)."""

    heads_per_kv_group: int


@dataclass(frozen=True)
class SlidingAttentionSection:
    window: int = 4096
    num_heads: int | list[int] | None = None  # per sliding layer; None: the model's num_attention_heads (an int)


def mean_keys(context: float, window: int) -> float:
    """Keys a query scores on average over ``context`` causal positions when it sees at most ``window`` of them.

    >>> mean_keys(4, 8), mean_keys(8, 2)  # (1+2+3+4)/4; (1+2+2+2+2+2+2+2)/8
    (2.5, 1.875)
    """
    if context <= window:
        return (context + 1) / 2
    return window - window * (window - 1) / (2 * context)


class SlidingAttentionKind(AttentionKind):
    char, name, width = "W", "sliding_attention", SlidingAttentionWidth
    module = "sliding_attention:SlidingAttention"
    hf_layer_type = "sliding_attention"
    section = SlidingAttentionSection

    def heads(self, config: ModelConfig) -> list[int]:
        """Query heads of every sliding layer."""
        section = config.section(self)
        count = config.count(self.char)
        value = section.num_heads if section.num_heads is not None else config.num_attention_heads
        where = "[model.sliding_attention] num_heads" if section.num_heads is not None else (
            "num_attention_heads (sliding layers take it when [model.sliding_attention] gives no num_heads)")
        return per_layer(value, count, where)

    def check_section(self, config: ModelConfig, section: Any) -> None:
        w = section.window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"[model.sliding_attention] window must be a positive int, got {w!r}")
        for i, h in enumerate(self.heads(config)):
            if h % config.num_key_value_heads:
                raise ConfigError(f"sliding attention layer {i} has {h} query heads, not a multiple of "
                                  f"num_key_value_heads={config.num_key_value_heads}")

    def full_width(self, config: ModelConfig, k: int) -> SlidingAttentionWidth:
        return SlidingAttentionWidth(self.heads(config)[k] // config.num_key_value_heads)

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        return {}  # the kind's widths live in its section (sub_section)

    def sub_section(self, config: ModelConfig, widths: list[Width]) -> SlidingAttentionSection:
        heads = [w.heads_per_kv_group * config.num_key_value_heads for w in widths]
        return dataclasses.replace(config.section(self),
                                   num_heads=heads[0] if len(set(heads)) == 1 else heads)

    def extra_flops_per_token(self, config: ModelConfig, width: Any, context: int) -> float:
        q = config.num_key_value_heads * width.heads_per_kv_group * config.attention_head_dim
        return 2 * 2 * q * mean_keys(context, config.section(self).window)

    def state_bytes(self, config: ModelConfig, width: Width | Mapping[str, Any], *, batch: int, context: int,
                    dtype_bytes: int, state_bytes: int) -> Any:
        """K and V of the last ``window - 1`` positions: what the next query reads besides its own."""
        keys = min(context, config.section(self).window - 1)
        return 2 * batch * keys * config.num_key_value_heads * config.attention_head_dim * dtype_bytes

    def hf_fields(self, config: ModelConfig) -> dict[str, Any]:
        """transformers reads ``layer_types``; ``max_window_layers`` (the first sliding decoder layer) is for
        readers that only know the older rule "sliding from layer max_window_layers on" — vLLM 0.32 among them,
        which then refuses a model whose layers are not all alike instead of attending fully in every layer."""
        first = next(j for j, c in enumerate(config.pattern[::2]) if c == self.char)
        return {"use_sliding_window": True, "sliding_window": config.section(self).window,
                "max_window_layers": first}

    def section_from_hf(self, cfg: dict[str, Any]) -> SlidingAttentionSection:
        return SlidingAttentionSection(window=cfg.get("sliding_window"))


SLIDING_ATTENTION_KIND = SlidingAttentionKind()
