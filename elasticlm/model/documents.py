"""Packed documents: keep every token inside its own document.

Training packs many documents into one row. Without a mask, attention (which has no positions
in Nemotron-H) cannot tell the current document's ``x=45`` from an earlier document's ``x=12``,
and the Mamba state carries the previous document in. A :class:`DocumentMask` makes a packed
row compute exactly what each document computes alone, in memory linear in the row length:

- attention: each document runs as its own causal sequence (:func:`document_attention`): the
  documents are gathered into a few right-padded batches of similar length and each batch is one
  ``is_causal`` SDPA call, so the flash / memory-efficient kernels apply and no ``[t, t]`` mask
  exists (a right pad is never seen by a real query under a causal mask); short rows on CPU use a
  dense same-document mask instead (faster there, see ``DENSE_MASK_MAX_LEN``);
- causal conv1d: a tap that reaches back into the previous document reads zero (as the zero
  padding at the start of a sequence does);
- SSD scan: the log-decay of a document's first token is set to ``RESET_LOG_DECAY``, so the state
  carried in from the previous document is multiplied by ``exp(-60) ≈ 1e-26`` — zero in fp32
  for any realistic state — without touching the scan's within-document arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESET_LOG_DECAY = -60.0


def document_ids_from_eos(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Document index of every token of packed rows ``[batch, seq]`` where each document ends
    with EOS (the EOS belongs to the document it ends; the next token starts a new one).

    >>> document_ids_from_eos(torch.tensor([[5, 6, 2, 7, 2, 8]]), eos_token_id=2).tolist()
    [[0, 0, 0, 1, 1, 2]]
    """
    is_eos = (tokens == eos_token_id).long()
    return is_eos.cumsum(dim=1) - is_eos


@dataclass(frozen=True)
class DocumentBucket:
    """Documents of similar length, right-padded to ``length``: ``gather`` [n, length] indexes the
    flattened ``[batch·seq]`` tokens (pads repeat the document's first token); ``valid`` [n, length]
    marks real tokens; ``scatter`` holds the flat index of every real token, in ``valid`` order."""

    gather: torch.Tensor
    valid: torch.Tensor
    scatter: torch.Tensor


def document_buckets(starts: list[int], lengths: list[int], device: torch.device | str,
                     max_waste: float = 2.0) -> list[DocumentBucket]:
    """Group documents (flat ``starts``, ``lengths``) into buckets whose padded size is at most
    ``max_waste`` × their real tokens, longest first, so a row costs a handful of kernel calls.

    >>> [b.gather.tolist() for b in document_buckets([0, 8, 9], [8, 1, 2], "cpu")]
    [[[0, 1, 2, 3, 4, 5, 6, 7], [9, 10, 9, 9, 9, 9, 9, 9]], [[8]]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            size = lengths[g[0]] * (len(g) + 1)
            if size <= max_waste * (sum(lengths[j] for j in g) + lengths[i]):
                g.append(i)
                continue
        groups.append([i])
    out = []
    for g in groups:
        length = lengths[g[0]]
        pos = torch.arange(length)
        st = torch.tensor([starts[i] for i in g])[:, None]
        ln = torch.tensor([lengths[i] for i in g])[:, None]
        valid = pos[None] < ln
        gather = torch.where(valid, st + pos[None], st)
        out.append(DocumentBucket(gather.to(device), valid.to(device), gather[valid].to(device)))
    return out


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list[DocumentBucket],
                       scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of every document on its own. ``q`` [b, heads, t, d], ``k``/``v``
    [b, kv_heads, t, d] → [b, heads, t, d]; equal to SDPA with the dense same-document causal mask.
    ``window``: a query sees at most that many positions back, itself included (sliding-window attention)."""
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    qf, kf, vf = (z.transpose(1, 2).reshape(b * t, z.shape[1], d) for z in (q, k, v))
    out = qf.new_zeros(b * t, h, d)
    for bucket in buckets:
        qb, kb, vb = (z[bucket.gather].transpose(1, 2) for z in (qf, kf, vf))  # [n, heads, L, d]
        if rep > 1:  # expanded here: the CPU flash kernel takes no GQA
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        if window is None:
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:  # documents start at 0 in their bucket, so one band mask serves them all
            pos = torch.arange(qb.shape[2], device=qb.device)
            band = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=band, scale=scale)
        out = out.index_put((bucket.scatter,), ob.transpose(1, 2)[bucket.valid])
    return out.view(b, t, h, d).transpose(1, 2)


# Up to this many tokens per row on CPU, attention takes a dense [t, t] same-document mask instead of the
# buckets: at short contexts the gather / scatter of the buckets costs more than the masked positions
# (bench/bench_memory.py: fwd+bwd of 8 × 256 tokens, 77 ms with buckets vs 27 ms dense), and the mask is
# small (4 MB per row at 2K). On GPUs the buckets always run (a mask rules out the flash kernels).
DENSE_MASK_MAX_LEN = 2048


@dataclass(frozen=True)
class DocumentMask:
    buckets: list[DocumentBucket]  # the documents of every row, for document_attention
    reset: torch.Tensor  # [batch, seq] bool: the token starts a new document (not at position 0)
    conv_keep: torch.Tensor  # [batch, kernel, seq] float: the token `j` back is in the same document
    dense: torch.Tensor | None = None  # [batch, 1, seq, seq] bool (causal, same document) for short CPU rows
    positions: torch.Tensor | None = None  # [batch, seq]: each token's position inside its document (rotary)

    @classmethod
    def from_ids(cls, document_ids: torch.Tensor, conv_kernel: int) -> DocumentMask:
        if document_ids.dim() != 2:
            raise ValueError(f"document_ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
        b, t = document_ids.shape
        reset = torch.zeros_like(document_ids, dtype=torch.bool)
        reset[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        keep = torch.zeros(b, conv_kernel, t, device=document_ids.device)
        for j in range(conv_kernel):
            keep[:, j, j:] = (document_ids[:, j:] == document_ids[:, : t - j]).float()
        first = reset.clone()
        first[:, 0] = True
        index = torch.arange(t, device=document_ids.device).expand(b, t)
        positions = index - torch.where(first, index, 0).cummax(dim=1).values
        if document_ids.device.type == "cpu" and t <= DENSE_MASK_MAX_LEN:
            same = document_ids[:, :, None] == document_ids[:, None, :]
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            return cls([], reset, keep, (same & causal)[:, None], positions)
        starts = first.flatten().nonzero().flatten().tolist()
        lengths = [e - s for s, e in zip(starts, starts[1:] + [b * t], strict=True)]
        return cls(document_buckets(starts, lengths, document_ids.device), reset, keep, positions=positions)
