"""Hugging Face Mistral ⇄ elasticlm: a Llama-shaped transformer whose every attention layer is sliding-window when
``sliding_window`` is set (our ``W`` kind) and full when it is null (``*``).

Its tensors are named as Llama's (:mod:`~elasticlm.model.hf_llama`), it has no biases and no q/k norms, and one
window for every layer: a model that mixes sliding and full layers is a Qwen2 / Qwen3 export (``layer_types``).
vLLM runs it with its window (its Mistral class reads ``sliding_window`` for every layer); llama.cpp's converter
maps it to ``llama``, which has no windows, so ``extract --format gguf`` refuses it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import MLP, ModelConfig
from ..errors import ConfigError
from ..kinds import KINDS, kind_of
from . import hf_llama
from .hf_adapter import HFAdapter
from .hf_fields import Fields

ARCHITECTURES = {"mistral": "MistralForCausalLM"}
SLIDING = KINDS["W"]


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """A Mistral config.json as a ModelConfig: ``W-`` per decoder layer with a window, ``*-`` without."""
    hf_llama.check_decoder(cfg, "mistral")
    get = Fields(cfg, "mistral")
    common = hf_llama.decoder_fields(cfg, get)
    window = cfg.get("sliding_window")
    attention = SLIDING if window is not None else KINDS["*"]
    layers = get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"mistral num_hidden_layers must be a positive int, got {layers!r}")
    return ModelConfig(
        pattern=(attention.char + MLP) * layers,
        **common,
        sections={SLIDING.name: SLIDING.section_from_hf(cfg)} if window is not None else {},
    )


def incompatibility(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be a Mistral config, or None if it can."""
    if config.depth_unit != 2 or set(config.pattern[1::2]) != {MLP}:
        return (f"its blocks {config.pattern!r} are not attention + MLP pairs, and a Mistral decoder layer has both; "
                "save it in the native format instead")
    kinds = {kind_of(c) for c in config.pattern[::2]}
    if len(kinds) > 1:
        return ("its layers mix sliding-window and full attention, and Mistral has one window for every layer; export "
                "it as qwen2 or qwen3 (per-layer layer_types) or in the native format")
    heads, ffn = hf_llama.query_heads(config), config.intermediate_sizes_list()
    if len(set(heads)) > 1 or len(set(ffn)) > 1:
        return (f"its layers have different head counts {heads} or FFN widths {ffn}, and a Mistral config holds one; "
                "save it in the native format instead")
    if config.attention_bias or config.attention_out_bias or config.mlp_bias or config.qk_norm:
        return "Mistral has no attention or MLP biases and no q/k norms"
    if config.mlp_type != "swiglu" or config.rope_parameters is None:
        return "Mistral has rotary positions and a gated SiLU MLP"
    return None


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    reason = incompatibility(config)
    if reason:
        raise ConfigError(f"cannot export to Hugging Face mistral: {reason}")
    out = hf_llama.decoder_config(config, ARCHITECTURES["mistral"], dtype)
    out["sliding_window"] = config.section(SLIDING).window if SLIDING.char in config.pattern else None
    return out


ADAPTER = HFAdapter(ARCHITECTURES, config_from_hf, incompatibility, config_to_hf,
                    lambda name, anchored=False: hf_llama.name_from_hf(name), hf_llama.state_to_hf,
                    derived_keys=("rope_theta", "rope_scaling"))
