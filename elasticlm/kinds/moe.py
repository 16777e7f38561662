"""Mixture-of-experts layers (``E``), as transformers' Nemotron-H defines them: a sigmoid router with a score
correction bias picks ``top_k`` of the routed experts (inside the best ``topk_group`` of ``n_group`` expert
groups), each a squared-ReLU MLP; a shared squared-ReLU expert sees every token.

A width keeps the first ``experts_per_group`` experts of every routing group (the router's rows, its bias and
the experts' weights together: the router of a sub-model chooses among the kept experts only, exactly as the
extracted model's does, because sigmoid scores do not depend on the other experts) and the first
``expert_intermediate_size`` neurons of every kept expert (one neuron order shared by the experts). The shared
expert is never cut.

Worked example — 4 experts in 2 routing groups, expert FFN 3, keeping 1 expert per group and 2 neurons:
``gate.weight`` keeps rows [0, 2]; ``experts.up_proj`` ``[experts, ffn, hidden]`` keeps experts [0, 2] and
rows [0, 1] of each; ``experts.down_proj`` ``[experts, hidden, ffn]`` the same experts and columns [0, 1].

*Active* parameters are what one token uses: the router, the shared expert and ``top_k`` routed experts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import LayerKind, Width, check_values, per_layer, width_fields
from .layout import Dim, Layout, Run, layout_size

if TYPE_CHECKING:
    from ..config import ModelConfig

# Not fitted like the other kinds' coefficients (bench/bench_plan.py has no MoE shapes yet): the router's
# scores, the shared expert's activations as the squared-ReLU MLP's, and top_k routed experts' as many MLPs.
SAVED_BYTES = {"fp32": (12.0, 8.0), "autocast": (10.0, 4.0), "bf16": (10.0, 4.0)}
BUFFERS = ("gate.e_score_correction_bias",)  # in the layout (sliced, permuted, saved) but not a parameter


@dataclass(frozen=True)
class MoeSection:
    """``[model.moe]``: Nemotron-H's mixture of experts (sigmoid router with a correction bias, squared-ReLU experts,
    a shared expert) or Qwen3-MoE's (softmax router, gated SiLU experts, no shared expert). Older configs write
    these as flat ``moe_<field>`` keys, which still load."""

    num_experts: int | list[int] = 8  # routed experts per MoE layer (one per layer where they differ)
    intermediate_size: int | list[int] = 64  # FFN width of each routed expert
    shared_intermediate_size: int = 64  # FFN width of the shared expert (0: none)
    router: str = "sigmoid"  # "sigmoid" (Nemotron-H) | "softmax" (Qwen3-MoE)
    expert_type: str = "relu2"  # "relu2" | "swiglu" (the experts' MLP, as mlp_type)
    top_k: int = 2  # experts each token is routed to
    n_group: int = 1  # routing groups (the router first keeps the best topk_group groups)
    topk_group: int = 1
    norm_topk_prob: bool = True  # the top-k routing weights are normalised to sum to 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class MoeWidth:
    """Kept routed experts per routing group, and kept neurons of every kept expert."""

    experts_per_group: int
    expert_intermediate_size: int


class MoeKind(LayerKind):
    char, name, width = "E", "moe", MoeWidth
    mixes_tokens = False
    module = "moe:MoE"
    section, legacy_prefix = MoeSection, "moe_"
    fields = {"experts_per_group": "moe_experts", "expert_intermediate_size": "moe_ffn"}
    scores = {"experts_per_group": "expert", "expert_intermediate_size": "expert_neuron"}
    uniform_keywords = {"moe_experts_per_group": "experts_per_group",
                        "moe_intermediate_size": "expert_intermediate_size"}
    prune_grid = {"experts_per_group": "heads", "expert_intermediate_size": "channels"}

    def experts(self, config: ModelConfig) -> list[int]:
        """Routed experts of every MoE layer."""
        return per_layer(config.section(self).num_experts, config.count(self.char), "[model.moe] num_experts")

    def expert_ffns(self, config: ModelConfig) -> list[int]:
        """Routed experts' FFN width of every MoE layer."""
        return per_layer(config.section(self).intermediate_size, config.count(self.char),
                         "[model.moe] intermediate_size")

    def check_section(self, config: ModelConfig, section: Any) -> None:
        s = section
        check_values(s, "[model.moe] ", positive=("top_k", "n_group", "topk_group"), finite=("routed_scaling_factor",),
                     flags=("norm_topk_prob",))
        v = s.shared_intermediate_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"[model.moe] shared_intermediate_size must be an int >= 0 (0: no shared expert), "
                              f"got {v!r}")
        if s.router not in ("sigmoid", "softmax"):
            raise ConfigError(f"[model.moe] router must be sigmoid or softmax, got {s.router!r}")
        if s.expert_type not in ("relu2", "swiglu"):
            raise ConfigError(f"[model.moe] expert_type must be relu2 or swiglu, got {s.expert_type!r}")
        if s.router == "softmax" and s.n_group != 1:
            raise ConfigError("[model.moe] routing groups (n_group > 1) go with the sigmoid router only")
        self.expert_ffns(config)
        for i, e in enumerate(self.experts(config)):
            if e % s.n_group or e // s.n_group < self.minimum(config, "experts_per_group"):
                raise ConfigError(f"[model.moe] num_experts={e} (MoE layer {i}) must be a multiple of n_group="
                                  f"{s.n_group} with at least max(2, top_k / groups) experts per group")
        if not s.topk_group <= s.n_group:
            raise ConfigError(f"[model.moe] topk_group={s.topk_group} exceeds n_group={s.n_group}")

    def full_width(self, config: ModelConfig, k: int) -> MoeWidth:
        return MoeWidth(self.experts(config)[k] // config.section(self).n_group, self.expert_ffns(config)[k])

    def minimum(self, config: ModelConfig, field: str) -> int:
        """The router needs ``top_k`` experts to choose from, and two per group to score a group."""
        if field != "experts_per_group":
            return 1
        s = config.section(self)
        return max(math.ceil(s.top_k / s.n_group), 2 if s.n_group > 1 else 1)

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        return {}  # the kind's widths live in its section (sub_section)

    def sub_section(self, config: ModelConfig, widths: list[Width]) -> MoeSection:
        s = config.section(self)
        experts = [w.experts_per_group * s.n_group for w in widths]
        ffns = [w.expert_intermediate_size for w in widths]
        return dataclasses.replace(s, num_experts=experts[0] if len(set(experts)) == 1 else experts,
                                   intermediate_size=ffns[0] if len(set(ffns)) == 1 else ffns)

    def _runs(self, config: ModelConfig, full: MoeWidth, w: dict[str, Any]) -> tuple[Dim, Dim]:
        experts = Dim.of(Run(config.section(self).n_group, full.experts_per_group, 1, w["experts_per_group"], None,
                             "experts_per_group"))
        ffn = Dim.of(Run.prefix(full.expert_intermediate_size, w["expert_intermediate_size"],
                                "expert_intermediate_size"))
        return experts, ffn

    def layout(self, config: ModelConfig, full: MoeWidth, width: Width | Mapping[str, Any], hidden: Any) -> Layout:
        experts, ffn = self._runs(config, full, width_fields(width))
        hid = Dim.of(Run.prefix(config.hidden_size, hidden, "hidden"))
        out: Layout = {"gate.weight": (experts, hid)}
        if config.section(self).router == "sigmoid":
            out["gate.e_score_correction_bias"] = (experts,)
        if config.section(self).expert_type == "swiglu":  # [gate | up] rows of every expert, as transformers' Qwen3-MoE
            out["experts.gate_up_proj"] = (experts, Dim(ffn.runs + ffn.runs), hid)
        else:
            out["experts.up_proj"] = (experts, ffn, hid)
        out["experts.down_proj"] = (experts, hid, ffn)
        if config.section(self).shared_intermediate_size:
            shared = Dim.of(Run.fixed(config.section(self).shared_intermediate_size))
            out["shared_experts.up_proj.weight"], out["shared_experts.down_proj.weight"] = (shared, hid), (hid, shared)
            if config.mlp_bias:
                out["shared_experts.up_proj.bias"], out["shared_experts.down_proj.bias"] = (shared,), (hid,)
        return out

    def inner(self, config: ModelConfig, full: MoeWidth, width: Width | Mapping[str, Any] | None = None) -> Run:
        """The routed experts' activations ``[experts · ffn]``, each scaled by its routing weight (0 where the
        expert was not chosen): importance ranks experts by routing-weighted activation, and a soft mask
        that zeroes an expert also removes it from the router's choice."""
        w = width_fields(width or full)
        return Run(config.section(self).n_group, full.experts_per_group, full.expert_intermediate_size,
                   w["experts_per_group"], w["expert_intermediate_size"], "experts_per_group",
                   "expert_intermediate_size")

    def parameters(self, config: ModelConfig, full: MoeWidth, width: Width | Mapping[str, Any], hidden: Any) -> Any:
        layout = self.layout(config, full, width, hidden)
        return layout_size({k: v for k, v in layout.items() if k not in BUFFERS}) + hidden

    def active_parameters(self, config: ModelConfig, full: MoeWidth, width: Width | Mapping[str, Any],
                          hidden: Any) -> Any:
        """Parameters one token uses: the pre-norm, the router (every kept expert's row), the shared expert and
        ``top_k`` routed experts at the kept width."""
        w = width_fields(width)
        experts = config.section(self).n_group * w["experts_per_group"]
        per_expert = (3 if config.section(self).expert_type == "swiglu" else 2) * hidden * w["expert_intermediate_size"]
        return self.parameters(config, full, width, hidden) - (experts - config.section(self).top_k) * per_expert

    def saved_bytes_per_token(self, config: ModelConfig, width: MoeWidth, hidden: int, scan_chunk: int, mode: str,
                              documents: float) -> float:
        c, s = SAVED_BYTES[mode], config.section(self)
        routed = s.top_k * width.expert_intermediate_size * (2 if s.expert_type == "swiglu" else 1)
        return c[0] * hidden * (1 + s.top_k) + c[1] * (s.shared_intermediate_size + routed)


MOE_KIND = MoeKind()
