"""Hugging Face NemotronH (and Mamba2's weight names) ⇄ elasticlm.

Our parameter names are transformers' in-memory names without the ``model.`` prefix, so the weight map is a
prefix rule. NemotronH checkpoints on disk use ``backbone.*`` (transformers maps it to ``model.*`` in memory);
both are accepted on import and ``backbone.*`` is written. transformers itself is not needed here.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

import torch

from ..config import ATTENTION, LAYER_NAMES, MAMBA, MLP, MOE, ModelConfig
from ..errors import ConfigError
from ..kinds import MAMBA_KIND, MOE_KIND
from .hf_adapter import HFAdapter
from .hf_fields import Fields

if TYPE_CHECKING:
    from .hybrid import HybridLM

log = logging.getLogger(__name__)

_HF_KIND = {"linear_attention": MAMBA, "mamba": MAMBA, "full_attention": ATTENTION, "attention": ATTENTION,
            "mlp": MLP, "moe": MOE}
_HF_PREFIXES = ("backbone.", "model.")

# transformers >= 5.25 asks a hybrid cache's layer 0 for the sequence length, and an MLP or MoE layer holds no
# cache there ('DummyLayer' object has no attribute 'get_seq_length'; docs/engines.md has the upstream report).
# A NemotronH export whose first layer is one of those therefore starts with one extra attention layer whose
# weights are all zero: its output is exactly 0, so the block is exactly the identity, and its KV cache gives
# transformers the length it asks for. The config names it, and our importer drops it again.
CACHE_ANCHOR = "elasticlm_cache_anchor"
_CACHELESS = (MLP, MOE)


def _pattern(cfg: dict[str, Any]) -> str:
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types:
        bad = sorted({t for t in types if t not in _HF_KIND})
        if bad:
            raise ConfigError(f"NemotronH layers_block_type has unsupported layer type(s) {bad}")
        return "".join(_HF_KIND[t] for t in types)
    pattern = cfg.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("NemotronH config has neither layers_block_type nor hybrid_override_pattern")
    return pattern


def _per_kind(value: Any, pattern: str, kind: str, name: str) -> Any:
    """A width that may be one int, a list per layer of ``kind``, or a list over all layers (engines' per-layer
    configs): as ModelConfig takes it (an int, or a list per layer of that kind).

    >>> _per_kind([0, 4, 0, 2], "M*M*", "*", "num_attention_heads"), _per_kind(8, "M*", "*", "x")
    ([4, 2], 8)
    """
    if not isinstance(value, list):
        return value
    layers = [i for i, k in enumerate(pattern) if k == kind]
    if len(value) == len(pattern) and len(layers) != len(pattern):
        value = [value[i] for i in layers]
    if len(value) != len(layers):
        raise ConfigError(f"NemotronH {name} lists {len(value)} values; expected one per layer "
                          f"({len(pattern)}) or one per {kind!r} layer ({len(layers)})")
    return value[0] if value and all(v == value[0] for v in value) else value


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """A NemotronH config.json as a ModelConfig (the cache anchor layer dropped)."""
    for key, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
        if cfg.get(key, want) != want:
            raise ConfigError(f"NemotronH {key}={cfg[key]!r} is not supported (only {want!r})")
    if cfg.get("attention_bias"):
        log.warning("attention_bias=True is ignored, as transformers' NemotronH ignores it")
    if cfg.get("num_nextn_predict_layers"):
        log.warning("multi-token-prediction layers are dropped on import")
    if cfg.get("moe_latent_size") is not None:
        raise ConfigError("NemotronH moe_latent_size (latent expert projections) is not supported")

    get = Fields(cfg, "NemotronH")
    hidden = get("hidden_size")
    pattern = _pattern(cfg)
    if cfg.get(CACHE_ANCHOR) and pattern[:1] == ATTENTION:
        pattern = pattern[1:]
    n_heads = _per_kind(get("num_attention_heads"), pattern, "*", "num_attention_heads")
    sections: dict[str, Any] = {}
    if MAMBA in pattern:
        sections["mamba"] = dict(
            num_heads=get("mamba_num_heads"), head_dim=get("mamba_head_dim"),
            n_groups=get("n_groups", "mamba_n_groups"), state_size=get("ssm_state_size"),
            conv_kernel=get("conv_kernel", "mamba_d_conv", default=4),
            chunk_size=get("chunk_size", "mamba_chunk_size", default=128),
            time_step_min=float(get("time_step_min", "mamba_dt_min", default=1e-3)),
            time_step_max=float(get("time_step_max", "mamba_dt_max", default=0.1)),
            use_bias=bool(cfg.get("use_bias", False)),
            use_conv_bias=bool(get("use_conv_bias", "mamba_conv_bias", default=True)))
    if MOE in pattern:
        sections["moe"] = dict(
            num_experts=_per_kind(get("n_routed_experts", "num_local_experts", default=8), pattern, MOE,
                                  "n_routed_experts"),
            intermediate_size=_per_kind(get("moe_intermediate_size", default=64), pattern, MOE,
                                        "moe_intermediate_size"),
            shared_intermediate_size=get("moe_shared_expert_intermediate_size", default=64),
            top_k=get("num_experts_per_tok", default=2),
            n_group=get("n_group", default=1),
            topk_group=get("topk_group", default=1),
            norm_topk_prob=bool(get("norm_topk_prob", default=True)),
            routed_scaling_factor=float(get("routed_scaling_factor", default=1.0)))
    return ModelConfig(
        pattern=pattern,
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        num_attention_heads=n_heads,
        num_key_value_heads=get("num_key_value_heads", default=n_heads if isinstance(n_heads, int) else None),
        attention_head_dim=get("head_dim", "attention_head_dim",
                               default=hidden // n_heads if isinstance(n_heads, int) else None),
        intermediate_size=_per_kind(get("intermediate_size"), pattern, "-", "intermediate_size"),
        norm_eps=float(get("layer_norm_epsilon", "rms_norm_eps", default=1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=get.eos(),
        sections=sections,
    )


def incompatibility(config: ModelConfig) -> str | None:
    """Why ``config`` (uniform widths per layer kind) cannot be a NemotronH config, or None if it can."""
    other = sorted(LAYER_NAMES[c] for c in set(config.pattern) - {MAMBA, ATTENTION, MLP, MOE})
    if other:
        return f"NemotronH has no {' or '.join(other)} layers"
    limit = config.mamba.time_step_limit
    if limit not in (None, [config.mamba.time_step_min, math.inf]):
        return f"NemotronH clamps the time step at time_step_min; this model clamps it to {limit}"
    if (config.rope_parameters is not None or config.mlp_type != "relu2" or config.qk_norm or config.attention_bias
            or config.attention_out_bias):
        return "NemotronH has no rotary positions, gated MLP, q/k norm or attention biases"
    moe = config.section(MOE_KIND)
    if MOE in config.pattern and ((moe.router, moe.expert_type) != ("sigmoid", "relu2")
                                  or not moe.shared_intermediate_size):
        return "NemotronH's experts are squared-ReLU MLPs behind a sigmoid router, with a shared expert"
    return None


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A NemotronH config.json dict of ``config`` (uniform widths per layer kind)."""

    def first(values: list[int], fallback: int) -> int:
        return values[0] if values else fallback

    heads = first(MAMBA_KIND.heads(config), config.mamba.n_groups)
    head_dim = first(MAMBA_KIND.head_dims(config), 1)
    anchored = needs_cache_anchor(config)
    pattern = ATTENTION + config.pattern if anchored else config.pattern
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        # Only the pattern string, as NVIDIA's configs carry it: transformers converts it to
        # layers_block_type itself, and parsers that derive layers_block_type from it (SGLang's)
        # refuse a config that also sets it.
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern),
        "mamba_num_heads": heads,
        "mamba_head_dim": head_dim,
        "n_groups": config.mamba.n_groups,
        "mamba_n_groups": config.mamba.n_groups,  # the name NVIDIA's configs and SGLang's parser use
        "mamba_d_head": head_dim,  # the name llama.cpp's converter reads
        "ssm_state_size": config.mamba.state_size,
        "conv_kernel": config.mamba.conv_kernel,
        "chunk_size": config.mamba.chunk_size,
        "expand": max(1, heads * head_dim // config.hidden_size),
        "time_step_min": config.mamba.time_step_min,
        "time_step_max": config.mamba.time_step_max,
        "mamba_hidden_act": "silu",
        "use_bias": config.mamba.use_bias,
        "use_conv_bias": config.mamba.use_conv_bias,
        "num_attention_heads": first(config.attention_heads_list(), config.num_key_value_heads),
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.attention_head_dim,
        "attention_bias": False,
        "intermediate_size": first(config.intermediate_sizes_list(), 1),
        "mlp_hidden_act": "relu2",
        "mlp_bias": config.mlp_bias,
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "residual_in_fp32": False,
        "num_logits_to_keep": 1,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        **moe_config(config),
        **({CACHE_ANCHOR: True} if anchored else {}),
    }


