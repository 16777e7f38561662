"""The one training loop. Parent pretraining (:mod:`elasticlm.train.pretrain`) and elastic distillation
(:mod:`elasticlm.train.elastic`) are :class:`Objective` s plugged into :func:`fit`, which owns everything they
share: the step loop over phases (elastic stages), gradient accumulation and data-parallel micro-batches,
AdamW with linear warm-up and cosine decay, clipping, the non-finite-loss guard, JSONL/TensorBoard metrics
and the progress bar, periodic evaluation, atomic (or FSDP2-sharded) checkpoints with rotation, exact
``--resume`` (same losses, same weights as an uninterrupted run) and the checkpoint kept at the end of every
phase but the last.

    out = Path(cfg.out)
    ckpt = open_run(out, resume=..., resume_from=...)       # checks only: nothing written yet
    check_resume(ckpt, compat_record, allow_change)         # before anything is written
    objective = MyObjective(...)                    # builds models, optimizers, validation batches
    fit(objective, cfg, stream, out=out, tokenizer_dir=..., resumed_from=ckpt, dist=dist, device=device)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoint import atomic_directory, read_json
from ..data.datasets import PackedStream
from ..errors import CheckpointError, ConfigError, OutputError
from ..model.hybrid import HybridLM
from ..outputs import atomic_file, clean_stale
from .checkpoint import (
    STATE,
    Parts,
    checkpoint_dir,
    latest,
    load_training_checkpoint,
    rotate,
    save_sharded_checkpoint,
    save_training_checkpoint,
)
from .config import TrainConfig
from .distributed import Distributed, barrier, mean_over_ranks, rows_of

log = logging.getLogger("elasticlm.train")


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_dtype(name: str, device: torch.device, model: HybridLM | None = None,
                   shape: tuple[int, int] = (1, 256), setting: str = "train.dtype") -> torch.dtype | None:
    """The autocast dtype of ``train.dtype``: ``bfloat16`` / ``float32`` as given; ``auto`` = bf16 on CUDA,
    and on a CPU bf16 only where it measurably pays (:func:`bf16_pays_on_cpu`: some CPUs run bf16 matmuls
    4x faster than fp32, others 100x slower)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu" and model is not None and bf16_pays_on_cpu(model, shape, setting=setting):
            return torch.bfloat16
        return None
    return torch.bfloat16 if name == "bfloat16" else None


def run_autocast(name: str, device: torch.device, model: HybridLM, shape: tuple[int, int],
                 resumed_from: Path | None) -> torch.dtype | None:
    """The run's autocast dtype: what the checkpoint it resumes from recorded (``auto`` measures, and a second
    measurement could choose differently), else :func:`autocast_dtype`."""
    if resumed_from is not None:
        recorded = read_json(resumed_from / STATE).get("amp")
        if recorded is not None:
            return amp_from_record(recorded)
    return autocast_dtype(name, device, model, shape)


def amp_record(amp: torch.dtype | None) -> str:
    """The autocast dtype as trainer_state.json records it."""
    return "bfloat16" if amp == torch.bfloat16 else "none"


def amp_from_record(text: str) -> torch.dtype | None:
    return torch.bfloat16 if text == "bfloat16" else None


