"""Decoding state: KV cache for attention layers, conv + SSM state for Mamba-2 layers.

A cache belongs to one Subnet (its tensors have that sub-model's sizes); layers create their
state on first use, so an empty cache needs no knowledge of the widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Subnet


@dataclass
class MambaState:
    conv: torch.Tensor  # [batch, conv channels, kernel - 1]: the last inputs of the causal conv
    ssm: torch.Tensor  # [batch, heads, head_dim, state], fp32


class KVState:
    """Keys and values in a buffer that grows by doubling, so that a decode step appends in place."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kv_heads, new, head_dim]`` and return all keys and values so far."""
        new = k.shape[2]
        need = self.length + new
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, 2 * (0 if self.k is None else self.k.shape[2]), 16)
            shape = (k.shape[0], k.shape[1], cap, k.shape[3])
            k_buf, v_buf = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None:
                k_buf[:, :, : self.length] = self.k[:, :, : self.length]
                v_buf[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = k_buf, v_buf
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]


class HybridCache:
    """Per-layer decoding state for one Subnet of one model."""

    def __init__(self, num_layers: int, subnet: Subnet, keep_weights: bool = True) -> None:
        self.subnet = subnet
        self.layers: list[MambaState | KVState | None] = [None] * num_layers
        self.seq_len = 0  # tokens already consumed
        # The sub-model's weight slices per layer, made on the first call and reused by every later
        # token: slicing is a handful of view ops per layer, several percent of a decode step.
        # Views follow in-place weight updates; a cache is meant for one generation, not across them.
        # None (sharded models): slice on every call.
        self.weights: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = {} if keep_weights else None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (e.g. beams or finished sequences dropped)."""
        for state in self.layers:
            if isinstance(state, MambaState):
                state.conv, state.ssm = state.conv[index], state.ssm[index]
            elif isinstance(state, KVState) and state.k is not None:
                state.k, state.v = state.k[index], state.v[index]
