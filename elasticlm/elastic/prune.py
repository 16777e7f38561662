"""Zero-shot structured pruning of a reordered parent to a parameter budget (Minitron-style).

The parent must be importance-ordered (:mod:`elasticlm.elastic.reorder`), so that a pruned model
is a prefix of every axis and the layers to drop are the first ones of ``config.depth_order``.
The search enumerates homogeneous architectures on a small grid of per-axis fractions, solves the
last axis (FFN width, or the hidden size for a model without MLP layers) so that the parameter
count meets the budget, and keeps the candidate with the lowest validation loss.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import MLP, ModelConfig, Subnet, count_parameters
from ..errors import ConfigError
from ..model.hybrid import HybridLM

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token ids, document ids, loss mask (all [b, t])

# Sensible per-axis limits (Minitron prunes each axis by at most about half).
WIDTH_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)
HEAD_FRACTIONS = (1.0, 0.75, 0.5)
MAX_DEPTH_DROP = 0.25  # at most this fraction of the layers is dropped
MIN_FILL_FRACTION = 0.2  # the solved axis keeps at least this fraction
TOLERANCE = 0.01  # a candidate's parameter count is within 1 % of the budget


@dataclass(frozen=True)
class Candidate:
    subnet: Subnet
    parameters: int
    fractions: dict[str, float]
    loss: float | None = None


def describe_subnet(config: ModelConfig, subnet: Subnet) -> str:
    """One line: hidden, the homogeneous widths and the dropped layers."""
    kept = [w for w in subnet.layers if w is not None]
    parts = [f"hidden {subnet.hidden_size}"]
    for w in kept:
        text = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(w).items())
        if text not in parts:
            parts.append(text)
    dropped = [i for i, w in enumerate(subnet.layers) if w is None]
    parts.append(f"dropped layers {dropped}" if dropped else "no layer dropped")
    return "; ".join(parts)


def _choices(full: int, fractions: Iterable[float], multiple: int = 1) -> list[int]:
    out = []
    for f in fractions:
        v = max(multiple, int(round(full * f / multiple)) * multiple)
        if v <= full and v not in out:
            out.append(v)
    return out


def _solve(config: ModelConfig, make: Callable[[int], Subnet], lo: int, hi: int,
           budget: int) -> tuple[Subnet, int, int] | None:
    """The value ``v`` in [lo, hi] whose Subnet ``make(v)`` comes closest to ``budget`` (the count
    is affine in ``v``, so two evaluations give the slope); None unless within 1 %."""
    a, b = count_parameters(config, make(lo)), count_parameters(config, make(hi))
    if hi == lo:
        v = lo
    else:
        slope = (b - a) / (hi - lo)
        v = min(hi, max(lo, round(lo + (budget - a) / slope))) if slope > 0 else lo
    subnet = make(v)
    n = count_parameters(config, subnet)
    return (subnet, n, v) if abs(n - budget) <= TOLERANCE * budget else None


def candidates(config: ModelConfig, budget: int, keep_attention: bool = True) -> list[Candidate]:
    """Every homogeneous architecture on the grid whose parameter count is within 1 % of ``budget`` (layers
    dropped in :meth:`ModelConfig.drop_order`: the last attention layer stays unless ``keep_attention`` is off)."""
    mamba = config.count("M") > 0
    attention = config.count("*") > 0
    fill_ffn = config.count(MLP) > 0
    hidden_choices = _choices(config.hidden_size, WIDTH_FRACTIONS, 8 if config.hidden_size >= 64 else 1)
    hg = config.mamba_heads_list()[0] // config.mamba_n_groups if mamba else 1
    hd = config.mamba_head_dims_list()[0] if mamba else 1
    per_kv = config.attention_heads_list()[0] // config.num_key_value_heads if attention else 1
    ffn = config.intermediate_sizes_list()[0] if fill_ffn else 1
    if not config.is_homogeneous:
        raise ConfigError("pruning searches homogeneous architectures; the parent has per-layer widths")
    order = config.drop_order(keep_attention)
    drops = [0] if order is None else list(range(int(MAX_DEPTH_DROP * config.num_layers) + 1))
    out: list[Candidate] = []
    axes = itertools.product(
        hidden_choices if fill_ffn else [None],
        _choices(hg, HEAD_FRACTIONS) if mamba else [1],
        _choices(hd, WIDTH_FRACTIONS[::2], 2 if hd >= 8 else 1) if mamba else [1],
        _choices(per_kv, HEAD_FRACTIONS) if attention else [1],
        drops,
    )
    for hidden, mh, mc, ah, k in axes:
        dropped = tuple(order[:k]) if order else ()

        def make(v: int, hidden=hidden, mh=mh, mc=mc, ah=ah, dropped=dropped) -> Subnet:
            h, f = (hidden, v) if fill_ffn else (v, ffn)
            return Subnet.uniform(config, hidden_size=h, mamba_heads_per_group=mh if mamba else None,
                                  mamba_head_dim=mc if mamba else None,
                                  attention_heads_per_kv_group=ah if attention else None,
                                  intermediate_size=f if fill_ffn else None, drop_layers=dropped)

        full_fill = ffn if fill_ffn else config.hidden_size
        lo = max(1, math.ceil(MIN_FILL_FRACTION * full_fill))
        try:
            solved = _solve(config, make, lo, full_fill, budget)
        except ConfigError:  # e.g. every layer dropped
            continue
        if solved is None:
            continue
        subnet, n, v = solved
        fractions = {"hidden": subnet.hidden_size / config.hidden_size, "depth": 1 - k / config.num_layers}
        if mamba:
            fractions.update(mamba_heads=mh / hg, mamba_head_dim=mc / hd)
        if attention:
            fractions["attention_heads"] = ah / per_kv
        if fill_ffn:
            fractions["ffn"] = v / ffn
        out.append(Candidate(subnet, n, fractions))
    return out


def balanced(cands: list[Candidate], limit: int) -> list[Candidate]:
    """At most ``limit`` candidates, preferring those that shrink every axis evenly (the smallest
    spread of per-axis fractions); the full list when it is short enough."""
    if len(cands) <= limit:
        return cands
    return sorted(cands, key=lambda c: (max(c.fractions.values()) - min(c.fractions.values()), -c.parameters))[:limit]


@torch.no_grad()
def subnet_loss(model: HybridLM, subnet: Subnet | None, batches: list[Batch]) -> float:
    """Mean next-token cross-entropy of ``subnet`` on packed ``batches`` (documents kept apart),
    over the targets whose loss mask is set."""
    device = model.embeddings.weight.device
    total, count = 0.0, 0
    for ids, doc, mask in batches:
        ids, doc = ids.to(device), doc.to(device)
        logits = model(ids[:, :-1], subnet, document_ids=doc[:, :-1]).float()
        losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        keep = mask[:, 1:].flatten().to(device).float()
        total += float((losses * keep).sum())
        count += int(keep.sum())
    return total / max(count, 1)


def search(model: HybridLM, budget: int, batches: list[Batch], max_candidates: int = 24,
           progress: bool = True) -> tuple[Candidate, list[Candidate]]:
    """The lowest-validation-loss candidate for ``budget``, and every candidate evaluated."""
    cands = candidates(model.config, budget)
    if not cands:
        raise ConfigError(f"no architecture on the search grid reaches {budget:,} parameters within 1 %: "
                          f"the budget is too small for the per-axis limits (the parent has "
                          f"{model.num_parameters():,})")
    chosen = balanced(cands, max_candidates)
    was = model.training
    model.eval()
    scored = []
    try:
        for c in tqdm(chosen, desc="prune search", unit="candidate", disable=not progress):
            scored.append(dataclasses.replace(c, loss=subnet_loss(model, c.subnet, batches)))
    finally:
        model.train(was)
    best = min(scored, key=lambda c: (c.loss, -c.parameters))
    return best, scored


__all__ = ["Candidate", "balanced", "candidates", "describe_subnet", "search", "subnet_loss"]
