"""Decoding state: KV cache for attention layers, conv + SSM state for Mamba-2 layers.

A cache belongs to one Subnet (its tensors have that sub-model's sizes); layers create their
state on first use, so an empty cache needs no knowledge of the widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import Subnet

if TYPE_CHECKING:
    from .slicing import SliceMemo


class LayerState:
    """One layer's decoding state over the cache's timeline of positions. The cache treats every kind's state
    alike through these methods; a kind whose state is more than its rows (KV: one entry per position) says how
    the timeline moves through it."""

    def rows(self) -> int | None:
        """Batch rows held (None: nothing stored yet)."""
        raise NotImplementedError

    def device(self) -> torch.device | None:
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> None:
        """Keep only batch rows ``index``."""
        raise NotImplementedError

    def concat(self, other: LayerState) -> None:
        """Append the rows of ``other`` (same timeline length, both already aligned by :meth:`pad_front`)."""
        raise NotImplementedError

    def pad_front(self, extra: int) -> None:
        """``extra`` positions no row reads were put in front of the timeline (to merge with a longer cache)."""

    def drop_front(self, cut: int) -> None:
        """The timeline's first ``cut`` positions (padding in every row) are gone."""


@dataclass
class MambaState(LayerState):
    conv: torch.Tensor  # [batch, conv channels, kernel - 1]: the last inputs of the causal conv
    ssm: torch.Tensor  # [batch, heads, head_dim, state], fp32

    def rows(self) -> int:
        return self.conv.shape[0]

    def device(self) -> torch.device:
        return self.conv.device

    def select(self, index: torch.Tensor) -> None:
        self.conv, self.ssm = self.conv[index], self.ssm[index]

    def concat(self, other: LayerState) -> None:
        assert isinstance(other, MambaState)
        self.conv, self.ssm = torch.cat([self.conv, other.conv]), torch.cat([self.ssm, other.ssm])


class KVState(LayerState):
    """Keys and values in a buffer that grows by doubling, so that a decode step appends in place."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # positions held
        self.start = 0  # the timeline position of the first one held (a sliding window forgets the oldest)

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

    def rows(self) -> int | None:
        return None if self.k is None else self.k.shape[0]

    def device(self) -> torch.device | None:
        return None if self.k is None else self.k.device

    def select(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]

    def concat(self, other: LayerState) -> None:
        assert isinstance(other, KVState)
        if self.k is not None:
            self.k = torch.cat([self.k[:, :, : self.length], other.k[:, :, : other.length]])
            self.v = torch.cat([self.v[:, :, : self.length], other.v[:, :, : other.length]])

    def pad_front(self, extra: int) -> None:
        if self.k is not None and extra:
            self.k = torch.nn.functional.pad(self.k[:, :, : self.length], (0, 0, extra, 0))
            self.v = torch.nn.functional.pad(self.v[:, :, : self.length], (0, 0, extra, 0))
            self.length += extra

    def drop_front(self, cut: int) -> None:
        if self.k is not None:  # a copy: a view would keep the old buffer alive
            self.k = self.k[:, :, cut : self.length].clone()
            self.v = self.v[:, :, cut : self.length].clone()
            self.length -= cut


class HybridCache:
    """Per-layer decoding state for one Subnet of one model."""

    def __init__(self, num_layers: int, subnet: Subnet, keep_weights: bool = True,
                 memo: SliceMemo | None = None) -> None:
        self.subnet = subnet
        self.layers: list[LayerState | None] = [None] * num_layers  # each kind's own state (see LayerState)
        self.seq_len = 0  # tokens already consumed (positions of the timeline kept)
        self.dropped = 0  # positions dropped as padding of every row (drop_shared_padding)
        # The sub-model's weight slices per layer, made on the first call and reused by every later
        # token: slicing is a handful of view ops per layer, several percent of a decode step.
        # Views follow in-place weight updates; a cache is meant for one generation, not across them.
        # None (sharded models): slice on every call.
        self.weights: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = {} if keep_weights else None
        self.memo = memo  # where grouped copies outlive this generation (a Deployment's), or None
        # Ragged batches (prompts of different lengths, left-padded): ``pad[r]`` leading positions of row r are
        # padding, which attention never reads and Mamba layers never take into their state. None: no padding.
        self.pad: torch.Tensor | None = None
        self.chunk_valid: torch.Tensor | None = None  # [batch, new tokens] of the call in progress (set by the model)
        self.key_valid: torch.Tensor | None = None  # [batch, all tokens so far] of the call in progress

    def begin(self, new_tokens: int, device: torch.device) -> None:
        """Called by the model before a forward of ``new_tokens``: the validity masks of that call."""
        if self.pad is None:
            self.chunk_valid = self.key_valid = None
            return
        pos = torch.arange(self.seq_len + new_tokens, device=device)
        self.key_valid = pos[None, :] >= self.pad[:, None]
        self.chunk_valid = self.key_valid[:, self.seq_len:]
        if bool(self.chunk_valid.all()):
            self.chunk_valid = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (e.g. beams or finished sequences dropped)."""
        if self.pad is not None:
            self.pad = self.pad[index]
        for state in self.layers:
            if state is not None:
                state.select(index)

    def merge(self, other: HybridCache) -> None:
        """Append the rows of ``other`` (same Subnet, e.g. requests that joined a running batch) to this cache.
        The shorter of the two is left-padded with positions no row ever reads, so every row continues exactly
        as it would alone."""
        if other.subnet != self.subnet:
            raise ValueError("caches of different Subnets cannot be merged")
        length = max(self.seq_len, other.seq_len)
        pads = []
        for cache in (self, other):
            extra = length - cache.seq_len
            rows = _rows(cache)
            base = cache.pad if cache.pad is not None else torch.zeros(rows, dtype=torch.long, device=_device(cache))
            pads.append(base + extra)
            for state in cache.layers:
                if state is not None:
                    state.pad_front(extra)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            if mine is not None and theirs is not None:
                mine.concat(theirs)
        self.pad = torch.cat(pads)
        self.seq_len = length

    def drop_shared_padding(self, slack: int = 16) -> int:
        """Drop the oldest positions that are padding in every row; returns how many went (also added to
        ``dropped``). A batch that rows keep joining (a server under steady load) never empties: without this its
        one timeline, and each step's attention over it, would grow with its age, not with its rows. Padding is
        never read and positions count from each row's first real token, so no output changes. Done once the cut
        is at least half the timeline (and ``slack`` positions): the copy is amortised, and the timeline stays
        within twice the oldest row's length."""
        if self.pad is None:
            return 0
        cut = int(self.pad.min())
        if cut < slack or 2 * cut < self.seq_len:
            return 0
        for state in self.layers:
            if state is not None:
                state.drop_front(cut)
        self.seq_len -= cut
        self.dropped += cut
        self.pad = self.pad - cut
        if not bool(self.pad.any()):
            self.pad = None
        return cut


def _rows(cache: HybridCache) -> int:
    for state in cache.layers:
        if state is not None and state.rows() is not None:
            return state.rows()
    raise ValueError("an empty cache has no rows to merge")


def _device(cache: HybridCache) -> torch.device:
    for state in cache.layers:
        if state is not None and state.device() is not None:
            return state.device()
    return torch.device("cpu")
