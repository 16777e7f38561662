"""Squared-ReLU MLP (not gated), sliceable in hidden and FFN width."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MlpWidth
from .serving import ColumnBlocks
from .slicing import prefix


class MLP(nn.Module):
    observer: Callable[[str, torch.Tensor], None] | None = None  # see Block.observer

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype)
        # Set by HybridLM.pack_for_serving: the projections as column blocks (their Parameters are then on meta).
        self.blocks: dict[str, ColumnBlocks] | None = None

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

    @torch.no_grad()
    def pack(self, hidden_cuts: list[int], ffn_cuts: list[int]) -> None:
        """Store both projections as :class:`ColumnBlocks` cut at the served widths (inference only)."""
        self.blocks = {"up_proj": ColumnBlocks(self.up_proj.weight.detach(), hidden_cuts),
                       "down_proj": ColumnBlocks(self.down_proj.weight.detach(), ffn_cuts)}
        for linear in (self.up_proj, self.down_proj):  # the blocks are the only copy from now on
            linear.weight = nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)

    @torch.no_grad()
    def unpack(self) -> None:
        assert self.blocks is not None
        for name in ("up_proj", "down_proj"):
            getattr(self, name).weight = nn.Parameter(self.blocks[name].dense())
        self.blocks = None

    def forward(self, x: torch.Tensor, width: MlpWidth, inner: torch.Tensor | None = None) -> torch.Tensor:
        """``inner`` ([ffn] or broadcastable) multiplies the activations before ``down_proj`` (soft masks)."""
        hidden, f = x.shape[-1], width.intermediate_size
        if self.blocks is not None:
            up, down = self.blocks["up_proj"], self.blocks["down_proj"]
            b_up, b_down = self.up_proj.bias, self.down_proj.bias
            h = F.relu(up.linear(x, f, None if b_up is None else b_up[:f])).square()
        else:
            p = self.sliced(hidden, width)
            h = F.relu(F.linear(x, p["up_proj.weight"], p.get("up_proj.bias"))).square()
        if inner is not None:
            h = h * inner
        if self.observer is not None:
            self.observer("down_in", h)
        if self.blocks is not None:
            return down.linear(h, hidden, None if b_down is None else b_down[:hidden])
        return F.linear(h, p["down_proj.weight"], p.get("down_proj.bias"))
