"""Hugging Face Llama, Qwen2, Qwen3 and Qwen3-MoE ⇄ elasticlm: config translation and weight names.

A transformer decoder layer ``i`` is two of our blocks: ``2i`` (attention, its ``input_layernorm`` as the
block's norm) and ``2i + 1`` (the gated MLP, its ``post_attention_layernorm``), so a parent's pattern is
``"*-" * num_hidden_layers`` — ``"*E"`` for a Qwen3-MoE layer whose MLP is sparse (our MoE kind with a softmax
router and gated experts, no shared expert). The dense families differ only in switches our attention already
has:

=======  ====================  ==============  =======
family   q/k/v bias            o_proj bias     q/k norm
=======  ====================  ==============  =======
llama    attention_bias        attention_bias  no
qwen2    always                never           no
qwen3    attention_bias        attention_bias  yes
=======  ====================  ==============  =======
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..config import MLP, MOE, ModelConfig
from ..errors import ConfigError
from ..kinds import KINDS, MOE_KIND, LayerKind, kind_of
from .hf_adapter import HFAdapter
from .hf_fields import Fields

if TYPE_CHECKING:
    from .hybrid import HybridLM

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn|mlp)\.(.+)$")
LAYER_TYPED = ("qwen2", "qwen3")  # the families whose config gives each layer its attention type (layer_types)
_OUTER = {"model.embed_tokens.weight": "embeddings.weight", "model.norm.weight": "norm_f.weight",
          "lm_head.weight": "lm_head.weight"}


def rope_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers ≥ 5 keeps ``rope_parameters``; older configs ``rope_theta`` and ``rope_scaling`` (its type
    under ``type`` or ``rope_type``)."""
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    if "type" in legacy:
        legacy.setdefault("rope_type", legacy.pop("type"))
    rope = {**legacy, **rope}
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", "default")
    return {k: v for k, v in rope.items() if v is not None}


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Translate a Llama / Qwen2 / Qwen3 config.json into a ModelConfig."""
    family = cfg.get("model_type")
    if family not in ARCHITECTURES:
        raise ConfigError(f"model_type {family!r} is not a Llama-family model ({sorted(ARCHITECTURES)})")
    check_decoder(cfg, family)
    get = Fields(cfg, family)
    common = decoder_fields(cfg, get)  # first: a config.json without hidden_size says so
    layers = get("num_hidden_layers")
    bias = bool(cfg.get("attention_bias", False))
    attention = _attention_kinds(cfg, family, layers)
    pattern, moe = "".join(a.char + MLP for a in attention), {}
    if family == "qwen3_moe":
        experts, step = get("num_experts", "num_local_experts"), get("decoder_sparse_step", default=1)
        dense = set(cfg.get("mlp_only_layers") or [])
        sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)]
        pattern = "".join(a.char + (MOE if s else MLP) for a, s in zip(attention, sparse, strict=True))
        moe = {"moe": dict(num_experts=experts, intermediate_size=get("moe_intermediate_size"),
                           top_k=get("num_experts_per_tok"), norm_topk_prob=bool(get("norm_topk_prob", default=False)),
                           router="softmax", expert_type="swiglu", shared_intermediate_size=0)}
    return ModelConfig(
        pattern=pattern,
        **common,
        attention_bias=True if family == "qwen2" else bias,
        attention_out_bias=False if family == "qwen2" else bias,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
        sections={**{k.name: k.section_from_hf(cfg) for k in set(attention) if k.section is not None}, **moe},
    )


def check_decoder(cfg: dict[str, Any], family: str) -> None:
    """What no Llama-shaped family of ours reads: another activation, tensor-parallel slices."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{family} hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"{family} pretraining_tp={cfg['pretraining_tp']} is not supported (only 1)")