def bf16_pays_on_cpu(model: HybridLM, shape: tuple[int, int], threshold: float = 1.25,
                     setting: str = "train.dtype") -> bool:
    """Time one forward + backward of ``model`` on a random ``[rows, seq]`` batch in fp32 and under bf16
    autocast (5 alternating pairs after a warm-up, a few seconds at most) and say whether bf16 is at least
    ``threshold``x faster. The decision and both timings are logged."""
    import statistics

    rows, seq = shape
    rows, seq = max(1, min(rows, 4)), max(8, min(seq, 1024))  # enough to see the matmuls, short enough to be cheap
    # its own generator: the measurement must not move the run's random stream (router init, data, noise)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    cpu_flags = _cpu_flags()
    if "avx512_bf16" not in cpu_flags and "amx_bf16" not in cpu_flags:
        log.info("%s auto: fp32 (this CPU has no AVX512-BF16 / AMX: bf16 matmuls are emulated)", setting)
        return False

    def step(amp: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, head=lambda h, w: F.linear(h[:, -8:], w).float().logsumexp(-1).mean())
        loss.backward()
        return time.perf_counter() - t0

    for amp in (False, True):
        step(amp)  # warm-up
    # alternate the two so that load from other processes hits both alike; decide on the median ratio
    pairs = [(step(False), step(True)) for _ in range(5)]
    model.zero_grad(set_to_none=True)
    ratio = paired_speedup(pairs)
    choice = ratio >= threshold
    log.info("%s auto: %s (a step took %.0f ms in fp32, %.0f ms under bf16 autocast: %.2fx, median of 5 "
             "alternating pairs; set %s to override)", setting, "bf16 autocast" if choice else "fp32",
             1e3 * statistics.median(a for a, _ in pairs), 1e3 * statistics.median(b for _, b in pairs), ratio,
             setting)
    return choice


def paired_speedup(pairs: list[tuple[float, float]]) -> float:
    """The median over ``(fp32 seconds, bf16 seconds)`` pairs of fp32 / bf16: one pair hit by a burst of other
    load does not decide, as it can when each dtype's median is taken on its own.

    >>> paired_speedup([(1.0, 0.5), (1.0, 1.0), (3.0, 1.0)])
    2.0
    """
    import statistics

    return statistics.median(a / b for a, b in pairs)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_optimizer(model: HybridLM, cfg: Any) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, SSM scalars or conv kernels)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=False)


