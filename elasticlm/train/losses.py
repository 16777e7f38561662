"""Losses over token chunks: knowledge distillation and cross-entropy from the final hidden states,
so that no ``[tokens, vocab]`` tensor larger than one chunk exists (at 49K tokens and Nano V2's
131,072-token vocabulary, whole fp32 logits are 26 GB per tensor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.hybrid import HybridLM


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, temperature: float = 1.0,
            ) -> torch.Tensor:
    """Sum over kept tokens of KL(teacher ‖ student) on logits at ``temperature`` (× τ², so the
    gradient scale does not depend on τ). ``student``/``teacher`` [..., vocab], ``keep`` [...] 0/1."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * keep).sum() * t * t


KD_CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the KD loss: 256 MB in fp32, whatever the vocabulary


def kd_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of :func:`kd_loss_from_hidden` (512 at Nano V2's vocabulary of 131,072)."""
    return max(16, KD_CHUNK_ELEMENTS // vocab_size)


def _kd_chunk(h_s: torch.Tensor, h_t: torch.Tensor, keep: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor,
              temperature: float) -> torch.Tensor:
    with torch.no_grad():
        teacher = F.linear(h_t, w_t)
    return kd_loss(F.linear(h_s, w_s), teacher, keep, temperature)


def _sum_over_chunks(fn, per_token: tuple[torch.Tensor, ...], shared: tuple, step: int) -> torch.Tensor:
    """``Σ fn(*chunk, *shared)`` over chunks of ``step`` tokens of the ``per_token`` tensors (rows = tokens),
    each chunk recomputed in backward so that no more than one chunk of logits exists; a single chunk is
    computed directly (its recompute cost 20 % of a small step). The sum stays connected to the graph of
    ``per_token[0]`` and ``shared[0]`` even with no token: a rank whose rows are all masked must still run
    every backward hook (FSDP's collectives) that the other ranks run."""
    h, w = per_token[0], shared[0]
    total = (h.sum() + w.sum()).float() * 0.0
    n = h.shape[0]
    if n <= step:
        return total + fn(*per_token, *shared)
    recompute = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    for i in range(0, n, step):
        part = tuple(t[i:i + step] for t in per_token)
        total = total + (checkpoint(fn, *part, *shared, use_reentrant=False) if recompute else fn(*part, *shared))
    return total


def kd_loss_from_hidden(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                        keep: torch.Tensor, temperature: float = 1.0, chunk: int | None = None,
                        select: bool = True) -> torch.Tensor:
    """:func:`kd_loss` of the logits ``h_s·w_sᵀ`` against ``h_t·w_tᵀ``, computed over chunks of kept tokens.

    ``h_s``/``h_t`` [..., hidden] are the final norms' outputs, ``w_s``/``w_t`` [vocab, hidden] the
    heads. Each chunk is recomputed in backward (activation checkpointing), so no ``[tokens, vocab]``
    tensor larger than one chunk ever exists — at 49K tokens × 131K vocabulary the full fp32 logits
    would be 26 GB per tensor. Masked tokens (``keep`` 0) are skipped, not computed (``select=False``
    computes them and multiplies by 0: no data-dependent shapes, for fake-tensor memory simulation)."""
    h_s, h_t, k = h_s.flatten(0, -2), h_t.flatten(0, -2), keep.flatten()
    if select:
        rows = k.nonzero().flatten()
        h_s, h_t, k = h_s.index_select(0, rows), h_t.index_select(0, rows), k.index_select(0, rows)
    return _sum_over_chunks(_kd_chunk, (h_s, h_t, k), (w_s, w_t, temperature),
                            chunk or kd_chunk_tokens(w_s.shape[0]))


def teacher_hidden(teacher: HybridLM, inputs: torch.Tensor, doc: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's final-norm output and head weight (a copy when the teacher is sharded:
    its gathered weight is freed after the forward)."""
    sharded = teacher.sharded
    return teacher(inputs, document_ids=doc, head=lambda h, w: (h, w.detach().clone() if sharded else w.detach()))


def _ce_chunk(h: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")


def ce_loss_from_hidden(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                        chunk: int | None = None) -> torch.Tensor:
    """Sum over kept tokens of the next-token cross-entropy of the logits ``h·wᵀ``, over token chunks
    recomputed in backward (``h`` [..., hidden], ``w`` [vocab, hidden], ``targets``/``keep`` [...])."""
    rows = keep.flatten().nonzero().flatten()
    h, y = h.flatten(0, -2).index_select(0, rows), targets.flatten().index_select(0, rows)
    return _sum_over_chunks(_ce_chunk, (h, y), (w,), chunk or kd_chunk_tokens(w.shape[0]))


__all__ = ["ce_loss_from_hidden", "kd_chunk_tokens", "kd_loss", "kd_loss_from_hidden", "teacher_hidden"]
