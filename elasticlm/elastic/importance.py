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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import ModelConfig, Subnet
from ..data.datasets import DataConfig, PackedStream, documents
from ..errors import CheckpointError, ConfigError
from ..kinds import LayerKind, Run, kind_of
from ..model.documents import document_ids_from_eos
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
    """Point every observer at ``recorder``; returns the function that detaches them."""
    hooked: list[Any] = []

    def hook(obj: Any, layer: int) -> None:
        obj.observer = lambda name, act: recorder.observe(layer, name, act)
        hooked.append(obj)

    for i, block in enumerate(model.layers):
        hook(block, i)
        hook(block.mixer, i)
    hook(model, -1)

    def detach() -> None:
        for obj in hooked:
            obj.__dict__.pop("observer", None)

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
    device = model.embeddings.weight.device
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
        layers.append(unit_scores(kind, kind.inner(cfg, cfg.layer_widths(i)), recorder.agg(i, kind.observed)))
    cosine = [1.0 - float(c) / recorder.tokens for c in recorder.cos_sum]
    return hidden, layers, cosine


# -- depth scores ------------------------------------------------------------------------------


@torch.no_grad()
def layer_mse(model: HybridLM, batches: list[Batch], dropped: set[int] = frozenset(),  # type: ignore[assignment]
              candidates: list[int] | None = None) -> dict[int, float]:
    """``Σ(M_full − M_−(dropped ∪ {j}))² / Σ M_full²`` for every candidate layer ``j``."""
    cfg = model.config
    candidates = [j for j in range(cfg.num_layers) if j not in dropped] if candidates is None else candidates
    device = model.embeddings.weight.device
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


@torch.no_grad()
def iterative_depth_order(model: HybridLM, batches: list[Batch],
                          progress: bool = True) -> tuple[list[int], list[float | None]]:
    """Drop the least important layer, re-score the rest against the full model, repeat.
    Returns the removal order (least important first) and each layer's score when it was dropped."""
    n = model.config.num_layers
    dropped: list[int] = []
    scores: list[float | None] = [None] * n
    bar = tqdm(total=n - 1, desc="depth (iterative MSE)", unit="layer", disable=not progress)
    while len(dropped) < n - 1:
        mse = layer_mse(model, batches, set(dropped))
        j = min(mse, key=lambda k: (mse[k], k))
        dropped.append(j)
        scores[j] = mse[j]
        bar.update()
    bar.close()
    last = next(i for i in range(n) if i not in dropped)
    # the last layer standing is never scored: its score stays None
    return dropped + [last], scores


def estimate(model: HybridLM, calibration: Iterator[Batch], *, total_batches: int | None = None,
             depth_batches: int = 4, metrics: tuple[str, ...] = DEPTH_METRICS, progress: bool = True,
             meta: dict[str, Any] | None = None) -> Importance:
    """Every score: one streaming width pass over ``calibration`` (its first ``depth_batches``
    batches are kept for the depth metrics, which need many forward passes)."""
    unknown = sorted(set(metrics) - set(DEPTH_METRICS))
    if unknown:
        raise ConfigError(f"unknown depth metric(s) {unknown}; choose from {list(DEPTH_METRICS)}")
    kept: list[Batch] = []

    def tee() -> Iterator[Batch]:
        for batch in calibration:
            if len(kept) < depth_batches:
                kept.append(batch)
            yield batch

    hidden, layers, cosine = width_importance(model, tee(), total_batches, progress)
    imp = Importance(hidden, layers, meta=dict(meta or {}))
    was = model.training
    model.eval()
    try:
        if "cosine" in metrics:
            imp.depth["cosine"] = sorted(range(len(cosine)), key=lambda j: (cosine[j], j))
            imp.depth_scores["cosine"] = cosine
        if "oneshot_mse" in metrics:
            mse = layer_mse(model, kept)
            imp.depth["oneshot_mse"] = sorted(mse, key=lambda j: (mse[j], j))
            imp.depth_scores["oneshot_mse"] = [mse[j] for j in range(len(mse))]
        if "iterative_mse" in metrics:
            order, scores = iterative_depth_order(model, kept, progress)
            imp.depth["iterative_mse"] = order
            imp.depth_scores["iterative_mse"] = scores
    finally:
        model.train(was)
    return imp


__all__ = ["DEPTH_METRICS", "Importance", "calibration_batches", "estimate", "iterative_depth_order",
           "layer_mse", "width_importance"]
