"""Per-layer widths as one width per layer kind, exactly: zero padding for the formats that hold one value.

Hugging Face configs (NemotronH's ``intermediate_size``, Llama's ``num_attention_heads`` …) hold one width per
layer kind, but an elastic budget may keep a different FFN width (or head count) in every layer. Padding each
such layer with zero units up to the widest layer of its kind gives a model of uniform widths that computes
*the same function*:

- an FFN neuron whose ``up_proj`` row (and ``gate_proj`` row) and ``down_proj`` column are zero adds
  ``down[:, j] · act(0) = 0`` (ReLU², SiLU-gated alike; a zero bias keeps it so);
- a query head whose ``q_proj`` rows and ``o_proj`` columns are zero adds ``o_proj[:, head] · attn = 0``; padded
  heads go at the end of every KV group, so each real head still reads its KV head (``repeat_kv`` order);
- a routed expert whose weights are zero and whose score-correction bias is :data:`NEVER_ROUTED` is never among
  the ``top_k`` (sigmoid scores lie in (0, 1)) and so never enters the routing weights; zero neurons inside a
  kept expert add nothing, as in an MLP.

Mamba widths are not padded: the gated RMSNorm averages over every channel of a group, so a zero channel
changes the scale of the others. A softmax router (Qwen3-MoE) is not padded in its expert count: a zero row
still takes a share of the softmax.

The padded units sit exactly where slicing the padded model by the real widths takes its units from (the kinds'
layouts), so :func:`unpad` is :meth:`HybridLM.sliced_state_dict`: pad, then slice, returns every tensor bit for
bit. Export records the real widths under :data:`PADDING_KEY`; the importer restores them.

Worked example — two MLP layers of FFN width 3 and 5 (hidden 2): the padded config has ``intermediate_size = 5``;
layer 0's ``up_proj`` ``[5, 2]`` holds its 3 rows and two zero rows, its ``down_proj`` ``[2, 5]`` two zero
columns; the export's config.json records ``"elasticlm_padding": {"intermediate_size": [3, 5]}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..config import MOE, ModelConfig, Subnet, count_parameters
from ..errors import ConfigError
from ..kinds import MAMBA_KIND, MOE_KIND, kept_indices, kind_of

if TYPE_CHECKING:
    from .hybrid import HybridLM

PADDING_KEY = "elasticlm_padding"
# A score-correction bias that keeps a padded expert out of every top-k: sigmoid scores are in (0, 1) and
# learned biases are O(1). Finite, so that no engine meets inf - inf, and exact in fp16 / bf16 too.
NEVER_ROUTED = -1.0e4

# The widths padding may change, under their names in an export's PADDING_KEY record: each one's per-layer values
# in a config, and the config with other values.
_WIDTHS: dict[str, tuple[Callable[[ModelConfig], list[int]], Callable[[ModelConfig, Any], ModelConfig]]] = {
    "num_attention_heads": (ModelConfig.attention_heads_list,
                            lambda c, v: dataclasses.replace(c, num_attention_heads=v)),
    "intermediate_size": (ModelConfig.intermediate_sizes_list,
                          lambda c, v: dataclasses.replace(c, intermediate_size=v)),
    "moe_num_experts": (MOE_KIND.experts, lambda c, v: c.with_section(MOE_KIND, num_experts=v)),
    "moe_intermediate_size": (MOE_KIND.expert_ffns, lambda c, v: c.with_section(MOE_KIND, intermediate_size=v)),
}


def _replace(config: ModelConfig, widths: dict[str, Any]) -> ModelConfig:
    for name, values in widths.items():
        config = _WIDTHS[name][1](config, values)
    return config


def incompatibility(config: ModelConfig) -> str | None:
    """Why per-layer widths of ``config`` cannot be padded to one width per kind exactly (None: they can)."""
    for what, values in (("Mamba head counts", MAMBA_KIND.heads(config)),
                         ("Mamba head dims", MAMBA_KIND.head_dims(config))):
        if len(set(values)) > 1:
            return (f"its layers have different {what} {values}: zero Mamba channels would change the gated "
                    "RMSNorm of the others, so no padded form is exact; save it in the native or GGUF format")
    experts = MOE_KIND.experts(config)
    if MOE in config.pattern and len(set(experts)) > 1 and config.section(MOE_KIND).router != "sigmoid":
        return (f"its layers have different expert counts {experts}, and a padded expert would still take a share "
                "of the softmax router; save it in the native format")
    return None


def real_widths(config: ModelConfig) -> dict[str, list[int]]:
    """The per-layer widths padding hides, per layer of its kind, for each paddable field whose layers differ: what
    an export's config.json records under :data:`PADDING_KEY` ({} when nothing is padded).

    >>> from elasticlm.config import ModelConfig
    >>> real_widths(ModelConfig(pattern="-*-", vocab_size=8, hidden_size=4, intermediate_size=[3, 5],
    ...             num_attention_heads=2, num_key_value_heads=1, attention_head_dim=2))
    {'intermediate_size': [3, 5]}
    """
    out = {}
    for field, (values_of, _) in _WIDTHS.items():
        values = values_of(config)
        if len(set(values)) > 1:
            out[field] = values
    return out


def padded_config(config: ModelConfig) -> ModelConfig:
    """``config`` with every paddable per-layer width raised to its kind's widest (itself when uniform).
    Raises ConfigError for what :func:`incompatibility` names."""
    reason = incompatibility(config)
    if reason:
        raise ConfigError(f"cannot pad to uniform widths: {reason}")
    widths = real_widths(config)
    return _replace(config, {f: max(v) for f, v in widths.items()})


def real_subnet(config: ModelConfig, padded: ModelConfig) -> Subnet:
    """The Subnet of ``padded`` that is ``config``: every layer at its real width."""
    subnet = Subnet(config.hidden_size, tuple(config.layer_widths(i) for i in range(config.num_layers)))
    subnet.validate(padded)
    return subnet


def padding_note(config: ModelConfig) -> str:
    """What padding costs a Hugging Face export of ``config``: ``""`` when nothing is padded, else e.g.
    ``"; stores 1,100 (+10.0 %, zero padding to uniform widths)"``."""
    if incompatibility(config) or not real_widths(config):
        return ""
    active, stored = count_parameters(config), count_parameters(padded_config(config))
    return f"; stores {stored:,} (+{stored / active - 1:.1%}, zero padding to uniform widths)"


@torch.no_grad()
def pad(model: HybridLM) -> HybridLM:
    """A model of uniform widths that computes exactly what ``model`` computes (``model`` itself when there is
    nothing to pad). The weights are copies."""
    from .hybrid import HybridLM

    config = model.config
    padded = padded_config(config)
    if padded == config:
        return model
    source = model.state_dict()
    ref = source["embeddings.weight"]
    out = HybridLM(padded, device="meta")
    out.to_empty(device=ref.device)
    target = {k: torch.zeros_like(v, dtype=source[k].dtype) for k, v in out.state_dict().items()}
    for key, value in source.items():  # every tensor whose shape padding leaves alone
        if target[key].shape == value.shape:
            target[key] = value.clone()
    for i in range(config.num_layers):
        width, full = config.layer_widths(i), padded.layer_widths(i)
        if width == full:
            continue
        layout = kind_of(config.pattern[i]).layout(padded, full, width, config.hidden_size)
        for name, index in kept_indices(layout).items():
            key = f"layers.{i}.mixer.{name}"
            grid = torch.meshgrid(*[torch.tensor(ix, dtype=torch.long) for ix in index], indexing="ij")
            target[key].zero_()[grid] = source[key]
        if "gate.e_score_correction_bias" in layout:  # a padded expert is never routed to
            bias = target[f"layers.{i}.mixer.gate.e_score_correction_bias"]
            kept = torch.zeros(bias.shape[0], dtype=torch.bool)
            kept[kept_indices({"b": layout["gate.e_score_correction_bias"]})["b"][0]] = True
            bias[~kept] = NEVER_ROUTED
    out.load_state_dict(target, strict=True, assign=True)
    return out.eval()


def unpad(model: HybridLM, config: ModelConfig) -> HybridLM:
    """The model of ``config`` inside a padded ``model`` (what :func:`pad` made of it), as a standalone model."""
    from .hybrid import HybridLM

    if model.config == config:
        return model
    weights = model.sliced_state_dict(real_subnet(config, model.config))
    small = HybridLM(config, device="meta")
    small.load_state_dict({k: v.contiguous() for k, v in weights.items()}, strict=True, assign=True)
    return small.eval()


def apply_record(config: ModelConfig, widths: Any, where: str) -> ModelConfig:
    """The real config of a padded export: ``config`` (as its uniform fields say) with the recorded widths.
    Raises ConfigError for a record that does not fit the config."""
    if not widths:
        return config
    if not isinstance(widths, dict):
        raise ConfigError(f"{where} {PADDING_KEY} must be an object of per-layer width lists")
    fields = {}
    for field, values in widths.items():
        if field not in _WIDTHS:
            raise ConfigError(f"{where} {PADDING_KEY} names {field!r}; expected one of {sorted(_WIDTHS)}")
        stored = _WIDTHS[field][0](config)
        if (not isinstance(values, list) or len(values) != len(stored)
                or not all(isinstance(v, int) and 0 < v <= s for v, s in zip(values, stored, strict=True))):
            raise ConfigError(f"{where} {PADDING_KEY}.{field} must list {len(stored)} widths, each at most "
                              f"the stored {stored[0] if stored else '?'}; got {values!r}")
        fields[field] = values
    return _replace(config, fields)


__all__ = ["NEVER_ROUTED", "PADDING_KEY", "apply_record", "incompatibility", "pad", "padded_config",
           "padding_note", "real_subnet", "real_widths", "unpad"]
