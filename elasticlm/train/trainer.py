"""Plain (non-elastic) language-model training of a HybridLM parent.

AdamW with linear warm-up and cosine decay, gradient accumulation and clipping, fp32 on CPU and
bf16 autocast on CUDA, periodic validation loss and task accuracy, a progress bar, JSONL metrics
(TensorBoard too when installed) and atomic checkpoints; ``resume=True`` continues exactly from
the newest complete checkpoint (same losses, same weights as an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import atomic_directory, read_json, write_model_files
from ..data.datasets import PackedStream, doc_text, documents
from ..errors import CheckpointError, ConfigError
from ..model.documents import document_ids_from_eos
from ..model.hybrid import HybridLM
from ..runtime import resolve_device
from ..tokenizer import byte_level_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from .checkpoint import STATE, latest, load_checkpoint, save_checkpoint
from .config import RunConfig
from .losses import ce_loss_from_hidden

log = logging.getLogger("elasticlm.train")


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_dtype(name: str, device: torch.device, model: HybridLM | None = None,
                   shape: tuple[int, int] = (1, 256)) -> torch.dtype | None:
    """The autocast dtype of ``train.dtype``: ``bfloat16`` / ``float32`` as given; ``auto`` = bf16 on CUDA,
    and on a CPU bf16 only where it measurably pays (:func:`bf16_pays_on_cpu`: some CPUs run bf16 matmuls
    4x faster than fp32, others 100x slower)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu" and model is not None and bf16_pays_on_cpu(model, shape):
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


def bf16_pays_on_cpu(model: HybridLM, shape: tuple[int, int], threshold: float = 1.25) -> bool:
    """Time one forward + backward of ``model`` on a random ``[rows, seq]`` batch in fp32 and under bf16
    autocast (median of 3 after a warm-up each, a few seconds at most) and say whether bf16 is at least
    ``threshold``x faster. The decision and both timings are logged."""
    import statistics

    rows, seq = shape
    rows, seq = max(1, min(rows, 4)), max(8, min(seq, 1024))  # enough to see the matmuls, short enough to be cheap
    # its own generator: the measurement must not move the run's random stream (router init, data, noise)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    cpu_flags = _cpu_flags()
    if "avx512_bf16" not in cpu_flags and "amx_bf16" not in cpu_flags:
        log.info("train.dtype auto: fp32 (this CPU has no AVX512-BF16 / AMX: bf16 matmuls are emulated)")
        return False

    def step(amp: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, head=lambda h, w: F.linear(h[:, -8:], w).float().logsumexp(-1).mean())
        loss.backward()
        return time.perf_counter() - t0

    times = {}
    for amp in (False, True):
        step(amp)
        times[amp] = statistics.median(step(amp) for _ in range(3))
    model.zero_grad(set_to_none=True)
    ratio = times[False] / times[True]
    choice = ratio >= threshold
    log.info("train.dtype auto: %s (a step took %.0f ms in fp32, %.0f ms under bf16 autocast: %.2fx; set "
             "train.dtype to override)", "bf16 autocast" if choice else "fp32", 1e3 * times[False],
             1e3 * times[True], ratio)
    return choice


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


def prepare_tokenizer(run: RunConfig, directory: Path) -> Any:
    """Build, train or load the tokenizer and save it into ``directory``."""
    cfg = run.tokenizer
    if cfg.kind == "bytes":
        tok = byte_level_tokenizer()
    elif cfg.kind == "file":
        tok = load_tokenizer(cfg.path or "")
    else:
        docs = documents(run.data, "train")(0)
        tok = train_bpe((doc_text(d) for _, d in zip(range(cfg.train_documents), docs, strict=False)),
                        cfg.vocab_size)
    if tok.get_vocab_size() > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.get_vocab_size()} tokens")
    eos = run.model.eos_token_id
    if eos is None or tok.id_to_token(eos) is None:
        raise ConfigError(f"model.eos_token_id={eos} is not a token of the tokenizer")
    save_tokenizer(tok, directory)
    return tok


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


