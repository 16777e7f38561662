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

from ..config import ModelConfig, Subnet, count_parameters, subnet_config
from ..errors import ConfigError
from ..kinds import KINDS
from ..model.hf import hf_incompatibility
from ..model.hybrid import HybridLM
from .space import width_multiple

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token ids, document ids, loss mask (all [b, t])

# Sensible per-axis limits (Minitron prunes each axis by at most about half).
WIDTH_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)
HEAD_FRACTIONS = (1.0, 0.75, 0.5)
MAX_DEPTH_DROP = 0.25  # at most this fraction of the layers is dropped
MIN_FILL_FRACTION = 0.2  # the solved axis keeps at least this fraction
TOLERANCE = 0.01  # a candidate's parameter count is within 1 % of the budget
DEFAULT_ALIGN = 8  # channel widths are multiples of this (elastic.align's default; 64 or 128 on GPUs)


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
           budget: int, multiple: int = 1) -> tuple[Subnet, int, int] | None:
    """The value ``v`` in [lo, hi], a multiple of ``multiple`` (or ``hi``, the parent's width), whose Subnet
    ``make(v)`` comes closest to ``budget`` (the count is affine in ``v``, so two evaluations give the slope);
    None unless within 1 %."""
    a, b = count_parameters(config, make(lo)), count_parameters(config, make(hi))
    if hi == lo:
        v = lo
    else:
        slope = (b - a) / (hi - lo)
        v = min(hi, max(lo, round(lo + (budget - a) / slope))) if slope > 0 else lo
    if multiple > 1 and v != hi:  # the aligned neighbours, the parent's own width among them
        down, up = v // multiple * multiple, -(-v // multiple) * multiple
        near = [w for w in (down, up if up <= hi else hi) if w >= max(lo, multiple) or w == hi]
        if not near:
            return None
        v = min(near, key=lambda w: abs(count_parameters(config, make(w)) - budget))
    subnet = make(v)
    n = count_parameters(config, subnet)
    return (subnet, n, v) if abs(n - budget) <= TOLERANCE * budget else None


def _nearest_exportable(config: ModelConfig, make: Callable[[int], Subnet], lo: int, hi: int, budget: int,
                        multiple: int = 1) -> tuple[Subnet, int, int] | None:
    """Like :func:`_solve`, among the values whose architecture the family's Hugging Face config can hold (Mamba2:
    the inner width a whole multiple of the hidden size), aligned ones first: the solved value often is not one.
    Only the values within 1 % of ``budget`` are tried (the count is affine in the value)."""
    a, b = count_parameters(config, make(lo)), count_parameters(config, make(hi))
    if hi == lo or b <= a:
        return None
    slope = (b - a) / (hi - lo)
    centre = lo + (budget - a) / slope
    reach = TOLERANCE * budget / slope
    values = range(max(lo, math.ceil(centre - reach)), min(hi, math.floor(centre + reach)) + 1)
    for v in sorted(values, key=lambda v: (v % multiple != 0 and v != hi, abs(v - centre))):
        subnet = make(v)
        n = count_parameters(config, subnet)
        if abs(n - budget) <= TOLERANCE * budget and hf_incompatibility(subnet_config(config, subnet)) is None:
            return subnet, n, v
    return None


def _grid(rule: str, full: int, align: int = 1) -> list[int]:
    """The values ``elasticlm prune`` tries for a width field of parent width ``full`` (see LayerKind.prune_grid):
    head and expert counts by fractions; channel widths by fractions, aligned (:func:`width_multiple`)."""
    if rule == "heads":
        return _choices(full, HEAD_FRACTIONS)
    return _choices(full, WIDTH_FRACTIONS[::2], max(width_multiple(full, align), 2 if full >= 8 else 1))


def _uniform(config: ModelConfig, hidden: int, values: dict[tuple[str, str], int], dropped: tuple[int, ...]) -> Subnet:
    """A homogeneous Subnet: ``values[(kind char, width field)]`` in every layer of that kind."""
    layers = []
    for i, char in enumerate(config.pattern):
        mine = {f: v for (c, f), v in values.items() if c == char}
        layers.append(None if i in dropped else dataclasses.replace(config.layer_widths(i), **mine))
    return Subnet(hidden, tuple(layers))


