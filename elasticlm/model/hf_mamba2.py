"""Hugging Face Mamba2 (``Mamba2ForCausalLM``) ⇄ elasticlm: config translation.

A Mamba-2 language model is our pattern ``"M" * layers``: its mixer, gated group norm and weight names
(``backbone.layers.i.mixer.*``) are NemotronH's, so its adapter is NemotronH's with Mamba2's config.
Two differences are configuration: transformers' Mamba2 clamps the time step to ``time_step_limit`` (default
``(0, inf)``; NemotronH clamps at ``time_step_min``) and derives the inner width as ``expand × hidden_size``, so a
sub-model exports to Mamba2 only while ``heads × head_dim`` is an integer multiple of its hidden size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..config import MAMBA, ModelConfig
from ..errors import ConfigError
from ..kinds import MAMBA_KIND
from ..kinds.mamba import MambaSection
from . import hf_nemotron_h
from .hf_adapter import same_name
from .hf_fields import Fields


def _number(value: Any) -> float:
    """A float of config.json; transformers ≥ 5 writes infinity as ``{"__float__": "Infinity"}``.

    >>> _number({"__float__": "Infinity"}), _number(0)
    (inf, 0.0)
    """
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mamba2 time_step_limit holds {value!r}, not a number") from None


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Translate a Mamba2 config.json into a ModelConfig."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"mamba2 hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")

    get = Fields(cfg, "mamba2")
    limit = [_number(x) for x in cfg.get("time_step_limit") or (0.0, math.inf)]
    return ModelConfig(
        pattern=MAMBA * get("num_hidden_layers"),
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        norm_eps=float(get("layer_norm_epsilon", default=1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=get.eos(),
        family="mamba2",
        sections={"mamba": MambaSection(  # the same names as Mamba2Config's
            num_heads=get("num_heads"), head_dim=get("head_dim"), n_groups=get("n_groups", default=1),
            state_size=get("state_size"), conv_kernel=get("conv_kernel", default=4),
            chunk_size=get("chunk_size", default=256), time_step_min=float(get("time_step_min", default=1e-3)),
            time_step_max=float(get("time_step_max", default=0.1)), time_step_limit=limit,
            use_bias=bool(cfg.get("use_bias", False)), use_conv_bias=bool(cfg.get("use_conv_bias", True)))},
    )


def incompatibility(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Mamba2 config, or None if it can."""
    if not config.pattern or set(config.pattern) != {MAMBA}:
        return f"its blocks {config.pattern!r} are not all Mamba-2 layers; save it in the native format instead"
    widths = set(zip(MAMBA_KIND.heads(config), MAMBA_KIND.head_dims(config), strict=True))
    if len(widths) > 1:
        return (f"its Mamba layers have different widths (heads, head dim) {sorted(widths)}, and Mamba2Config "
                "holds one; save it in the native format instead")
    heads, head_dim = widths.pop()
    if (heads * head_dim) % config.hidden_size:
        return (f"Mamba2Config derives the inner width as expand × hidden_size, and {heads} × {head_dim} is not a "
                f"multiple of hidden_size {config.hidden_size}; save it in the native format instead")
    return None


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Mamba2 config.json dict (raises ConfigError when the model cannot be one)."""
    reason = incompatibility(config)
    if reason:
        raise ConfigError(f"cannot export to Hugging Face Mamba2: {reason}")
    heads, head_dim = MAMBA_KIND.heads(config)[0], MAMBA_KIND.head_dims(config)[0]
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_heads": heads,
        "head_dim": head_dim,
        "expand": heads * head_dim // config.hidden_size,
        "n_groups": config.mamba.n_groups,
        "state_size": config.mamba.state_size,
        "conv_kernel": config.mamba.conv_kernel,
        "chunk_size": config.mamba.chunk_size,
        "time_step_min": config.mamba.time_step_min,
        "time_step_max": config.mamba.time_step_max,
        "time_step_limit": list(config.mamba.time_step_limit or (config.mamba.time_step_min, math.inf)),
        "hidden_act": "silu",
        "use_bias": config.mamba.use_bias,
        "use_conv_bias": config.mamba.use_conv_bias,
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


# NemotronH's weight names (``backbone.*``, an explicit head), kept ``backbone.*`` in memory too; Mamba2's config
ADAPTER = dataclasses.replace(hf_nemotron_h.ADAPTER, architectures={"mamba2": "Mamba2ForCausalLM"},
                              config_from_hf=config_from_hf, incompatibility=incompatibility,
                              config_to_hf=config_to_hf, in_memory_name=same_name, derived_keys=())