def lm_loss(model: HybridLM, batch: tuple[torch.Tensor, torch.Tensor], amp: torch.dtype | None,
            eos_token_id: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets whose loss mask is set. With
    ``eos_token_id`` the packed documents are kept apart (each sees only itself)."""
    tokens, mask = batch
    inputs, targets, keep = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    doc_ids = document_ids_from_eos(inputs, eos_token_id) if eos_token_id is not None else None
    keep = keep.float()
    with torch.autocast(tokens.device.type, dtype=amp) if amp else contextlib.nullcontext():
        total = model(inputs, document_ids=doc_ids, head=lambda h, w: ce_loss_from_hidden(h, w, targets, keep))
    return total / keep.sum().clamp_min(1.0)


@torch.no_grad()
def validation_loss(model: HybridLM, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    amp: torch.dtype | None, eos_token_id: int | None = None) -> float:
    was = model.training
    model.eval()
    loss = sum(lm_loss(model, b, amp, eos_token_id).item() for b in batches) / len(batches)
    model.train(was)
    return loss


def pretrain(run: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a parent from scratch (or resume); returns the final metrics. Writes under train.out:
    ``run_config.json``, ``metrics.jsonl``, ``checkpoints/step_*`` and ``final/`` (a model directory)."""
    cfg = run.train
    out = Path(cfg.out)
    ckpt = latest(out) if resume else None
    if resume and ckpt is None:
        raise CheckpointError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").glob("step_*")):
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue, or choose another train.out")
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        saved = json.loads((out / "run_config.json").read_text()) if (out / "run_config.json").exists() else None
        if saved is not None and saved.get("model") != run.to_dict()["model"]:
            raise ConfigError(f"--resume: the [model] table differs from the one {out} was started with")
    (out / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")

    device = resolve_device(cfg.device, "train.device")
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    tok_dir = out / "tokenizer"
    if ckpt is not None:
        if not (tok_dir / "tokenizer.json").is_file():
            tok_dir.mkdir(exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (ckpt / name).is_file():
                    shutil.copy2(ckpt / name, tok_dir / name)
        tok = load_tokenizer(tok_dir)
    else:
        tok_dir.mkdir(exist_ok=True)
        tok = prepare_tokenizer(run, tok_dir)
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    eos = run.model.eos_token_id
    assert eos is not None

    model = HybridLM(run.model).to(device)
    amp = run_autocast(cfg.dtype, device, model, (max(1, cfg.batch_size // cfg.grad_accum), cfg.seq_len), ckpt)
    from .plan import Cluster, device_memory, plan_pretrain, resolve_checkpointing

    cluster = Cluster(memory=device_memory(device), device=device.type)
    model.activation_checkpointing = resolve_checkpointing(cfg.activation_checkpointing,
                                                           plan_pretrain(run, cluster))
    if model.activation_checkpointing:
        log.info("activation checkpointing: on (%s)", "train.activation_checkpointing" if
                 cfg.activation_checkpointing else "auto: the plan does not fit this device without it")
    if cfg.dtype == "bfloat16" and device.type == "cpu":
        log.warning("bf16 on CPU is ~100x slower than fp32 for matmuls; consider train.dtype=float32")
    opt = build_optimizer(model, cfg)
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not divisible by train.grad_accum={cfg.grad_accum}")
    doc_eos = eos if cfg.document_masking else None
    stream = PackedStream(documents(run.data, "train"), encode, eos, cfg.seq_len, micro)
    val_stream = PackedStream(documents(run.data, "val"), encode, eos, cfg.seq_len, micro)
    val_batches = [tuple(t.to(device) for t in val_stream.next_masked_batch()) for _ in range(cfg.val_batches)]

    start = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        start = int(state["step"])
        stream.load_state_dict(state["data"])
        log.info("resumed from %s (step %d)", ckpt, start)
    metrics = MetricsLog(out, start if ckpt is not None else None, cfg.tensorboard)
    synthetic = run.data.source == "synthetic" and run.eval.tasks

    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    t_log, n_log = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                loss = lm_loss(model, tuple(t.to(device) for t in stream.next_masked_batch()), amp, doc_eos)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
            if not math.isfinite(loss_sum):
                raise ConfigError(f"the loss became {loss_sum} at step {step + 1}; lower train.lr or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            n_log += 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - t_log
                tok_s = n_log * tokens_per_step / max(elapsed, 1e-9)
                t_log, n_log = time.perf_counter(), 0
                last = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tok_s": tok_s}
                metrics.write(done, **last)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                evals: dict[str, float] = {"val_loss": validation_loss(model, val_batches, amp, doc_eos)}
                if synthetic:
                    evals.update(_task_metrics(model, tok, run.eval.n, run.eval.hard))
                metrics.write(done, **evals)
                last.update(evals)
                bar.write(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in evals.items()))
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(out, done, model, opt, {"data": stream.state_dict(), "amp": amp_record(amp)}, tok_dir,
                                cfg.keep_checkpoints)
    finally:
        bar.close()
        metrics.close()
    with atomic_directory(out / "final", overwrite=True) as tmp:
        write_model_files(model, tmp, tokenizer_dir=tok_dir)
    return last


def _task_metrics(model: HybridLM, tok: Any, n: int, hard: bool) -> dict[str, float]:
    from ..eval.tasks import task_table

    table = task_table(model, tok, n=n, hard=hard)
    return {f"acc_{level}_{fam}": v for level, row in table.items() for fam, v in row.items()}

