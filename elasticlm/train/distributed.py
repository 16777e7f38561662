"""The process group a training run joins under ``torchrun``, and the few collectives the trainer needs.

A run outside torchrun is a world of one: every helper here is then a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), backend)


def rows_of(rank: int, world: int, micro: int, micro_step: int) -> slice:
    """Rows of the global batch that rank ``rank`` trains at accumulation step ``micro_step``.

    >>> rows_of(1, 2, 4, 0), rows_of(0, 1, 4, 1)   # 2 ranks × 4 rows == 1 rank, 2 micro-steps × 4
    (slice(4, 8, None), slice(4, 8, None))
    """
    start = (micro_step * world + rank) * micro
    return slice(start, start + micro)


def barrier(dist: Distributed) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def mean_over_ranks(value: float, dist: Distributed, device: torch.device) -> float:
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t) / dist.world


def from_rank0(value: Any, dist: Distributed) -> Any:
    """Rank 0's value on every rank (a measured choice must be the same everywhere)."""
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: Any, dist: Distributed) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if dist.world == 1:
        return [value]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world
    tdist.all_gather_object(out, value)
    return out


def average_gradients(module: nn.Module, dist: Distributed) -> None:
    """Average a replicated (not sharded, not DDP-wrapped) module's gradients over the ranks."""
    if dist.world == 1:
        return
    import torch.distributed as tdist

    for p in module.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad /= dist.world


def merge_shares(shares: list[list[Any]]) -> list[Any]:
    """Undo a round-robin split: ``shares[r]`` holds items ``r, r + world, r + 2·world, …``.

    >>> merge_shares([["a", "c", "e"], ["b", "d"]])
    ['a', 'b', 'c', 'd', 'e']
    """
    world, out = len(shares), []
    for i in range(sum(len(s) for s in shares)):
        out.append(shares[i % world][i // world])
    return out


def shared_encoder(encode_many: Callable[[list[str]], list[list[int]]], dist: Distributed
                   ) -> Callable[[list[str]], list[list[int]]]:
    """Tokenize a chunk of texts with the work split over the ranks: each rank encodes every ``world``-th
    text (``texts[rank::world]``) and the token lists are all-gathered, so every rank gets the whole chunk
    in order — the same tokens as one process encoding it all, for 1/world of the tokenizer time. Every
    rank must call the result with the same texts at the same point (the packed streams do)."""
    if dist.world == 1:
        return encode_many

    def encode(texts: list[str]) -> list[list[int]]:
        mine = [array("i", ids) for ids in encode_many(texts[dist.rank::dist.world])]  # compact to send
        return [list(ids) for ids in merge_shares(all_gather_objects(mine, dist))]

    return encode
