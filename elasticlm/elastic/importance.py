"""Importance of every width axis and every layer, from forward passes on calibration data.

DESIGN 2.3. Activations are aggregated as in Minitron: ``|activation|`` averaged over the
tokens of a sample, then the L2 norm over samples, in fp32 — accumulated as a running sum of
squares, so memory does not depend on the number of samples.

- hidden channels: every block's pre-norm output and the final norm's output, summed;
- FFN neurons: the input of ``down_proj``;
- attention heads: the input of ``o_proj``, L2 over each head's channels (ranked within their
  KV group by :mod:`elasticlm.elastic.reorder`; KV heads are always kept);
- Mamba: the x part of ``in_proj``'s output (before the conv). Channels are scored by their L2
  across all heads (one channel order shared by every head), heads by the L2 over their channels
  (ranked within their group). B, C, the groups and the state are never scored or pruned.

Depth is scored by what removing a layer does to the logits: the normalized MSE
``s_j = Σ(M_full − M_−j)² / Σ M_full²``, either once (``oneshot_mse``) or iteratively
(``iterative_mse``, the default: drop the least important layer, re-score the others against the
full model, repeat), and Minitron's block importance ``1 − cos(x_in, x_out)`` (``cosine``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import ATTENTION, ModelConfig, Subnet
from ..data.datasets import DataConfig, PackedStream, documents
from ..errors import CheckpointError, ConfigError
from ..kinds import LayerKind, Run, kind_of
from ..model.documents import DocumentMask, document_ids_from_eos
from ..model.hybrid import HybridLM

DEPTH_METRICS = ("iterative_mse", "oneshot_mse", "cosine")
Batch = tuple[torch.Tensor, torch.Tensor]  # token ids [b, t], document ids [b, t]


@dataclass
class Importance:
    """Scores (higher = more important) for every axis, and the depth orders.

    ``layers[i]`` holds, by the kind of layer ``i``: Mamba ``{"channel": [head_dim], "head": [heads]}``,
    attention ``{"head": [query heads]}``, MLP ``{"neuron": [intermediate]}``.
    ``depth[metric]`` lists the layers least important first (the order they would be dropped in);
    ``depth_scores[metric]`` holds the per-layer scores (for iterative MSE: each layer's score in
    the round it was dropped).
    """

    hidden: torch.Tensor
    layers: list[dict[str, torch.Tensor]]
    depth: dict[str, list[int]] = field(default_factory=dict)
    depth_scores: dict[str, list[float | None]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def depth_order(self, metric: str = "iterative_mse") -> list[int]:
        if metric not in self.depth:
            raise ConfigError(f"no depth metric {metric!r} in these scores; have {sorted(self.depth)}")
        return list(self.depth[metric])

    def check(self, config: ModelConfig) -> None:
        """Raise ConfigError unless these scores fit ``config``'s shapes."""
        def fail(what: str) -> None:
            raise ConfigError(f"importance scores do not match the model: {what}")

        if self.hidden.shape != (config.hidden_size,):
            fail(f"hidden has {self.hidden.numel()} scores, the model {config.hidden_size} channels")
        if len(self.layers) != config.num_layers:
            fail(f"{len(self.layers)} layers scored, the model has {config.num_layers}")
        for i, scores in enumerate(self.layers):
            for name, size in score_sizes(config, i).items():
                if name not in scores or scores[name].shape != (size,):
                    fail(f"layer {i} needs {size} {name} scores")
        for metric, order in self.depth.items():
            if sorted(order) != list(range(config.num_layers)):
                fail(f"depth order {metric!r} is not a permutation of the {config.num_layers} layers")

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> None:
        """``scores.safetensors`` (every tensor) + ``importance.json`` (depth orders, metadata)."""
        from safetensors.torch import save_file

        from ..checkpoint import atomic_directory

        tensors = {"hidden": self.hidden.contiguous()}
        for i, scores in enumerate(self.layers):
            tensors.update({f"layers.{i}.{k}": v.contiguous() for k, v in scores.items()})
        with atomic_directory(directory, force, "importance", inputs) as tmp:
            save_file(tensors, str(tmp / "scores.safetensors"))
            (tmp / "importance.json").write_text(json.dumps(
                {"num_layers": len(self.layers), "depth": self.depth, "depth_scores": self.depth_scores,
                 "meta": self.meta}, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Importance:
        from ..checkpoint import read_json, read_weights

        d = Path(directory)
        if not (d / "importance.json").is_file():
            raise CheckpointError(f"{d} holds no importance scores (importance.json); "
                                  "run `elasticlm importance` first")
        info = read_json(d / "importance.json")
        tensors = read_weights(d)
        try:
            layers: list[dict[str, torch.Tensor]] = [{} for _ in range(int(info["num_layers"]))]
            for name, t in tensors.items():
                if name != "hidden":
                    _, i, key = name.split(".")
                    layers[int(i)][key] = t
            return cls(tensors["hidden"], layers, {k: list(map(int, v)) for k, v in info["depth"].items()},
                       info.get("depth_scores", {}), info.get("meta", {}))
        except (KeyError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{d}: malformed importance scores ({exc})") from None


# -- calibration data -------------------------------------------------------------------------


def calibration_batches(data: DataConfig, encode: Callable[[str], list[int]], eos_token_id: int, samples: int,
                        seq_len: int, batch_size: int = 8, split: str = "train",
                        loss_mask: bool = False) -> Iterator[Any]:
    """``samples`` packed, unpadded windows of ``seq_len`` tokens, in batches, with the document
    ids that keep packed documents apart (and, with ``loss_mask``, the 0/1 mask of the tokens a
    loss should count: ``data.mask_prompt`` leaves prompts out)."""
    if samples < 1 or seq_len < 2:
        raise ConfigError("calibration needs samples >= 1 and seq_len >= 2")
    stream = PackedStream(documents(data, split), encode, eos_token_id, seq_len - 1, batch_size)
    left = samples
    while left > 0:
        ids, mask = stream.next_masked_batch()
        ids, mask = ids[: min(batch_size, left)], mask[: min(batch_size, left)]
        left -= ids.shape[0]
        doc = document_ids_from_eos(ids, eos_token_id)
        yield (ids, doc, mask) if loss_mask else (ids, doc)


# -- width scores ------------------------------------------------------------------------------


class _Recorder:
    """Running sums of squares of per-sample mean |activation| (and the block cosines)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.sumsq: dict[tuple[int, str], torch.Tensor] = {}
        self.cos_sum = torch.zeros(config.num_layers, dtype=torch.float64)
        self.tokens = 0
        self._block_in: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, name: str, act: torch.Tensor) -> None:
        if name == "block_in":
            self._block_in[layer] = act
            return
        if name == "block_out":
            cos = torch.nn.functional.cosine_similarity(self._block_in.pop(layer).float(), act.float(), dim=-1)
            self.cos_sum[layer] += cos.sum().double().cpu()
            return
        m = act.detach().float().abs().mean(dim=1)  # [batch, channels]
        key = (layer, name)
        acc = (m * m).sum(dim=0)
        self.sumsq[key] = self.sumsq[key] + acc if key in self.sumsq else acc

    def agg(self, layer: int, name: str) -> torch.Tensor:
        return self.sumsq[(layer, name)].sqrt().cpu()


def _attach(model: HybridLM, recorder: _Recorder) -> Callable[[], None]:
    """Forward hooks that feed ``recorder``: every block's input and output, every mixer's input (the normed hidden
    state) and tap (its inner activation), the final norm's output; returns the function that removes them."""
    handles = [model.norm_f.register_forward_hook(lambda m, args, out: recorder.observe(-1, "norm_f", out))]
    for i, block in enumerate(model.layers):
        handles += [
            block.register_forward_pre_hook(lambda m, args, i=i: recorder.observe(i, "block_in", args[0])),
            block.register_forward_hook(lambda m, args, out, i=i: recorder.observe(i, "block_out", out)),
            block.mixer.register_forward_pre_hook(lambda m, args, i=i: recorder.observe(i, "norm", args[0])),
            block.mixer.tap.register_forward_hook(lambda m, args, out, i=i: recorder.observe(i, "inner", out)),
        ]

    def detach() -> None:
        for handle in handles:
            handle.remove()

    return detach


def score_sizes(config: ModelConfig, layer: int) -> dict[str, int]:
    """The score vectors layer ``layer`` has, and their sizes: one score per unit of every group for the field
    that cuts units (ranked within its group), one per entry for the field that cuts inside a unit."""
    kind = kind_of(config.pattern[layer])
    inner = kind.inner(config, config.layer_widths(layer))
    sizes = {kind.scores[inner.unit]: inner.groups * inner.per_group} if inner.unit else {}
    if inner.entry:
        sizes[kind.scores[inner.entry]] = inner.inner
    return sizes


def unit_scores(kind: LayerKind, inner: Run, activation: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of one layer from its aggregated activation in the kind's inner layout ``[groups · units ·
    entries]``: a unit's score is the L2 over its entries, an entry's the L2 over every unit.

    >>> from elasticlm.kinds import MAMBA_KIND
    >>> run = Run(1, 2, 2, unit="heads_per_group", entry="head_dim")
    >>> {k: v.tolist() for k, v in unit_scores(MAMBA_KIND, run, torch.tensor([3., 4., 0., 1.])).items()}
    {'head': [5.0, 1.0], 'channel': [3.0, 4.123105525970459]}
    """
    per = activation.view(-1, inner.inner)  # [groups · units, entries]
    out = {}
    if inner.unit:
        out[kind.scores[inner.unit]] = per.norm(dim=1) if inner.inner > 1 else per[:, 0]
    if inner.entry:
        out[kind.scores[inner.entry]] = per.norm(dim=0)
    return out


@torch.no_grad()
def width_importance(model: HybridLM, batches: Iterator[Batch] | list[Batch], total: int | None = None,
                     progress: bool = True) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[float]]:
    """Hidden, per-layer width scores and per-layer cosine block importance, in one pass."""
    cfg = model.config
    recorder = _Recorder(cfg)
    detach = _attach(model, recorder)
    was = model.training
    model.eval()
    device = model.device
    try:
        for ids, doc in tqdm(batches, total=total, desc="importance", unit="batch", disable=not progress):
            model(ids.to(device), document_ids=doc.to(device))
            recorder.tokens += ids.numel()
    finally:
        detach()
        model.train(was)
    if recorder.tokens == 0:
        raise ConfigError("the calibration data yielded no samples")
    hidden = recorder.agg(-1, "norm_f").clone()
    for i in range(cfg.num_layers):
        hidden += recorder.agg(i, "norm")
    layers: list[dict[str, torch.Tensor]] = []
    for i, char in enumerate(cfg.pattern):
        kind = kind_of(char)
        layers.append(unit_scores(kind, kind.inner(cfg, cfg.layer_widths(i)), recorder.agg(i, "inner")))
    cosine = [1.0 - float(c) / recorder.tokens for c in recorder.cos_sum]
    return hidden, layers, cosine


# -- depth scores ------------------------------------------------------------------------------
#
# Removing layer j leaves every layer before it unchanged, so the logits of "the current model without j"
# are the suffix after j run from the current model's hidden state at j's input. One sweep through the
# current model therefore scores every candidate of a round: at each kept layer i, the state of "drop i"
# (the current state, which skips i) joins the sweep, and block i runs once on the current state and on
# every candidate spawned before i, stacked along the batch. A round then costs m + m(m-1)/2 layer
# evaluations for m remaining layers instead of m whole-model forwards (≈ m² layer evaluations plus m
# vocabulary projections). The output projection is linear, so
# Σ‖(h_full − h_j)·Wᵀ‖² = Σ (h_full − h_j)ᵀ (WᵀW) (h_full − h_j): the MSE of the logits needs only the
# final-norm outputs and the [hidden, hidden] Gram matrix of the head, never a [tokens, vocab] tensor.

STACK_ROWS = 64  # most sequences one block call runs when candidates are stacked
STATE_BYTES = 2 * 2**30  # most bytes of candidate hidden states held at once (more: candidates in groups)


@torch.no_grad()
def layer_mse(model: HybridLM, batches: list[Batch], dropped: set[int] = frozenset(),  # type: ignore[assignment]
              candidates: list[int] | None = None) -> dict[int, float]:
    """``Σ(M_full − M_−(dropped ∪ {j}))² / Σ M_full²`` for every candidate layer ``j``, one whole-model forward
    per candidate (the reference that :func:`depth_mse_rounds` computes from cached hidden states)."""
    cfg = model.config
    candidates = [j for j in range(cfg.num_layers) if j not in dropped] if candidates is None else candidates
    device = model.device
    num = dict.fromkeys(candidates, 0.0)
    den = 0.0
    for ids, doc in batches:
        ids, doc = ids.to(device), doc.to(device)
        full = model(ids, document_ids=doc).float()
        den += float(full.square().sum())
        for j in candidates:
            out = model(ids, Subnet.uniform(cfg, drop_layers=(*dropped, j)), document_ids=doc).float()
            num[j] += float((full - out).square().sum())
    return {j: num[j] / max(den, 1e-30) for j in candidates}


def _units(n: int, unit: int) -> list[tuple[int, ...]]:
    """The blocks removed together: single blocks, or a transformer's (attention, MLP) decoder layers."""
    if unit < 1 or n % unit:
        raise ConfigError(f"a depth unit of {unit} blocks does not divide the model's {n} blocks")
    return [tuple(range(u, u + unit)) for u in range(0, n, unit)]


@torch.no_grad()
def _iterative_reference(model: HybridLM, batches: list[Batch],
                         unit: int = 1) -> tuple[list[int], list[float | None]]:
    """The iterative order by whole-model forwards (one per remaining unit per round, every round): the slow
    reference of the tests. ``unit`` blocks are removed together."""
    cfg = model.config
    units = _units(cfg.num_layers, unit)
    device = model.device
    dropped: list[int] = []
    scores: list[float | None] = [None] * len(units)
    while len(dropped) < len(units) - 1:
        remaining = [u for u in range(len(units)) if u not in dropped]
        num, den = dict.fromkeys(remaining, 0.0), 0.0
        for ids, doc in batches:
            ids, doc = ids.to(device), doc.to(device)
            full = model(ids, document_ids=doc).float()
            den += float(full.square().sum())
            for u in remaining:
                drop = tuple(i for v in (*dropped, u) for i in units[v])
                out = model(ids, Subnet.uniform(cfg, drop_layers=drop), document_ids=doc).float()
                num[u] += float((full - out).square().sum())
        u = min(remaining, key=lambda v: (num[v], v))
        dropped.append(u)
        scores[u] = num[u] / max(den, 1e-30)
    dropped.append(next(u for u in range(len(units)) if u not in dropped))
    return [i for u in dropped for i in units[u]], [scores[i // unit] for i in range(cfg.num_layers)]


def auto_depth_rounds(config: ModelConfig, unit: int | None = None) -> int:
    """Rounds of the iterative depth metric, removing ``unit`` blocks at a time (default
    :attr:`ModelConfig.depth_unit`), that the default depth choices can use: the most units that ``elasticlm
    prune`` (``MAX_DEPTH_DROP``) or the default ``elastic.depth`` choices drop — plus one for single blocks in a
    model with attention, whose drop order moves the most important attention layer last (which brings the next
    layer of the order forward). An ``elastic.depth`` that drops more layers needs ``--depth-rounds`` of at
    least that many."""
    from .prune import MAX_DEPTH_DROP
    from .space import DEFAULT_DEPTH_FRACTIONS, _resolve_choice

    n, step = config.num_layers, config.depth_unit
    unit = step if unit is None else unit
    prune_drop = int(MAX_DEPTH_DROP * n) // step * step
    elastic_drop = n - min(_resolve_choice(f, n, "elastic.depth", step) for f in DEFAULT_DEPTH_FRACTIONS)
    margin = 1 if unit == 1 and ATTENTION in config.pattern else 0
    return max(1, min(n // unit - 1, max(prune_drop, elastic_drop) // unit + margin))


def depth_evaluations(num_layers: int, rounds: int, groups: int = 1, unit: int = 1) -> int:
    """Layer evaluations per sequence of :func:`depth_mse_rounds` for ``rounds`` rounds: the parent's reference
    pass (``num_layers``), then per round with m units left ``m - 1 + m(m - 1)/2`` unit evaluations (the current
    model's sweep up to its last candidate, each candidate's suffix) of ``unit`` layers each — with candidates in
    ``groups`` groups, the sweep runs once per group."""
    total = 0
    units = num_layers // unit
    for r in range(rounds):
        m = units - r
        g = min(groups, m)
        size = -(-m // g)
        for start in range(0, m, size):
            last = min(start + size, m) - 1
            total += last + sum(m - 1 - p for p in range(start, last + 1))
    return num_layers + total * unit


class _DepthData:
    """One calibration batch prepared for the depth metrics: the parent's final-norm output (float64) and the
    document masks and rotary tables of the batch stacked ``k`` times (built once per ``k``)."""

    def __init__(self, model: HybridLM, ids: torch.Tensor, doc: torch.Tensor) -> None:
        self.model, self.ids, self.doc = model, ids, doc
        self._ctx: dict[int, tuple[DocumentMask, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.full = model.norm_f(_run(model, self, model.embeddings(ids), range(model.config.num_layers))).double()

    def context(self, copies: int, dtype: torch.dtype) -> tuple[DocumentMask, tuple[torch.Tensor, torch.Tensor] | None]:
        if copies not in self._ctx:
            docs = DocumentMask.from_ids(self.doc.repeat(copies, 1), self.model.config.mamba.conv_kernel)
            rotary = None
            if self.model.config.rope_parameters is not None:
                rotary = self.model.rotary(self.model.positions(self.ids.repeat(copies, 1), None, docs), dtype)
            self._ctx[copies] = (docs, rotary)
        return self._ctx[copies]


def _run(model: HybridLM, data: _DepthData, x: torch.Tensor, layers: Iterable[int]) -> torch.Tensor:
    """``layers`` of the parent at full width on ``x`` (one or more stacked copies of the batch), as
    :meth:`HybridLM.forward` runs them."""
    full = model.check_subnet(None)
    copies = x.shape[0] // data.ids.shape[0]
    documents, rotary = data.context(copies, x.dtype)
    for i in layers:
        x = model.layers[i](x, full.layers[i], None, i, documents, None, None, None, rotary)
    return x


def _head_gram(model: HybridLM) -> torch.Tensor:
    """``WᵀW`` (float64) of the output projection, accumulated over vocabulary slices to bound memory."""
    w = model.head_weight()
    gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=w.device)
    for part in w.split(8192):
        part = part.double()
        gram += part.T @ part
    return gram


def _quadratic(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """``Σ_tokens δᵀ G δ``: the squared norm of ``δ``'s logits."""
    flat = delta.reshape(-1, delta.shape[-1])
    return float(((flat @ gram) * flat).sum())


@torch.no_grad()
def depth_mse_rounds(model: HybridLM, batches: list[Batch], rounds: int, *, unit: int = 1,
                     stack_rows: int = STACK_ROWS, state_bytes: int = STATE_BYTES,
                     bar: tqdm | None = None,
                     amp: torch.dtype | None = None) -> tuple[list[int], list[dict[int, float]]]:
    """``rounds`` rounds of the iterative normalized MSE over units of ``unit`` consecutive blocks: the units
    dropped, in order, and every round's scores ``{unit: Σ(M_full − M_−(dropped ∪ {unit}))² / Σ M_full²}`` —
    the first round's are the one-shot scores. Equal to whole-model forwards (:func:`layer_mse`, to float
    rounding) at the cost of :func:`depth_evaluations`. ``amp``: run the blocks under autocast to that dtype
    (bf16: about 2.5x faster on CPUs with AMX), the reference output included, so that both sides of every
    difference carry the same rounding; the differences and sums stay in float64."""
    device = model.device
    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return _depth_mse_rounds(model, batches, rounds, unit, stack_rows, state_bytes, bar)


def _depth_mse_rounds(model: HybridLM, batches: list[Batch], rounds: int, unit: int, stack_rows: int,
                      state_bytes: int, bar: tqdm | None) -> tuple[list[int], list[dict[int, float]]]:
    cfg = model.config
    units = _units(cfg.num_layers, unit)
    if not 1 <= rounds <= max(1, len(units) - 1):
        raise ConfigError(f"depth rounds must be in [1, {max(1, len(units) - 1)}] for {len(units)} layers, "
                          f"got {rounds}")
    device = model.device
    gram = _head_gram(model)
    data = [_DepthData(model, ids.to(device), doc.to(device)) for ids, doc in batches]
    den = sum(_quadratic(d.full, gram) for d in data)
    if bar is not None:
        bar.update(cfg.num_layers * sum(d.ids.shape[0] for d in data))
    dropped: list[int] = []
    history: list[dict[int, float]] = []
    for _ in range(rounds):
        remaining = [u for u in range(len(units)) if u not in dropped]
        num = dict.fromkeys(remaining, 0.0)
        for d in data:
            b, t = d.ids.shape
            per_state = b * t * cfg.hidden_size * model.embeddings.weight.element_size()
            size = max(1, min(len(remaining), state_bytes // max(per_state, 1)))
            for start in range(0, len(remaining), size):
                group = remaining[start:start + size]
                for u, state in _sweep(model, d, units, remaining, group, stack_rows, bar):
                    num[u] += _quadratic(model.norm_f(state).double() - d.full, gram)
        mse = {u: num[u] / max(den, 1e-30) for u in remaining}
        history.append(mse)
        dropped.append(min(mse, key=lambda k: (mse[k], k)))
    return dropped, history


def _sweep(model: HybridLM, data: _DepthData, units: list[tuple[int, ...]], remaining: list[int],
           group: list[int], stack_rows: int, bar: tqdm | None) -> Iterator[tuple[int, torch.Tensor]]:
    """The final hidden states of "the current model (units ``remaining``) without unit u", for every u in
    ``group``: one pass through the current model, each candidate's suffix stacked with it."""
    b = data.ids.shape[0]
    per_call = max(1, stack_rows // b)
    current: torch.Tensor | None = model.embeddings(data.ids)
    spawned: list[int] = []
    states: list[torch.Tensor] = []
    last = group[-1]
    for u in remaining:
        if current is not None and u in group:
            spawned.append(u)
            states.append(current)  # "without u" skips u: it carries the state at u's input past it
            current = None if u == last else current
            ran = states[:-1]
        else:
            ran = states
        inputs = ([current] if current is not None else []) + ran
        outputs: list[torch.Tensor] = []
        for k in range(0, len(inputs), per_call):
            part = inputs[k:k + per_call]
            y = _run(model, data, torch.cat(part) if len(part) > 1 else part[0], units[u])
            outputs.extend(y.split(b))
        if current is not None:
            current = outputs.pop(0)
        states[:len(ran)] = outputs
        if bar is not None:
            bar.update(len(inputs) * b * len(units[u]))
    return zip(spawned, states, strict=True)


def iterative_depth_order(model: HybridLM, batches: list[Batch], rounds: int | None = None, progress: bool = True,
                          unit: int = 1, **kwargs: Any) -> tuple[list[int], list[float | None], list[dict[int, float]]]:
    """Drop the least important unit of ``unit`` blocks, re-score the rest against the full model, repeat — for
    ``rounds`` rounds (None: until one unit is left, the whole order). Returns the removal order of the blocks
    (least important first; a unit's blocks together), each block's score (its unit's, in the round the unit was
    dropped) and every round's scores by unit. With fewer rounds, the units never dropped follow in the order of
    the last round's scores, and keep that round's score."""
    n = model.config.num_layers
    count = n // unit
    rounds = max(1, count - 1) if rounds is None else rounds
    total = depth_evaluations(n, rounds, unit=unit) * sum(ids.shape[0] for ids, _ in batches)
    with tqdm(total=total, desc="depth (iterative MSE)", unit="seq-layer", disable=not progress) as bar:
        dropped, history = depth_mse_rounds(model, batches, rounds, unit=unit, bar=bar, **kwargs)
    scores: list[float | None] = [None] * count
    for u, mse in zip(dropped, history, strict=True):
        scores[u] = mse[u]
    last = history[-1]
    rest = sorted((u for u in range(count) if u not in dropped), key=lambda u: (last[u], u))
    if len(rest) > 1:
        for u in rest:
            scores[u] = last[u]
    # the last unit standing after every round is never scored: its score stays None
    order = [i for u in dropped + rest for i in range(u * unit, (u + 1) * unit)]
    return order, [scores[i // unit] for i in range(n)], history


def estimate(model: HybridLM, calibration: Iterator[Batch], *, total_batches: int | None = None,
             depth_batches: int = 4, metrics: tuple[str, ...] = DEPTH_METRICS, progress: bool = True,
             meta: dict[str, Any] | None = None, depth_rounds: int | None = None,
             depth_unit: int = 1, depth_dtype: torch.dtype | None = None) -> Importance:
    """Every score: one streaming width pass over ``calibration`` (its first ``depth_batches``
    batches are kept for the depth metrics, which need many forward passes).

    The MSE depth metrics remove ``depth_unit`` consecutive blocks at a time (1: every block alone;
    :attr:`ModelConfig.depth_unit`: what the depth choices drop, a transformer's whole decoder layers).
    ``depth_rounds``: rounds of the iterative MSE (None: all, the complete order; :func:`auto_depth_rounds`:
    what the default depth choices use); the one-shot MSE is its first round. ``depth_dtype``: the MSE metrics'
    autocast dtype (None: float32; see :func:`depth_mse_rounds`)."""
    unknown = sorted(set(metrics) - set(DEPTH_METRICS))
    if unknown:
        raise ConfigError(f"unknown depth metric(s) {unknown}; choose from {list(DEPTH_METRICS)}")
    n = model.config.num_layers
    count = len(_units(n, depth_unit))
    if depth_rounds is not None and not 1 <= depth_rounds <= max(1, count - 1):
        raise ConfigError(f"depth rounds must be in [1, {max(1, count - 1)}] for a model of {count} layers, "
                          f"got {depth_rounds}")
    kept: list[Batch] = []

    def tee() -> Iterator[Batch]:
        for batch in calibration:
            if len(kept) < depth_batches:
                kept.append(batch)
            yield batch

    start = time.perf_counter()
    hidden, layers, cosine = width_importance(model, tee(), total_batches, progress)
    width_s = time.perf_counter() - start
    imp = Importance(hidden, layers, meta=dict(meta or {}))
    if "cosine" in metrics:
        imp.depth["cosine"] = sorted(range(len(cosine)), key=lambda j: (cosine[j], j))
        imp.depth_scores["cosine"] = cosine
    if not {"oneshot_mse", "iterative_mse"} & set(metrics):
        return imp
    rounds = (max(1, count - 1) if depth_rounds is None else depth_rounds) if "iterative_mse" in metrics else 1
    sequences = sum(ids.shape[0] for ids, _ in kept)
    evaluations = depth_evaluations(n, rounds, unit=depth_unit)
    what = "layers" if depth_unit == 1 else f"layers of {depth_unit} blocks"
    if progress:
        # the width pass ran every layer once per calibration sequence: its pace gives the estimate
        width_sequences = max(1, (total_batches or len(kept)) * (kept[0][0].shape[0] if kept else 1))
        per = width_s / (width_sequences * max(n, 1))
        tqdm.write(f"depth MSE: {rounds} of {max(1, count - 1)} rounds over {count} {what} on {sequences} "
                   f"sequences = {evaluations * sequences:,} block evaluations (≈ {evaluations / max(n, 1):.0f} "
                   f"whole-model forwards per sequence), estimated {_duration(per * evaluations * sequences)}"
                   + (" at the fp32 pace of the width pass (bf16 autocast: less)" if depth_dtype is not None else ""),
                   file=sys.stderr)
    was = model.training
    model.eval()
    try:
        order, scores, history = iterative_depth_order(model, kept, rounds, progress, depth_unit, amp=depth_dtype)
    finally:
        model.train(was)
    if "oneshot_mse" in metrics:
        mse = history[0]
        imp.depth["oneshot_mse"] = [i for u in sorted(mse, key=lambda u: (mse[u], u))
                                    for i in range(u * depth_unit, (u + 1) * depth_unit)]
        imp.depth_scores["oneshot_mse"] = [mse[i // depth_unit] for i in range(n)]
    if "iterative_mse" in metrics:
        imp.depth["iterative_mse"] = order
        imp.depth_scores["iterative_mse"] = scores
        imp.meta["iterative_mse_rounds"] = rounds
        if rounds < count - 1:
            imp.meta["iterative_mse_note"] = (
                f"only the first {rounds} {what} of the iterative order were dropped one by one (--depth-rounds); "
                f"the other {count - rounds} follow in the order of round {rounds}'s scores")
    imp.meta["depth_unit"] = depth_unit
    imp.meta["depth_dtype"] = "bfloat16" if depth_dtype == torch.bfloat16 else "float32"
    imp.meta["depth_block_evaluations"] = evaluations * sequences
    return imp


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


__all__ = ["DEPTH_METRICS", "Importance", "auto_depth_rounds", "calibration_batches", "depth_evaluations",
           "depth_mse_rounds", "estimate", "iterative_depth_order", "layer_mse", "width_importance"]