def candidates(config: ModelConfig, budget: int, keep_attention: bool = True, align: int = DEFAULT_ALIGN,
               exportable: bool = True) -> list[Candidate]:
    """Every homogeneous architecture on the grid whose parameter count is within 1 % of ``budget`` (layers
    dropped in :meth:`ModelConfig.drop_order`: the last attention layer stays unless ``keep_attention`` is off).
    Each kind present contributes its grid fields; the "fill" field (FFN width) is solved, or the hidden size
    when no kind has one. Channel widths (hidden, FFN, head channels) are multiples of ``align`` where the axis is
    wide enough (:func:`~elasticlm.elastic.space.width_multiple`); ``exportable``: only architectures that the
    parent family's Hugging Face config can hold (e.g. Mamba2's inner width = expand × hidden, Llama's hidden
    size a multiple of the heads)."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ConfigError(f"the alignment must be an int >= 1 (8; 64 or 128 on GPUs; 1: none), got {align!r}")
    if not config.is_homogeneous:
        raise ConfigError("pruning searches homogeneous architectures; the parent has per-layer widths")
    present = [k for k in KINDS.values() if config.count(k.char)]
    fulls = {k.char: config.layer_widths(config.pattern.index(k.char)) for k in present}
    grid = [(k, f, getattr(fulls[k.char], f), rule) for k in present for f, rule in k.prune_grid.items()
            if rule != "fill"]
    fill = next(((k, f, getattr(fulls[k.char], f)) for k in present for f, rule in k.prune_grid.items()
                 if rule == "fill"), None)
    hidden_choices = _choices(config.hidden_size, WIDTH_FRACTIONS, width_multiple(config.hidden_size, align))
    order = config.drop_order(keep_attention)
    drops = [0] if order is None else list(range(0, int(MAX_DEPTH_DROP * config.num_layers) + 1, config.depth_unit))
    out: list[Candidate] = []
    grids = [[v for v in _grid(rule, full, align) if v >= kind.minimum(config, f)] for kind, f, full, rule in grid]
    for hidden, *picks, k in itertools.product(hidden_choices if fill else [None], *grids, drops):
        dropped = tuple(order[:k]) if order else ()
        values = {(kind.char, f): v for (kind, f, _, _), v in zip(grid, picks, strict=True)}

        def make(v: int, hidden=hidden, values=values, dropped=dropped) -> Subnet:
            if fill is None:
                return _uniform(config, v, values, dropped)
            return _uniform(config, hidden, {**values, (fill[0].char, fill[1]): v}, dropped)

        full_fill = fill[2] if fill else config.hidden_size
        lo = max(1, math.ceil(MIN_FILL_FRACTION * full_fill))
        try:
            solved = _solve(config, make, lo, full_fill, budget, width_multiple(full_fill, align))
        except ConfigError:  # e.g. every layer dropped
            continue
        if solved is None:
            continue
        subnet, n, v = solved
        if exportable and hf_incompatibility(subnet_config(config, subnet)) is not None:
            solved = _nearest_exportable(config, make, lo, full_fill, budget, width_multiple(full_fill, align))
            if solved is None:
                continue
            subnet, n, v = solved
        fractions = {"hidden": subnet.hidden_size / config.hidden_size, "depth": 1 - k / config.num_layers}
        fractions.update({kind.fields[f]: pick / full for (kind, f, full, _), pick in zip(grid, picks, strict=True)})
        if fill:
            fractions[fill[0].fields[fill[1]]] = v / fill[2]
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
    device = model.device
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
           progress: bool = True, align: int = DEFAULT_ALIGN,
           exportable: bool = True) -> tuple[Candidate, list[Candidate]]:
    """The lowest-validation-loss candidate for ``budget`` among :func:`candidates` (``align``, ``exportable``),
    and every candidate evaluated."""
    cands = candidates(model.config, budget, align=align, exportable=exportable)
    if not cands:
        hint = " or the alignment (--align)" if align > 1 else ""
        hint += "; --format native also allows architectures Hugging Face cannot hold" if exportable else ""
        raise ConfigError(f"no architecture on the search grid reaches {budget:,} parameters within 1 %: "
                          f"the budget is too small for the per-axis limits{hint} (the parent has "
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
