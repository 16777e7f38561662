"""Sliding-window attention (``kinds/sliding_attention.py``): full attention's projections, slicing and rotary
positions, with each query limited to the last ``window`` positions and a decode state that keeps only the keys
and values a later query can still read."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kinds.sliding_attention import SLIDING_ATTENTION_KIND, SlidingAttentionWidth
from .attention import Attention
from .cache import KVState, LayerState
from .documents import DocumentMask, document_attention


class WindowKVState(KVState):
    """Keys and values of the last ``window - 1`` positions of the timeline (a query at position ``p`` reads
    ``p - window + 1 … p``; the keys of a call's own tokens come with the call). ``start`` is the timeline
    position of the first one kept.

    >>> s = WindowKVState(3)
    >>> _ = s.append(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    >>> s.start, s.length  # positions 8 and 9
    (8, 2)
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window, self.start = window, 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().append(k, v)  # views of the buffer: what this call attends over
        if self.length > self.window - 1:
            self._trim(self.length - (self.window - 1))  # new tensors: the views above stay valid
        return keys, values

    def _trim(self, n: int) -> None:
        """Forget the ``n`` oldest positions kept."""
        if self.k is not None and n > 0:
            self.k = self.k[:, :, n : self.length].clone()
            self.v = self.v[:, :, n : self.length].clone()
            self.length -= n
            self.start += n

    def pad_front(self, extra: int) -> None:
        self.start += extra  # positions nobody reads: nothing to store

    def drop_front(self, cut: int) -> None:
        if cut > self.start:
            self._trim(cut - self.start)
        self.start -= cut

    def concat(self, other: LayerState) -> None:
        assert isinstance(other, WindowKVState)
        start = max(self.start, other.start)  # both timelines end together; keep what both still hold
        self._trim(start - self.start)
        other._trim(start - other.start)
        super().concat(other)


def window_mask(past: int, t: int, first: int, window: int, device: torch.device) -> torch.Tensor:
    """[t, keys] bool: query ``past + i`` sees key position ``first + j`` when it is at most ``window - 1`` back.

    >>> window_mask(past=0, t=4, first=0, window=2, device=torch.device("cpu")).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    pos_q = torch.arange(past, past + t, device=device)[:, None]
    pos_k = torch.arange(first, past + t, device=device)[None, :]
    return (pos_q >= pos_k) & (pos_q - pos_k < window)


class SlidingAttention(Attention):
    kind = SLIDING_ATTENTION_KIND

    def __init__(self, config: ModelConfig, full: SlidingAttentionWidth, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(config, full, device, dtype)
        self.window = config.section(self.kind).window

    def new_state(self) -> WindowKVState:
        return WindowKVState(self.window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
               documents: DocumentMask | None, key_valid: torch.Tensor | None) -> torch.Tensor:
        t, keys = q.shape[2], k.shape[2]
        first = past + t - keys  # timeline position of k[:, :, 0] (the state keeps a window, not the prefix)
        scale = self.head_dim**-0.5
        if documents is not None and documents.dense is None:
            return document_attention(q, k, v, documents.buckets, scale, window=self.window)
        if t == 1 and keys <= self.window and key_valid is None:
            mask = None  # one decoding query, every key it is given in its window
        else:
            mask = window_mask(past, t, first, self.window, q.device)
            if documents is not None:
                mask = documents.dense & mask
            elif key_valid is not None:  # ragged rows: also never a padding key (a pad query sees itself)
                diagonal = torch.zeros_like(mask)
                diagonal[:, past - first:] = torch.eye(t, dtype=torch.bool, device=q.device)
                mask = ((mask & key_valid[:, None, first:]) | diagonal)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
