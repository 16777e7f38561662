"""Mixture-of-experts layers, sliceable in routed experts and expert FFN width: Nemotron-H's and Qwen3-MoE's.

Sigmoid routing (``[model.moe] router = "sigmoid"``) follows transformers' ``NemotronHTopkRouter``: sigmoid scores in
fp32, plus a correction bias for the choice only; with several routing groups the best ``topk_group`` groups (by
the sum of their two best scores) are kept first; the chosen experts' *uncorrected* scores are the weights,
normalised when ``norm_topk_prob`` and scaled by ``routed_scaling_factor``; the routed outputs are summed
in fp32. Softmax routing (``"softmax"``) follows ``Qwen3MoeTopKRouter``: logits in the model's dtype, softmax in
fp32, the top-k probabilities (normalised when ``norm_topk_prob``) cast back, outputs summed in the model's
dtype. Either way experts are summed one by one in index order, as transformers does. Experts are squared-ReLU
MLPs (Nemotron-H) or gated SiLU ones (Qwen3-MoE, ``[gate | up]`` rows in one ``gate_up_proj``); the shared expert
(Nemotron-H; ``shared_intermediate_size = 0``: none) is a squared-ReLU MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..int8 import linear, tensors
from ..kinds import MOE_KIND, MoeWidth, slice_params
from .call import PLAIN, MixerCall
from .tap import Tap


class MoeGate(nn.Module):
    def __init__(self, experts: int, hidden: int, sigmoid: bool, device: torch.device | str | None,
                 dtype: torch.dtype | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden, device=device, dtype=dtype))
        if sigmoid:  # shifts which experts are chosen, not their weights; learnt outside gradient descent
            self.register_buffer("e_score_correction_bias", torch.zeros(experts, device=device, dtype=torch.float32))


class Experts(nn.Module):
    def __init__(self, experts: int, ffn: int, hidden: int, gated: bool, device: torch.device | str | None,
                 dtype: torch.dtype | None):
        super().__init__()
        rows = 2 * ffn if gated else ffn
        setattr(self, "gate_up_proj" if gated else "up_proj",
                nn.Parameter(torch.empty(experts, rows, hidden, device=device, dtype=dtype)))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, ffn, device=device, dtype=dtype))


class SharedExpert(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(bias=config.mlp_bias, device=device, dtype=dtype)
        shared = config.section(MOE_KIND).shared_intermediate_size
        self.up_proj = nn.Linear(config.hidden_size, shared, **kw)
        self.down_proj = nn.Linear(shared, config.hidden_size, **kw)


class MoE(nn.Module):

    def __init__(self, config: ModelConfig, full: MoeWidth, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config, self.full = config, full  # what the layout of every parameter follows from (kinds/moe.py)
        self.tap = Tap()  # [experts · ffn]: each token's expert activations × routing weight (importance hooks it)
        self.settings = moe = config.section(MOE_KIND)  # [model.moe]
        experts = full.experts_per_group * moe.n_group
        self.sigmoid, self.gated = moe.router == "sigmoid", moe.expert_type == "swiglu"
        self.gate = MoeGate(experts, config.hidden_size, self.sigmoid, device, dtype)
        self.experts = Experts(experts, full.expert_intermediate_size, config.hidden_size, self.gated, device, dtype)
        if moe.shared_intermediate_size:
            self.shared_experts = SharedExpert(config, device, dtype)

    @torch.no_grad()
    def init_kind_parameters(self) -> None:
        std = self.config.initializer_range
        for p in (self.gate.weight, *self.experts.parameters()):
            nn.init.normal_(p, std=std)
        if self.sigmoid:
            self.gate.e_score_correction_bias.zero_()

    def sliced(self, hidden: int, width: MoeWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters (and the router's bias buffer) for the sub-model, keyed like its state_dict."""
        return slice_params(tensors(self), MOE_KIND.layout(self.config, self.full, width, hidden))

    def forward(self, x: torch.Tensor, width: MoeWidth, call: MixerCall = PLAIN) -> torch.Tensor:
        """The block's call (no decode state, no document mask: every token is routed on its own)."""
        return self.compute(x, width, call.inner, call.params)

    def route(self, h: torch.Tensor, p: dict[str, torch.Tensor], excluded: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts ``[tokens, top_k]`` and their weights (fp32) for ``h`` ``[tokens, hidden]``;
        ``excluded`` [experts] bool: experts no token may choose (a soft mask's zeros)."""
        moe = self.settings
        if not self.sigmoid:
            logits = F.linear(h, p["gate.weight"])
            if excluded is not None:
                logits = logits.masked_fill(excluded, float("-inf"))
            top, index = torch.softmax(logits, dim=-1, dtype=torch.float).topk(moe.top_k, dim=-1)
            if moe.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return index, top.to(logits.dtype)
        scores = F.linear(h.float(), p["gate.weight"].float()).sigmoid()
        choice = scores + p["gate.e_score_correction_bias"].float()
        if excluded is not None:
            choice = choice.masked_fill(excluded, float("-inf"))
        n, experts = choice.shape
        groups = moe.n_group
        if groups > 1:
            group_scores = choice.view(n, groups, experts // groups).topk(2, dim=-1).values.sum(-1)
            best = group_scores.topk(moe.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(experts // groups, dim=1), float("-inf"))
        index = choice.topk(moe.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, index)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return index, weights * moe.routed_scaling_factor

    def compute(self, x: torch.Tensor, width: MoeWidth, inner: torch.Tensor | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``inner`` ([experts · ffn], soft masks) multiplies every expert's activations; an expert whose mask is
        all zero cannot be chosen, so a one-hot mask is exactly the sliced sub-model."""
        p = params if params is not None else self.sliced(x.shape[-1], width)  # params: sliced() made earlier
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        up, down = p["experts.gate_up_proj" if self.gated else "experts.up_proj"], p["experts.down_proj"]
        experts, ffn = down.shape[0], down.shape[2]
        mask = None if inner is None else inner.reshape(experts, ffn)
        index, weights = self.route(h, p, None if mask is None else mask.amax(-1) == 0)
        out = torch.zeros(h.shape, device=h.device, dtype=weights.dtype)
        record = torch.zeros(h.shape[0], experts, ffn, device=h.device) if self.tap.watched else None
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            if self.gated:
                gate, value = linear(h[token], up[e]).chunk(2, dim=-1)
                act = F.silu(gate) * value
            else:
                act = F.relu(linear(h[token], up[e])).square()
            if mask is not None:
                act = act * mask[e]
            w = weights[token, slot, None]
            if record is not None:
                record[token, e] = act.float() * w
            out.index_add_(0, token, (linear(act, down[e]) * w).to(out.dtype))
        if record is not None:
            self.tap(record.view(*shape[:-1], experts * ffn))
        out = out.to(x.dtype).view(shape)
        if "shared_experts.up_proj.weight" not in p:
            return out
        shared = linear(F.relu(linear(x, p["shared_experts.up_proj.weight"], p.get("shared_experts.up_proj.bias")))
                          .square(), p["shared_experts.down_proj.weight"], p.get("shared_experts.down_proj.bias"))
        return out + shared