class MetricsLog:
    """JSONL metrics (one object per line) and, if installed, TensorBoard scalars."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines beyond the checkpoint
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            with contextlib.suppress(ImportError, ModuleNotFoundError):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, **values: float) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass(frozen=True)
class Phase:
    """A span of steps with one context length and global batch (an elastic stage; pretraining has one)."""

    index: int
    name: str
    seq_len: int
    batch_size: int
    steps: int


class Objective:
    """What one kind of training plugs into :func:`fit`.

    Subclasses set the attributes and implement :meth:`micro_loss` and :meth:`evaluate`; the other hooks have
    defaults that suit a model trained alone.
    """

    model: HybridLM  # the trained model: a checkpoint's model directory, its gradients are clipped
    module: nn.Module  # what the loop puts in train mode and whose no_sync() it uses (a DDP wrapper, if any)
    parts: Parts  # every trained module and its optimizer, "model" first
    amp: torch.dtype | None = None
    sharded: bool = False  # FSDP2: every rank takes part in checkpoints and evaluation
    phases: list[Phase]
    compat: dict[str, Any]  # what a resume must not change (see check_resume)
    say = staticmethod(print)  # set by fit(): prints above the progress bar

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase(self, step: int) -> Phase:
        """The phase that trains step ``step`` (0-based; the last phase for steps beyond the end)."""
        end = 0
        for p in self.phases:
            end += p.steps
            if step < end:
                return p
        return self.phases[-1]

    def set_learning_rates(self, step: int, lr: float) -> dict[str, float]:
        """Set this step's learning rates (``lr`` is the model's, from the shared schedule); returns any
        other rate to log."""
        for group in self.parts["model"][1].param_groups:
            group["lr"] = lr
        return {}

    def begin_step(self, step: int, phase: Phase, micro: int, dist: Distributed) -> None:
        """Called once per optimizer step, before its micro-batches."""

    def micro_loss(self, step: int, micro_step: int, rows: slice, tokens: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of this rank's rows ``rows`` of the global batch (``tokens``, ``mask``: those rows,
        ``[micro, seq_len + 1]``) and statistics for :meth:`step_metrics`."""
        raise NotImplementedError

    def before_update(self) -> None:
        """After the gradients of a step are complete, before clipping (e.g. average replicated gradients)."""

    def after_update(self) -> None:
        """After the optimizer step (e.g. a constraint on the weights that the step must not undo)."""

    def step_metrics(self, step: int, phase: Phase, stats: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra metrics of a logged step from its micro-steps' statistics. A micro-step's ``aux_loss`` (the
        weighted part of its loss that is not the language model's, identical on every rank) is reported by
        the trainer as ``lm_loss`` = ``loss`` − its mean."""
        return {}

    def postfix(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.3f} | lr {row['lr']:.2e} | tok/s {row['tok_s']:,.0f}"

    def evaluate(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def write_files(self, directory: Path) -> None:
        """Extra files of every checkpoint (written before trainer_state.json)."""

    def finish(self, out: Path, dist: Distributed) -> None:
        """Write ``out / "final"`` (every rank calls this)."""
        raise NotImplementedError


def open_run(out: Path, *, resume: bool, resume_from: str | Path | None = None,
             dist: Distributed | None = None) -> Path | None:
    """Check the output directory against ``--resume`` / ``--resume-from`` and return the checkpoint to resume
    from, if any. Writes nothing (a run that fails while setting up leaves no trace); removes what crashed
    writers left there (rank 0)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"train.out {out} is a file, not a directory; give a directory")
    if dist is None or dist.main:
        for place in (out, out / "checkpoints", out / "stages"):
            clean_stale(place)
    ckpt = latest(out) if resume else None
    if resume and ckpt is None:
        raise CheckpointError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").glob("step_*")):
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue, or choose another train.out")
    if not resume and out.is_dir() and any(out.iterdir()) and not (out / "run_config.json").is_file():
        raise OutputError(f"train.out {out} already holds other files; choose an empty or new directory")
    if resume_from is not None:
        if resume:
            raise ConfigError("give either --resume or --resume-from, not both")
        ckpt = Path(resume_from)
        if not (ckpt / STATE).is_file():
            raise CheckpointError(f"--resume-from {ckpt}: not a training checkpoint (no {STATE}); use "
                                  "checkpoints/step_* or stages/* of a run")
    return ckpt


@contextlib.contextmanager
def removed_unless_resumable(out: Path, main: bool = True) -> Any:
    """Remove ``out`` if the block fails before the run wrote a complete checkpoint into a directory that did not
    exist when the block began (a full disk in the first steps leaves nothing behind). A run with a checkpoint
    stays, since ``--resume`` can continue it; so does a directory that was there before."""
    fresh = main and not out.exists()
    try:
        yield
    except BaseException:
        if fresh and out.exists() and latest(out) is None:
            log.warning("removing %s: the run stopped before its first complete checkpoint", out)
            shutil.rmtree(out, ignore_errors=True)
        raise


def _flat(record: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(record, dict):
        out: dict[str, Any] = {}
        for k, v in record.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(record, list) and any(isinstance(v, dict) for v in record):
        out = {}
        for i, v in enumerate(record):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: record}


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields in which two compatibility records differ, as ``field: old → new``.

    >>> config_changes({"elastic": {"budgets": [1.0, 0.6]}}, {"elastic": {"budgets": [1.0, 0.5]}})
    ['elastic.budgets: [1.0, 0.6] → [1.0, 0.5]']
    """
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(now)))
    missing = "(unset)"
    return [f"{k}: {a.get(k, missing)} → {b.get(k, missing)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _labelled(change: str, labels: dict[str, str]) -> str:
    """``change`` with every recorded value that has a label written as ``label (value)``.

    >>> _labelled("elastic.budgets: ['params 10', 'params 5'] → ['params 10', 'params 6']",
    ...           {"params 5": "0.5", "params 6": "0.6"})
    "elastic.budgets: ['params 10', 0.5 (params 5)] → ['params 10', 0.6 (params 6)]"
    """
    for value, label in labels.items():
        change = change.replace(repr(value), f"{label} ({value})")
    return change


def check_resume(ckpt: Path | None, record: dict[str, Any], allow_change: bool, branch: bool = False,
                 normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Refuse to resume ``ckpt`` under a config whose compatibility ``record`` (what a checkpoint's meaning
    depends on: architecture, elastic space with budgets by value, stages, data, …) differs from the one the
    checkpoint recorded, naming every differing field — unless ``allow_change`` (``--allow-config-change``).
    ``branch`` (``--resume-from``): the stages after the checkpoint's may differ (that is what a branch is for).
    ``normalize`` rewrites the recorded one into the current layout first (records of older versions)."""
    if ckpt is None:
        return
    state = read_json(ckpt / STATE)
    saved = state.get("compat")
    if saved is None:  # written before checkpoints recorded it
        return
    if normalize is not None:
        saved = normalize(saved)
    # "_labels": how the user wrote a recorded value (the budget "0.75" for "params 145302"); shown, not compared
    saved, record = dict(saved), dict(record)
    labels = {**saved.pop("_labels", {}), **record.pop("_labels", {})}
    changes = [_labelled(c, labels) for c in config_changes(saved, record)]
    if branch:
        done = int(state.get("stage", 0))
        later = re.compile(r"^stages(\[(\d+)\])?")
        changes = [c for c in changes if not ((m := later.match(c)) and (m.group(2) is None or int(m.group(2)) > done))]
    if changes and not allow_change:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(f"the config differs from the one {ckpt} was trained with: {shown}. Resume with the "
                          "same config, or pass --allow-config-change if the change is deliberate")
    if changes:
        log.warning("resuming %s under a changed config (--allow-config-change): %s", ckpt, "; ".join(changes))


def fit(objective: Objective, cfg: TrainConfig, stream: PackedStream, *, out: Path, tokenizer_dir: Path,
        run_config: dict[str, Any], resumed_from: Path | None = None, dist: Distributed | None = None,
        device: torch.device | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``objective`` for its phases from ``stream`` (or continue from the checkpoint ``resumed_from``);
    returns the last logged metrics and evaluation. Under torchrun every rank calls this with the same
    stream: each trains its rows of every global batch (:func:`rows_of`). The caller has written nothing
    yet but the tokenizer; ``run_config`` is recorded as ``run_config.json`` here."""
    dist = dist or Distributed()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_file(out / "run_config.json", json.dumps(run_config, indent=2) + "\n")
    device = device or objective.model.device
    obj, total = objective, objective.total_steps
    schedule = dataclasses.replace(cfg, steps=total)  # warm-up and cosine decay over all phases
    start = 0
    if resumed_from is not None:  # every rank loads the same checkpoint (its own shards of it when sharded)
        state = load_training_checkpoint(resumed_from, obj.parts, obj.sharded)
        start = int(state["step"])
        stream.load_state_dict(state["data"])
        if dist.main:
            log.info("resumed from %s (step %d of %d)", resumed_from, start, total)
    metrics = MetricsLog(out, start if resumed_from is not None else None, cfg.tensorboard) if dist.main else None
    bar = tqdm(total=total, initial=start, disable=not (progress and dist.main), unit="step", dynamic_ncols=True)
    obj.say = bar.write
    many_phases = len(obj.phases) > 1
    last: dict[str, Any] = {}
    t_log, tok_log = time.perf_counter(), 0
    obj.module.train()
    try:
        for step in range(start, total):
            phase = obj.phase(step)
            if (stream.seq_len, stream.batch_size) != (phase.seq_len, phase.batch_size):
                stream.seq_len, stream.batch_size = phase.seq_len, phase.batch_size
                if many_phases:
                    bar.write(f"stage {phase.index + 1}/{len(obj.phases)} ({phase.name or 'unnamed'}): "
                              f"seq_len {phase.seq_len}, batch {phase.batch_size}, {phase.steps} steps")
            lr = lr_at(step, schedule)
            rates = obj.set_learning_rates(step, lr)
            tokens, mask = (t.to(device) for t in stream.next_masked_batch())
            micro = phase.batch_size // (cfg.grad_accum * dist.world)
            if micro < 1:
                raise ConfigError(f"stage {phase.index + 1}: batch_size {phase.batch_size} is smaller than "
                                  f"grad_accum × world size ({cfg.grad_accum} × {dist.world})")
            obj.begin_step(step, phase, micro, dist)
            loss_sum, stats = 0.0, []
            for a in range(cfg.grad_accum):
                rows = rows_of(dist.rank, dist.world, micro, a)
                sync = a == cfg.grad_accum - 1 or dist.world == 1
                no_sync = getattr(obj.module, "no_sync", None)
                with no_sync() if not sync and no_sync is not None else contextlib.nullcontext():
                    loss, st = obj.micro_loss(step, a, rows, tokens[rows], mask[rows])
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                stats.append(st)
            loss_sum = mean_over_ranks(loss_sum, dist, device)  # the global batch's loss, as one process logs it
            if not math.isfinite(loss_sum):
                raise ConfigError(f"the loss became {loss_sum} at step {step + 1}; lower train.lr or check the data")
            obj.before_update()
            grad_norm = torch.nn.utils.clip_grad_norm_(obj.model.parameters(), cfg.grad_clip or float("inf")).item()
            for _, opt in obj.parts.values():
                opt.step()
            for _, opt in obj.parts.values():
                opt.zero_grad(set_to_none=True)
            obj.after_update()
            done = step + 1
            tok_log += phase.batch_size * phase.seq_len
            bar.update(1)
            if metrics is not None and (done % cfg.log_every == 0 or done == total):
                elapsed = time.perf_counter() - t_log
                row: dict[str, Any] = {"loss": loss_sum, "lr": lr, **rates, "grad_norm": grad_norm,
                                       "tok_s": tok_log / max(elapsed, 1e-9)}
                aux = [st["aux_loss"] for st in stats if "aux_loss" in st]
                if aux:
                    row["lm_loss"] = loss_sum - sum(aux) / len(aux)
                row.update(obj.step_metrics(done, phase, stats))
                t_log, tok_log = time.perf_counter(), 0
                last = dict(row)
                metrics.write(done, **row)
                bar.set_postfix_str(obj.postfix(row))
            if (done % cfg.eval_every == 0 or done == total) and (dist.main or obj.sharded):
                evals = obj.evaluate(done)  # sharded weights: every rank takes part in each forward
                obj.module.train()
                if metrics is not None:
                    metrics.write(done, **evals)
                    last.update(evals)
                    bar.write(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in evals.items()))
            phase_done = done < total and obj.phase(done).index != phase.index
            if done % cfg.checkpoint_every == 0 or done == total or phase_done:
                state = {"step": done, "stage": phase.index, "data": stream.state_dict(), "amp": amp_record(obj.amp),
                         "compat": obj.compat}
                path = checkpoint_dir(out, done)
                if obj.sharded:
                    save_sharded_checkpoint(path, obj.parts, state, tokenizer_dir, dist, obj.write_files)
                elif dist.main:
                    save_training_checkpoint(path, obj.parts, state, tokenizer_dir, obj.write_files)
                if dist.main:
                    if phase_done:  # kept out of the rotation: evaluate it, or branch a run from it
                        keep = out / "stages" / f"{phase.index + 1}-{phase.name or 'stage'}"
                        with atomic_directory(keep, overwrite=True) as tmp:
                            # hard links: checkpoint files are never modified in place, so this costs no copy
                            shutil.copytree(path, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
                        bar.write(f"stage {phase.index + 1} done: {keep}")
                    rotate(out, cfg.keep_checkpoints)
                barrier(dist)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    obj.finish(out, dist)
    barrier(dist)
    return last


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)