def needs_cache_anchor(config: ModelConfig) -> bool:
    """Whether a NemotronH export of ``config`` starts with the no-op attention layer (see ``CACHE_ANCHOR``)."""
    return config.family == "nemotron_h" and config.pattern[:1] in _CACHELESS


def cache_anchor_weights(config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The anchor layer's tensors under our names at layer index 0: all zero but the norm (ones), so the block is
    ``x + 0``."""
    heads = (config.attention_heads_list() or [config.num_key_value_heads])[0]
    d, hd, kv = config.hidden_size, config.attention_head_dim, config.num_key_value_heads
    shapes = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd)}
    out = {f"layers.0.mixer.{n}.weight": torch.zeros(s, dtype=dtype) for n, s in shapes.items()}
    out["layers.0.norm.weight"] = torch.ones(d, dtype=dtype)
    return out


_LAYER = re.compile(r"^layers\.(\d+)\.")


def shift_layers(name: str, by: int) -> str | None:
    """``name`` with its layer index moved by ``by`` (None when it falls below 0: the anchor on import).

    >>> shift_layers("layers.3.mixer.in_proj.weight", 1), shift_layers("layers.0.norm.weight", -1)
    ('layers.4.mixer.in_proj.weight', None)
    >>> shift_layers("embeddings.weight", -1)
    'embeddings.weight'
    """
    m = _LAYER.match(name)
    if m is None:
        return name
    i = int(m.group(1)) + by
    return None if i < 0 else f"layers.{i}." + name[m.end():]


def moe_config(config: ModelConfig) -> dict[str, Any]:
    """NemotronH's mixture-of-experts keys; none for a model without MoE layers (its config stays as before)."""
    if MOE not in config.pattern:
        return {}
    moe = config.section(MOE_KIND)
    return {
        "n_routed_experts": MOE_KIND.experts(config)[0],
        "moe_intermediate_size": MOE_KIND.expert_ffns(config)[0],
        "moe_shared_expert_intermediate_size": moe.shared_intermediate_size,
        "num_experts_per_tok": moe.top_k,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "norm_topk_prob": moe.norm_topk_prob,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "moe_latent_size": None,
    }


def name_from_hf(name: str, anchored: bool = False) -> str | None:
    """Our parameter name for a NemotronH (or Mamba2) checkpoint key (None: a key we drop, e.g. MTP layers, or the
    cache anchor layer of an ``anchored`` export).

    >>> name_from_hf("backbone.layers.3.mixer.in_proj.weight")
    'layers.3.mixer.in_proj.weight'
    >>> name_from_hf("lm_head.weight")
    'lm_head.weight'
    """
    for p in _HF_PREFIXES:
        if name.startswith(p):
            return shift_layers(name[len(p):], -1) if anchored else name[len(p):]
    if name.startswith("mtp."):
        return None
    return name


def name_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else "backbone." + name


def state_to_hf(model: HybridLM) -> dict[str, torch.Tensor]:
    """Our tensors under NemotronH's on-disk names (``backbone.*``; the cache anchor layer first where needed; an
    explicit head even when tied, since transformers' NemotronH reads one)."""
    ours = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if needs_cache_anchor(model.config):
        ours = {shift_layers(k, 1): v for k, v in ours.items()}
        ours.update(cache_anchor_weights(model.config, model.dtype))
    state = {name_to_hf(k): v for k, v in ours.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["backbone.embeddings.weight"].clone()
    return state


def _in_memory_name(name: str) -> str:
    return name.replace("backbone.", "model.", 1)


ADAPTER = HFAdapter({"nemotron_h": "NemotronHForCausalLM"}, config_from_hf, incompatibility, config_to_hf,
                    name_from_hf, state_to_hf, _in_memory_name, derived_keys=("num_hidden_layers",))

__all__ = ["ADAPTER", "CACHE_ANCHOR", "cache_anchor_weights", "config_from_hf", "config_to_hf",
           "incompatibility", "moe_config", "name_from_hf", "name_to_hf", "needs_cache_anchor", "shift_layers",
           "state_to_hf"]
