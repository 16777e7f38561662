"""Grouped-query attention, sliceable per KV group: no positional encoding (Nemotron-H), or rotary positions
with optional q/k/v and output biases (Qwen2, Llama) and per-head q/k RMSNorm (Qwen3).

Query head ``j`` reads KV head ``j // heads_per_kv_group`` (transformers' ``repeat_kv`` order),
so keeping the first ``r`` query heads of every KV group is a prefix inside each group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..int8 import linear, tensors
from ..kinds import ATTENTION_KIND, AttentionWidth, LayerKind, slice_params
from .cache import KVState
from .call import PLAIN, MixerCall
from .documents import DocumentMask, document_attention
from .norm import RMSNorm, rms_norm
from .rope import rotate
from .tap import Tap

Rotary = tuple[torch.Tensor, torch.Tensor]  # cos, sin [batch, 1, seq, head_dim] of the call's positions


class Attention(nn.Module):
    kind: LayerKind = ATTENTION_KIND  # whose layouts the parameters follow (a variant of attention sets its own)

    def __init__(self, config: ModelConfig, full: AttentionWidth, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config, self.full = config, full  # what the layout of every parameter follows from (kinds/attention.py)
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.attention_head_dim
        self.num_heads = full.heads_per_kv_group * self.num_kv_heads
        layout = self.kind.layout(config, full, full, config.hidden_size)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out_features, in_features = (d.full_size for d in layout[f"{name}.weight"])
            setattr(self, name, nn.Linear(in_features, out_features, bias=f"{name}.bias" in layout,
                                          device=device, dtype=dtype))
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, device=device, dtype=dtype)
        self.tap = Tap()  # the heads' output, before o_proj (importance hooks it)

    def sliced(self, hidden: int, width: AttentionWidth) -> dict[str, torch.Tensor]:
        """This layer's parameters for the sub-model, keyed like its own state_dict (views, except the kept query
        heads inside each KV group: copies, which whoever decodes keeps, see
        :class:`~elasticlm.model.slicing.SliceMemo`)."""
        return slice_params(tensors(self), self.kind.layout(self.config, self.full, width, hidden))

    def new_state(self) -> KVState:
        """This layer's decoding state: every key and value so far."""
        return KVState()

    def forward(self, x: torch.Tensor, width: AttentionWidth, call: MixerCall = PLAIN) -> torch.Tensor:
        """The block's call: :meth:`compute` appending to this layer's KV state in ``call.cache``."""
        cache = call.cache
        if cache is None:
            return self.compute(x, width, None, call.documents, call.inner, call.params, rotary=call.rotary)
        state = cache.layers[call.layer] or self.new_state()
        cache.layers[call.layer] = state
        return self.compute(x, width, state, call.documents, call.inner, call.params, cache.key_valid, call.rotary)

    def compute(self, x: torch.Tensor, width: AttentionWidth, state: KVState | None = None,
                documents: DocumentMask | None = None, inner: torch.Tensor | None = None,
                params: dict[str, torch.Tensor] | None = None, key_valid: torch.Tensor | None = None,
                rotary: Rotary | None = None) -> torch.Tensor:
        """``inner`` ([heads·head_dim]) multiplies the attention output before ``o_proj`` (soft masks).
        ``key_valid`` [batch, keys] (left-padded ragged batches): padding keys are never attended to.
        ``rotary``: the cos / sin of the new tokens' positions (rotary models; the model computes them)."""
        b, t, _ = x.shape
        p = params if params is not None else self.sliced(x.shape[-1], width)  # params: sliced() made earlier
        q = linear(x, p["q_proj.weight"], p.get("q_proj.bias")).view(b, t, -1, self.head_dim)
        k = linear(x, p["k_proj.weight"], p.get("k_proj.bias")).view(b, t, -1, self.head_dim)
        v = linear(x, p["v_proj.weight"], p.get("v_proj.bias")).view(b, t, -1, self.head_dim).transpose(1, 2)
        if "q_norm.weight" in p:
            q = rms_norm(q, p["q_norm.weight"], self.config.norm_eps)
            k = rms_norm(k, p["k_norm.weight"], self.config.norm_eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        past = 0
        if state is not None:
            past = state.start + state.length  # the timeline position of this call's first token
            k, v = state.append(k, v)
        return self._out(self.attend(q, k, v, past, documents, key_valid), b, t, inner, p)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
               documents: DocumentMask | None, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Causal attention of the call's ``t`` queries (timeline positions ``past …``) over every key so far
        (``[batch, heads, t, head_dim]``)."""
        t, device, scale = q.shape[2], q.device, self.head_dim**-0.5
        if documents is not None and documents.dense is None:  # packed rows: each document attends on its own
            return document_attention(q, k, v, documents.buckets, scale)
        if documents is not None:  # short packed rows on CPU: causal within each document by a dense mask
            mask, causal = documents.dense, False
        elif key_valid is not None:  # ragged rows: causal over the real keys (a pad query sees itself, not NaN)
            pos_q = torch.arange(past, past + t, device=device)[:, None]
            pos_k = torch.arange(past + t, device=device)[None, :]
            mask = ((pos_q >= pos_k) & key_valid[:, None, :]) | (pos_q == pos_k)
            mask, causal = mask[:, None], False
        elif past == 0 or t == 1:
            mask, causal = None, past == 0 and t > 1
        else:  # a chunk of several tokens after a prefix: query i sees keys up to past + i
            pos_q = torch.arange(past, past + t, device=device)[:, None]
            mask, causal = pos_q >= torch.arange(past + t, device=device)[None, :], False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def _out(self, o: torch.Tensor, b: int, t: int, inner: torch.Tensor | None,
             p: dict[str, torch.Tensor]) -> torch.Tensor:
        o = o.transpose(1, 2).reshape(b, t, -1)
        if inner is not None:
            o = o * inner
        if self.tap.watched:
            self.tap(o)
        return linear(o, p["o_proj.weight"], p.get("o_proj.bias"))
