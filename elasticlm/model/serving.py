"""Weight layout for serving nested budgets: every trained budget's slice is contiguous in memory.

Decoding one token reads every weight of the sub-model once, so on a CPU (and on a GPU at batch 1)
its speed is memory bandwidth. The nested sub-model's weight ``W[:rows, :cols]`` is a strided view of
the parent's row-major ``W``: ``rows`` short runs of ``cols`` values with a gap after each, which
streams measurably slower than the compact matrix an extracted model holds (docs/deployment.md).

:class:`ColumnBlocks` stores ``W`` cut into column blocks at the served widths, each block row-major.
A budget whose width is a cut then reads, per block, a *row prefix* of that block — one contiguous
run — so the smallest budget reads exactly the bytes, in exactly the order, of its extracted model,
and larger budgets read one contiguous run per block. The blocks partition ``W``: no extra memory.
:meth:`~elasticlm.model.hybrid.HybridLM.pack_for_serving` applies it to the MLP projections and the
output head (the matrices that are plain prefixes on both axes; grouped prefixes are compact copies
already, see :class:`~elasticlm.model.slicing.PackedWeights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ColumnBlocks:
    """A weight ``[out, in]`` stored as row-major column blocks cut at the given input widths.

    Worked example — ``W`` is 4 × 6, served widths (rows, cols) = (2, 3) and (4, 6), so ``cuts = [3, 6]``:

        blocks = [W[:, 0:3], W[:, 3:6]]              (each 4 × 3, contiguous)
        linear(x[..., :3], rows=2) = x @ blocks[0][:2].T                     one 2 × 3 run
        linear(x[..., :6], rows=4) = x[..., :3] @ blocks[0].T + x[..., 3:] @ blocks[1].T

    A width that is not a cut is still exact: its last block is used as a strided view.
    """

    def __init__(self, weight: torch.Tensor, cuts: list[int]) -> None:
        full = weight.shape[1]
        self.cuts = sorted({c for c in cuts if 0 < c < full} | {full})
        self.shape = tuple(weight.shape)
        starts = [0, *self.cuts[:-1]]
        self.blocks = [weight[:, a:b].contiguous() for a, b in zip(starts, self.cuts, strict=True)]
        self.starts = starts
        self._plans: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}

    def _pieces(self, rows: int, cols: int) -> list[tuple[int, int, torch.Tensor]]:
        """(start, stop, ``W[:rows, start:stop]`` as a block view) for columns ``[0, cols)``; memoised,
        because building views costs as much as a small matrix product when decoding one token."""
        plan = self._plans.get((rows, cols))
        if plan is None:
            if not (0 < cols <= self.shape[1] and 0 < rows <= self.shape[0]):
                raise ValueError(f"W[:{rows}, :{cols}] requested from a weight of shape {self.shape}")
            plan = []
            for a, b, block in zip(self.starts, self.cuts, self.blocks, strict=True):
                if a >= cols:
                    break
                plan.append((a, min(b, cols), block[:rows, : min(b, cols) - a]))
            self._plans[(rows, cols)] = plan
        return plan

    def linear(self, x: torch.Tensor, rows: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, W[:rows, :x.shape[-1]], bias)``, reading only contiguous row prefixes of blocks."""
        plan = self._pieces(rows, x.shape[-1])
        if len(plan) == 1:
            return F.linear(x, plan[0][2], bias)
        y = F.linear(x[..., : plan[0][1]], plan[0][2], bias)
        for a, b, w in plan[1:]:
            y = y.add_(F.linear(x[..., a:b], w))
        return y

    def embedding(self, ids: torch.Tensor, cols: int) -> torch.Tensor:
        """``F.embedding(ids, W[:, :cols])`` (a tied head's token embeddings)."""
        parts = [F.embedding(ids, w) for _, _, w in self._pieces(self.shape[0], cols)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def dense(self) -> torch.Tensor:
        """``W`` again, as one row-major tensor (a copy)."""
        return torch.cat(self.blocks, dim=1)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)
