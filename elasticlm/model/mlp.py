"""MLP sliceable in hidden and FFN width: squared-ReLU (Nemotron-H) or gated SiLU (Llama / Qwen, "swiglu")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..int8 import linear, tensors
from ..kinds import MLP_KIND, MlpWidth, slice_params
from .call import PLAIN, MixerCall
from .tap import Tap


class MLP(nn.Module):

    def __init__(self, config: ModelConfig, full: MlpWidth, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config, self.full = config, full  # what the layout of every parameter follows from (kinds/mlp.py)
        self.tap = Tap()  # the FFN activations, before down_proj (importance hooks it)
        kw = dict(bias=config.mlp_bias, device=device, dtype=dtype)
        self.gated = config.mlp_type == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, full.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, full.intermediate_size, **kw)
        self.down_proj = nn.Linear(full.intermediate_size, config.hidden_size, **kw)

    def sliced(self, hidden: int, width: MlpWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters for the sub-model, keyed like its own state_dict (views)."""
        return slice_params(tensors(self), MLP_KIND.layout(self.config, self.full, width, hidden))

    def forward(self, x: torch.Tensor, width: MlpWidth, call: MixerCall = PLAIN) -> torch.Tensor:
        """The block's call (an MLP keeps no state and needs no document mask)."""
        return self.compute(x, width, call.inner, call.params)

    def compute(self, x: torch.Tensor, width: MlpWidth, inner: torch.Tensor | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``inner`` ([ffn] or broadcastable) multiplies the activations before ``down_proj`` (soft masks)."""
        p = params if params is not None else self.sliced(x.shape[-1], width)  # params: sliced() made earlier
        if self.gated:
            h = F.silu(linear(x, p["gate_proj.weight"], p.get("gate_proj.bias"))) * linear(
                x, p["up_proj.weight"], p.get("up_proj.bias"))
        else:
            h = F.relu(linear(x, p["up_proj.weight"], p.get("up_proj.bias"))).square()
        if inner is not None:
            h = h * inner
        if self.tap.watched:
            self.tap(h)
        return linear(h, p["down_proj.weight"], p.get("down_proj.bias"))
