"""Hugging Face ⇄ elasticlm: the registry of family adapters and what every family shares.

One adapter per family (:class:`~elasticlm.model.hf_adapter.HFAdapter`): NemotronH in
:mod:`~elasticlm.model.hf_nemotron_h`, Mamba2 in :mod:`~elasticlm.model.hf_mamba2`, Llama / Qwen2 / Qwen3 /
Qwen3-MoE in :mod:`~elasticlm.model.hf_llama` — the family table ``config.FAMILIES`` names each one's module —
looked up by ``model_type`` (import) or ``ModelConfig.family`` (export). Shared here: per-layer widths
zero-padded to one width per kind (:mod:`~elasticlm.model.padding`),
routed experts one tensor each on disk, tied heads, and the in-memory converters (which need transformers).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from ..config import FAMILIES, MOE, ModelConfig
from ..errors import ConfigError
from ..kinds import MOE_KIND
from . import padding
from .hf_adapter import HFAdapter
from .hf_nemotron_h import CACHE_ANCHOR  # noqa: F401 (re-exported: the loaders read it)

if TYPE_CHECKING:
    from .hybrid import HybridLM

# model_type → its family's adapter, from the family table (config.FAMILIES: a new family is its module and its
# line there)
ADAPTERS: dict[str, HFAdapter] = {name: importlib.import_module(f"{__package__}.{family.adapter}").ADAPTER
                                  for name, family in FAMILIES.items()}
HF_CLASSES = {t: a.architectures[t] for t, a in ADAPTERS.items()}


def adapter(model_type: str) -> HFAdapter:
    """The adapter of a ``model_type`` (= ``ModelConfig.family``)."""
    if model_type not in ADAPTERS:
        raise ConfigError(f"model_type {model_type!r} is not supported; expected one of {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def is_hf_config(config: dict[str, Any]) -> bool:
    """True for a config.json of a family this library imports."""
    return config.get("model_type") in ADAPTERS


def hf_label(family: str) -> str:
    """How messages name a family's Hugging Face format: ``Hugging Face NemotronH`` …"""
    return f"Hugging Face {HF_CLASSES[family].removesuffix('ForCausalLM')}"


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Translate a transformers config.json (NemotronH, Mamba2, Llama, Qwen2, Qwen3) into a ModelConfig: the real
    per-layer widths of an elasticlm export padded to uniform widths (:mod:`elasticlm.model.padding`)."""
    return padding.apply_record(stored_config_from_hf(cfg), cfg.get(padding.PADDING_KEY), "config.json")


def stored_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """The architecture of the tensors a transformers config.json describes (for a padded export: padded)."""
    return adapter(str(cfg.get("model_type"))).config_from_hf(cfg)


def hf_incompatibility(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as its family's Hugging Face config, or None if it can (per-layer widths
    that zero padding expresses exactly count as writable)."""
    reason = padding.incompatibility(config)
    if reason:
        return reason
    return adapter(config.family).incompatibility(padding.padded_config(config))


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The family's config.json dict (raises ConfigError for what it cannot express). Per-layer widths are padded
    to the widest layer of their kind, and the real ones recorded under ``elasticlm_padding``."""
    reason = hf_incompatibility(config)
    if reason:
        raise ConfigError(f"cannot export to {hf_label(config.family)}: {reason}")
    real = padding.real_widths(config)
    stored = padding.padded_config(config)
    out = adapter(stored.family).config_to_hf(stored, dtype)
    if MOE in stored.pattern and (stored.hidden_size % 8 or MOE_KIND.expert_ffns(stored)[0] % 8):
        # transformers' default experts path (grouped_mm) needs 16-byte row strides in every dtype it may be
        # loaded in ("strides should be multiple of 16 bytes"); its eager loop computes the same experts
        out["experts_implementation"] = "eager"
    return {**out, padding.PADDING_KEY: real} if real else out


def name_from_hf(name: str, family: str = "nemotron_h", anchored: bool = False) -> str | None:
    """Our parameter name for a checkpoint key of ``family`` (None: a key we drop).

    >>> name_from_hf("backbone.layers.3.mixer.in_proj.weight")
    'layers.3.mixer.in_proj.weight'
    >>> name_from_hf("model.layers.1.mlp.up_proj.weight", "llama")
    'layers.3.mixer.up_proj.weight'
    """
    return adapter(family).name_from_hf(name, anchored)


def resolve_tied_head(config: ModelConfig, weights: dict[str, torch.Tensor]) -> ModelConfig:
    """transformers' NemotronH never ties its head (its ``_tied_weights_keys`` is empty): with
    ``tie_word_embeddings`` set it still reads ``lm_head.weight``. Keep our model tied only when
    that head equals the embeddings (or is absent); drop the duplicate in that case. (Llama-family
    checkpoints of tied models usually have no ``lm_head.weight``; the same rule holds for them.)"""
    head, emb = weights.get("lm_head.weight"), weights.get("embeddings.weight")
    if not config.tie_word_embeddings or head is None:
        return config
    if emb is not None and head.shape == emb.shape and torch.equal(head, emb):
        del weights["lm_head.weight"]
        return config
    return dataclasses.replace(config, tie_word_embeddings=False)


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face checkpoints on disk hold one tensor per routed expert (``experts.7.up_proj.weight``; Qwen3-MoE
    also ``gate_proj``); our MoE layers (and transformers' in memory) stack them: ``experts.up_proj``
    ``[experts, ffn, hidden]`` or ``experts.gate_up_proj`` ``[experts, 2·ffn, hidden]`` (gate rows first), and
    ``experts.down_proj``. Other tensors pass through; already stacked ones too.

    >>> w = {f"m.experts.{e}.{p}.weight": torch.full((1, 2), float(e)) for e in range(2) for p in ("up_proj",
    ...      "down_proj")}
    >>> {k: tuple(v.shape) for k, v in fuse_experts(w).items()}
    {'m.experts.up_proj': (2, 1, 2), 'm.experts.down_proj': (2, 1, 2)}
    """
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)
    out = {}
    for name, tensor in weights.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name] = tensor
        else:
            experts[m.group(1)][(int(m.group(2)), m.group(3))] = tensor
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        try:
            if any(p == "gate_proj" for _, p in parts):
                out[f"{prefix}.gate_up_proj"] = torch.stack(
                    [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)])
            else:
                out[f"{prefix}.up_proj"] = torch.stack([parts[(e, "up_proj")] for e in range(n)])
            out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
        except KeyError as missing:
            e, part = missing.args[0]
            raise ConfigError(f"the checkpoint has experts 0–{n - 1} under {prefix} but no {part} of expert {e}"
                              ) from None
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fuse_experts`: one tensor per routed expert, as checkpoints on the Hub store them."""
    out = {}
    for name, tensor in state.items():
        prefix, _, part = name.rpartition(".")
        if not prefix.endswith(".experts") or part not in ("up_proj", "gate_up_proj", "down_proj"):
            out[name] = tensor
            continue
        for e in range(tensor.shape[0]):
            if part == "gate_up_proj":
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate.clone(), up.clone()
            else:
                out[f"{prefix}.{e}.{part}.weight"] = tensor[e].clone()
    return out


def hf_state_dict(model: HybridLM, hub_format: bool = True) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the family's on-disk names (NemotronH: an explicit head even when tied, since
    transformers' NemotronH reads one; Llama family: none when tied, as transformers writes them). ``hub_format``:
    routed experts one tensor each, as on the Hub (False: stacked, as transformers holds them in memory)."""
    state = adapter(model.config.family).state_to_hf(padding.pad(model))
    return split_experts(state) if hub_format else state


# -- in-memory converters (need transformers) ------------------------------------------------


def from_transformers(hf_model: Any) -> HybridLM:
    """A HybridLM with the weights of a transformers ``NemotronHForCausalLM`` / ``LlamaForCausalLM`` /
    ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (copied)."""
    from .hybrid import HybridLM

    raw = hf_model.config.to_dict()
    config = config_from_hf(raw)
    weights = {}
    for k, v in hf_model.state_dict().items():
        name = name_from_hf(k, config.family, anchored=bool(raw.get(CACHE_ANCHOR)))
        if name is not None:
            weights[name] = v.detach().clone()
    stored = resolve_tied_head(stored_config_from_hf(raw), weights)
    config = dataclasses.replace(config, tie_word_embeddings=stored.tie_word_embeddings)
    model = HybridLM(stored, device="meta")
    model.load_state_dict(weights, strict=True, assign=True)
    return padding.unpad(model, config)


def to_transformers(model: HybridLM) -> Any:
    """The family's transformers model (``NemotronHForCausalLM``, ``LlamaForCausalLM`` …) with this model's
    weights (per-layer widths zero-padded, see :mod:`elasticlm.model.padding`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = model.dtype
    cfg = config_to_hf(model.config, dtype)
    family = adapter(cfg.pop("model_type"))
    for k in ("architectures", "dtype", *family.derived_keys):
        cfg.pop(k, None)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model.config.family, **cfg)).to(dtype)
    state = {family.in_memory_name(k): v for k, v in hf_state_dict(model, hub_format=False).items()}
    if "lm_head.weight" not in state:  # tied, and not on disk: transformers' state dict still lists the head
        state["lm_head.weight"] = model.embeddings.weight.detach()
    hf.load_state_dict(state, strict=True)
    return hf.eval()