def decoder_fields(cfg: dict[str, Any], get: Fields) -> dict[str, Any]:
    """The ModelConfig fields every Llama-shaped family's config.json gives the same way."""
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    return dict(
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads", default=heads),
        attention_head_dim=get("head_dim", default=hidden // heads if isinstance(hidden, int) and heads else None),
        rope_parameters=rope_from_hf(cfg),
        max_position_embeddings=get("max_position_embeddings", default=4096),
        intermediate_size=get("intermediate_size"),
        mlp_type="swiglu",
        norm_eps=float(get("rms_norm_eps", default=1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=get.eos(),
        family=get.family,
    )


def _attention_kinds(cfg: dict[str, Any], family: Any, layers: Any) -> list[LayerKind]:
    """The attention kind of every decoder layer, from ``layer_types`` (or, as transformers derives them for
    Qwen2 / Qwen3, from ``use_sliding_window`` and ``max_window_layers``). Without ``use_sliding_window`` a
    Qwen layer typed sliding attends fully (transformers drops the window), and so do ours."""
    if not isinstance(layers, int):
        return []  # Fields already named the missing or malformed key
    by_type = {k.hf_layer_type: k for k in KINDS.values() if k.hf_layer_type}
    windowed = family in LAYER_TYPED and bool(cfg.get("use_sliding_window")) and cfg.get("sliding_window")
    types = list(cfg.get("layer_types") or [])
    if not types:
        first = cfg.get("max_window_layers", layers) if windowed else layers
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    elif not windowed and family in LAYER_TYPED:
        types = ["full_attention"] * len(types)
    if family not in LAYER_TYPED and set(types) != {"full_attention"}:
        raise ConfigError(f"{family} use_sliding_window / layer_types {sorted(set(types))} are not supported "
                          f"(per-layer attention types: {', '.join(LAYER_TYPED)})")
    unknown = sorted(set(types) - set(by_type))
    if unknown or len(types) != layers:
        raise ConfigError(f"{family} layer_types {unknown or types} are not supported: give one of "
                          f"{sorted(by_type)} per layer ({layers} layers)")
    return [by_type[t] for t in types]


def incompatibility(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as its family's transformers config, or None if it can."""
    family = config.family
    if config.depth_unit != 2 or (MOE in config.pattern and family != "qwen3_moe"):
        return (f"its blocks {config.pattern!r} are not attention + MLP pairs, and a {family} decoder layer has "
                "both (a sub-model that drops one half of a layer); save it in the native format instead")
    for what, values in (("attention head counts", query_heads(config)),
                         ("FFN widths", config.intermediate_sizes_list()),
                         ("expert counts", MOE_KIND.experts(config)),
                         ("expert FFN widths", MOE_KIND.expert_ffns(config))):
        if len(set(values)) > 1:
            return (f"its layers have different {what} {values}, and a {family} config holds one value; "
                    "save it in the native format instead")
    types = _layer_types(config)
    if family not in LAYER_TYPED and set(types) != {"full_attention"}:
        return (f"{family} has only full-attention layers, and this model has {sorted(set(types))}; export it "
                f"as {' or '.join(LAYER_TYPED)} (per-layer attention types) or in the native format")
    heads = query_heads(config)[0]
    if family == "llama" and config.hidden_size % heads:
        return (f"transformers' LlamaConfig requires hidden_size ({config.hidden_size}) to be a multiple of "
                f"num_attention_heads ({heads}); save it in the native format instead")
    want_out = False if family == "qwen2" else config.attention_bias
    if (family == "qwen2" and not config.attention_bias) or config.attention_out_bias != want_out:
        return (f"its attention biases (q/k/v {config.attention_bias}, o {config.attention_out_bias}) differ "
                f"from {family}'s")
    moe = config.section(MOE_KIND)
    if MOE in config.pattern and (moe.router, moe.expert_type, moe.shared_intermediate_size) \
            != ("softmax", "swiglu", 0):
        return f"its mixture of experts is not {family}'s (softmax router, gated experts, no shared expert)"
    if config.qk_norm != (family in ("qwen3", "qwen3_moe")) or config.mlp_type != "swiglu" \
            or config.rope_parameters is None:
        return f"its attention / MLP variant is not {family}'s"
    if config.mlp_bias and family != "llama":
        return f"{family} has no MLP bias"
    return None


def decoder_config(config: ModelConfig, architecture: str, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json keys every Llama-shaped family shares (a config its family's incompatibility accepts)."""
    layers = len(config.pattern) // 2
    rope = dict(config.rope_parameters or {})
    return {
        "architectures": [architecture],
        "model_type": config.family,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": (config.intermediate_sizes_list() or [1])[0],
        "num_hidden_layers": layers,
        "num_attention_heads": query_heads(config)[0],
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.attention_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": rope,
        # the pre-5 names, read by older transformers, vLLM and llama.cpp's converter
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_dropout": 0.0,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A config.json dict for the family's transformers class (raises ConfigError when it cannot be one)."""
    reason = incompatibility(config)
    if reason:
        raise ConfigError(f"cannot export to Hugging Face {config.family}: {reason}")
    family, layers = config.family, len(config.pattern) // 2
    out = decoder_config(config, ARCHITECTURES[family], dtype)
    out["attention_bias"] = config.attention_bias if family != "qwen2" else True
    if family == "llama":
        out["mlp_bias"] = config.mlp_bias
    else:
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": layers})
    if family in LAYER_TYPED and set(_layer_types(config)) != {"full_attention"}:  # else as before: no key
        out["layer_types"] = _layer_types(config)
        for kind in {kind_of(c) for c in config.pattern[::2]}:
            out.update(kind.hf_fields(config))
    if family == "qwen3_moe":
        dense = [j for j in range(layers) if config.pattern[2 * j + 1] == MLP]
        moe = config.section(MOE_KIND)
        out.update({"num_experts": MOE_KIND.experts(config)[0] if MOE in config.pattern else 0,
                    "num_local_experts": MOE_KIND.experts(config)[0] if MOE in config.pattern else 0,
                    "moe_intermediate_size": (MOE_KIND.expert_ffns(config) or [1])[0],
                    "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.norm_topk_prob,
                    "decoder_sparse_step": 1, "mlp_only_layers": dense,
                    "intermediate_size": (config.intermediate_sizes_list() or [out["intermediate_size"]])[0]})
    return out


def query_heads(config: ModelConfig) -> list[int]:
    """Query heads of every attention block, whatever its kind (full or sliding-window)."""
    return [config.layer_widths(i).heads_per_kv_group * config.num_key_value_heads
            for i, c in enumerate(config.pattern) if kind_of(c).attends]


def _layer_types(config: ModelConfig) -> list[str]:
    """Each decoder layer's transformers ``layer_types`` entry (its attention block's kind)."""
    return [kind_of(c).hf_layer_type or c for c in config.pattern[::2]]


def name_from_hf(name: str) -> str | None:
    """Our parameter name for a checkpoint key (None: a key we drop, e.g. a stored rotary table).

    >>> name_from_hf("model.layers.3.mlp.gate_proj.weight"), name_from_hf("model.layers.3.input_layernorm.weight")
    ('layers.7.mixer.gate_proj.weight', 'layers.6.norm.weight')
    """
    if name in _OUTER:
        return _OUTER[name]
    m = _LAYER.match(name)
    if m is None:
        return None if "rotary_emb" in name else name
    layer, part, rest = int(m.group(1)), m.group(2), m.group(3)
    block = 2 * layer + (part in ("post_attention_layernorm", "mlp"))
    return f"layers.{block}.norm.weight" if part.endswith("layernorm") else f"layers.{block}.mixer.{rest}"


def name_to_hf(name: str) -> str:
    """The checkpoint key of one of our parameter names (a model that :func:`incompatibility` accepts).

    >>> name_to_hf("layers.7.mixer.down_proj.weight"), name_to_hf("layers.6.norm.weight")
    ('model.layers.3.mlp.down_proj.weight', 'model.layers.3.input_layernorm.weight')
    """
    outer = {v: k for k, v in _OUTER.items()}
    if name in outer:
        return outer[name]
    _, block, rest = name.split(".", 2)
    layer, is_mlp = divmod(int(block), 2)
    if rest == "norm.weight":
        return f"model.layers.{layer}.{'post_attention_layernorm' if is_mlp else 'input_layernorm'}.weight"
    return f"model.layers.{layer}.{'mlp' if is_mlp else 'self_attn'}.{rest.removeprefix('mixer.')}"


def state_to_hf(model: HybridLM) -> dict[str, torch.Tensor]:
    """Our tensors under the family's on-disk names (no head when tied, as transformers writes them)."""
    return {name_to_hf(k): v.detach().contiguous() for k, v in model.state_dict().items()}


ADAPTER = HFAdapter(ARCHITECTURES, config_from_hf, incompatibility, config_to_hf,
                    lambda name, anchored=False: name_from_hf(name), state_to_hf,
                    derived_keys=("rope_theta", "rope_scaling"))  # transformers 5 reads rope_parameters
