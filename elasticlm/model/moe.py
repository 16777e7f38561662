"""Nemotron-H's mixture-of-experts layer, sliceable in routed experts and expert FFN width.

Routing follows transformers' ``NemotronHTopkRouter``: sigmoid scores in fp32, plus a correction bias for the
choice only; with several routing groups the best ``topk_group`` groups (by the sum of their two best scores)
are kept first; the chosen experts' *uncorrected* scores are the weights, normalised when
``moe_norm_topk_prob`` and scaled by ``moe_routed_scaling_factor``. Routed experts and the shared expert are
squared-ReLU MLPs; the routed outputs are summed in fp32, expert by expert in index order (as transformers does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kinds import MOE_KIND, MoeWidth, slice_params


class MoeGate(nn.Module):
    def __init__(self, experts: int, hidden: int, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden, device=device, dtype=dtype))
        # Shifts which experts are chosen, not their weights; learnt outside gradient descent (load balancing).
        self.register_buffer("e_score_correction_bias", torch.zeros(experts, device=device, dtype=torch.float32))


class Experts(nn.Module):
    def __init__(self, experts: int, ffn: int, hidden: int, device: torch.device | str | None,
                 dtype: torch.dtype | None):
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(experts, ffn, hidden, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, ffn, device=device, dtype=dtype))


class SharedExpert(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(bias=config.mlp_bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(config.hidden_size, config.moe_shared_intermediate_size, **kw)
        self.down_proj = nn.Linear(config.moe_shared_intermediate_size, config.hidden_size, **kw)


class MoE(nn.Module):
    observer: Callable[[str, torch.Tensor], None] | None = None  # see Block.observer

    def __init__(self, config: ModelConfig, full: MoeWidth, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config, self.full = config, full  # what the layout of every parameter follows from (kinds/moe.py)
        experts = full.experts_per_group * config.moe_n_group
        self.gate = MoeGate(experts, config.hidden_size, device, dtype)
        self.experts = Experts(experts, full.expert_intermediate_size, config.hidden_size, device, dtype)
        self.shared_experts = SharedExpert(config, device, dtype)

    @torch.no_grad()
    def init_kind_parameters(self) -> None:
        std = self.config.initializer_range
        for p in (self.gate.weight, self.experts.up_proj, self.experts.down_proj):
            nn.init.normal_(p, std=std)
        self.gate.e_score_correction_bias.zero_()

    def sliced(self, hidden: int, width: MoeWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters (and the router's bias buffer) for the sub-model, keyed like its state_dict."""
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return slice_params(tensors, MOE_KIND.layout(self.config, self.full, width, hidden))

    def run(self, x: torch.Tensor, width: MoeWidth, cache: object, layer: int, documents: object,
            inner: torch.Tensor | None, params: dict[str, torch.Tensor] | None, rotary: object = None) -> torch.Tensor:
        """The block's call (no decode state, no document mask: every token is routed on its own)."""
        return self.forward(x, width, inner, params)

    def route(self, h: torch.Tensor, p: dict[str, torch.Tensor], excluded: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts ``[tokens, top_k]`` and their weights (fp32) for ``h`` ``[tokens, hidden]``;
        ``excluded`` [experts] bool: experts no token may choose (a soft mask's zeros)."""
        cfg = self.config
        scores = F.linear(h.float(), p["gate.weight"].float()).sigmoid()
        choice = scores + p["gate.e_score_correction_bias"].float()
        if excluded is not None:
            choice = choice.masked_fill(excluded, float("-inf"))
        n, experts = choice.shape
        groups = cfg.moe_n_group
        if groups > 1:
            group_scores = choice.view(n, groups, experts // groups).topk(2, dim=-1).values.sum(-1)
            best = group_scores.topk(cfg.moe_topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(experts // groups, dim=1), float("-inf"))
        index = choice.topk(cfg.moe_top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, index)
        if cfg.moe_norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return index, weights * cfg.moe_routed_scaling_factor

    def forward(self, x: torch.Tensor, width: MoeWidth, inner: torch.Tensor | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``inner`` ([experts · ffn], soft masks) multiplies every expert's activations; an expert whose mask is
        all zero cannot be chosen, so a one-hot mask is exactly the sliced sub-model."""
        p = params if params is not None else self.sliced(x.shape[-1], width)  # params: sliced() made earlier
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        up, down = p["experts.up_proj"], p["experts.down_proj"]
        experts, ffn = up.shape[0], up.shape[1]
        mask = None if inner is None else inner.reshape(experts, ffn)
        index, weights = self.route(h, p, None if mask is None else mask.amax(-1) == 0)
        out = torch.zeros(h.shape, device=h.device, dtype=weights.dtype)
        record = torch.zeros(h.shape[0], experts, ffn, device=h.device) if self.observer is not None else None
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            act = F.relu(F.linear(h[token], up[e])).square()
            if mask is not None:
                act = act * mask[e]
            w = weights[token, slot, None]
            if record is not None:
                record[token, e] = act.float() * w
            out.index_add_(0, token, (F.linear(act, down[e]) * w).to(out.dtype))
        if record is not None:
            self.observer("experts_in", record.view(*shape[:-1], experts * ffn))
        shared = F.linear(F.relu(F.linear(x, p["shared_experts.up_proj.weight"], p.get("shared_experts.up_proj.bias")))
                          .square(), p["shared_experts.down_proj.weight"], p.get("shared_experts.down_proj.bias"))
        return out.to(x.dtype).view(shape) + shared
