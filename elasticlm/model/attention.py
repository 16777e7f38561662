"""Grouped-query attention with no positional encoding (Nemotron-H), sliceable per KV group.

Query head ``j`` reads KV head ``j // heads_per_kv_group`` (transformers' ``repeat_kv`` order),
so keeping the first ``r`` query heads of every KV group is a prefix inside each group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttentionWidth
from .cache import KVState
from .documents import DocumentMask, document_attention
from .slicing import PackedWeights, grouped_prefix, prefix


class Attention(nn.Module):
    observer: Callable[[str, torch.Tensor], None] | None = None  # see Block.observer

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.packed = PackedWeights()  # inference-time copies of grouped prefixes (see PackedWeights)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, **kw)

    def sliced(self, hidden: int, width: AttentionWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters for the sub-model, keyed like its own state_dict (views, except
        the kept query heads inside each KV group: copies, memoised while decoding)."""
        per, r = self.num_heads // self.num_kv_heads, width.heads_per_kv_group
        if r == per:
            return self._slice(hidden, width)
        return self.packed.get((hidden, width), [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                                 self.o_proj.weight], lambda: self._slice(hidden, width))

    def _slice(self, hidden: int, width: AttentionWidth) -> dict[str, torch.Tensor]:
        kv, per, r = self.num_kv_heads, self.num_heads // self.num_kv_heads, width.heads_per_kv_group
        return {
            "q_proj.weight": prefix(grouped_prefix(self.q_proj.weight, 0, kv, per, r, self.head_dim), 1, hidden),
            "k_proj.weight": prefix(self.k_proj.weight, 1, hidden),
            "v_proj.weight": prefix(self.v_proj.weight, 1, hidden),
            "o_proj.weight": prefix(grouped_prefix(self.o_proj.weight, 1, kv, per, r, self.head_dim), 0, hidden),
        }

    def forward(self, x: torch.Tensor, width: AttentionWidth, state: KVState | None = None,
                documents: DocumentMask | None = None, inner: torch.Tensor | None = None,
                params: dict[str, torch.Tensor] | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """``inner`` ([heads·head_dim]) multiplies the attention output before ``o_proj`` (soft masks).
        ``key_valid`` [batch, keys] (left-padded ragged batches): padding keys are never attended to."""
        b, t, _ = x.shape
        p = params if params is not None else self.sliced(x.shape[-1], width)  # params: sliced() made earlier
        q = F.linear(x, p["q_proj.weight"]).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = F.linear(x, p["k_proj.weight"]).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = F.linear(x, p["v_proj.weight"]).view(b, t, -1, self.head_dim).transpose(1, 2)
        past = 0
        if state is not None:
            past = state.length
            k, v = state.append(k, v)
        if documents is not None and documents.dense is None:  # packed rows: each document attends on its own
            o = document_attention(q, k, v, documents.buckets, self.head_dim**-0.5)
            return self._out(o, b, t, inner, p)
        if documents is not None:  # short packed rows on CPU: causal within each document by a dense mask
            mask, causal = documents.dense, False
        elif key_valid is not None:  # ragged rows: causal over the real keys (a pad query sees itself, not NaN)
            pos_q = torch.arange(past, past + t, device=x.device)[:, None]
            pos_k = torch.arange(past + t, device=x.device)[None, :]
            mask = ((pos_q >= pos_k) & key_valid[:, None, :]) | (pos_q == pos_k)
            mask, causal = mask[:, None], False
        elif past == 0 or t == 1:
            mask, causal = None, past == 0 and t > 1
        else:  # a chunk of several tokens after a prefix: query i sees keys up to past + i
            pos_q = torch.arange(past, past + t, device=x.device)[:, None]
            mask, causal = pos_q >= torch.arange(past + t, device=x.device)[None, :], False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.head_dim**-0.5, enable_gqa=q.shape[1] != k.shape[1])
        return self._out(o, b, t, inner, p)

    def _out(self, o: torch.Tensor, b: int, t: int, inner: torch.Tensor | None,
             p: dict[str, torch.Tensor]) -> torch.Tensor:
        o = o.transpose(1, 2).reshape(b, t, -1)
        if inner is not None:
            o = o * inner
        if self.observer is not None:
            self.observer("o_in", o)
        return F.linear(o, p["o_proj.weight"])
