"""Squared-ReLU MLP (not gated), sliceable in hidden and FFN width."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MlpWidth
from .slicing import prefix


class MLP(nn.Module):
    observer: Callable[[str, torch.Tensor], None] | None = None  # see Block.observer

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype)

    def sliced(self, hidden: int, width: MlpWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters for the sub-model, keyed like its own state_dict (views)."""
        f = width.intermediate_size
        out = {
            "up_proj.weight": prefix(prefix(self.up_proj.weight, 0, f), 1, hidden),
            "down_proj.weight": prefix(prefix(self.down_proj.weight, 0, hidden), 1, f),
        }
        if self.up_proj.bias is not None:
            out["up_proj.bias"] = prefix(self.up_proj.bias, 0, f)
            out["down_proj.bias"] = prefix(self.down_proj.bias, 0, hidden)
        return out

    def forward(self, x: torch.Tensor, width: MlpWidth, inner: torch.Tensor | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``inner`` ([ffn] or broadcastable) multiplies the activations before ``down_proj`` (soft masks)."""
        p = params if params is not None else self.sliced(x.shape[-1], width)  # params: sliced() made earlier
        h = F.relu(F.linear(x, p["up_proj.weight"], p.get("up_proj.bias"))).square()
        if inner is not None:
            h = h * inner
        if self.observer is not None:
            self.observer("down_in", h)
        return F.linear(h, p["down_proj.weight"], p.get("down_proj.bias"))
