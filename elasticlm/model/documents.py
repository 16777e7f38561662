"""Packed documents: keep every token inside its own document.

Training packs many documents into one row. Without a mask, attention (which has no positions
in Nemotron-H) cannot tell the current document's ``x=45`` from an earlier document's ``x=12``,
and the Mamba state carries the previous document in. A :class:`DocumentMask` makes a packed
row compute exactly what each document would compute alone:

- attention: causal *and* same-document;
- causal conv1d: a tap that reaches back into the previous document reads zero (as the zero
  padding at the start of a sequence does);
- SSD scan: the log-decay of a document's first token is set to ``RESET_LOG_DECAY``, so the state
  carried in from the previous document is multiplied by ``exp(-60) ≈ 1e-26`` — zero in fp32
  for any realistic state — without touching the scan's within-document arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
class DocumentMask:
    attention: torch.Tensor  # [batch, 1, seq, seq] bool: key visible to query (causal, same document)
    reset: torch.Tensor  # [batch, seq] bool: the token starts a new document (not at position 0)
    conv_keep: torch.Tensor  # [batch, kernel, seq] float: the token `j` back is in the same document

    @classmethod
    def from_ids(cls, document_ids: torch.Tensor, conv_kernel: int) -> DocumentMask:
        if document_ids.dim() != 2:
            raise ValueError(f"document_ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
        b, t = document_ids.shape
        same = document_ids[:, :, None] == document_ids[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
        reset = torch.zeros_like(same[:, 0])
        reset[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        keep = torch.zeros(b, conv_kernel, t, device=document_ids.device)
        for j in range(conv_kernel):
            keep[:, j, j:] = (document_ids[:, j:] == document_ids[:, : t - j]).float()
        return cls((same & causal)[:, None], reset, keep)
