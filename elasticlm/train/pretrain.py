"""Parent pretraining: next-token cross-entropy of a HybridLM from scratch, as an :class:`Objective` of the
one training loop (:func:`elasticlm.train.trainer.fit`), which brings the schedule, accumulation, clipping,
logging, evaluation, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_directory, write_model_files
from ..config import ModelConfig
from ..data.datasets import PackedStream, compat_data, doc_text, documents
from ..errors import ConfigError
from ..model.documents import document_ids_from_eos
from ..model.hybrid import HybridLM
from ..runtime import resolve_device
from ..tokenizer import batch_encoder, byte_level_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from .config import RunConfig
from .distributed import Distributed
from .losses import ce_loss_from_hidden
from .trainer import (
    Objective,
    Phase,
    build_optimizer,
    check_resume,
    fit,
    open_run,
    removed_unless_resumable,
    run_autocast,
)

log = logging.getLogger("elasticlm.train")


def prepare_tokenizer(run: RunConfig) -> Any:
    """Build, train or load the tokenizer (and check it against the model config)."""
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
    return tok


def lm_loss_sum(model: HybridLM, batch: tuple[torch.Tensor, torch.Tensor], amp: torch.dtype | None,
                eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the targets whose loss mask is set, and their count. With
    ``eos_token_id`` the packed documents are kept apart (each sees only itself)."""
    tokens, mask = batch
    inputs, targets, keep = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].float()
    doc_ids = document_ids_from_eos(inputs, eos_token_id) if eos_token_id is not None else None
    with torch.autocast(tokens.device.type, dtype=amp) if amp else contextlib.nullcontext():
        total = model(inputs, document_ids=doc_ids, head=lambda h, w: ce_loss_from_hidden(h, w, targets, keep))
    return total, keep.sum()


def lm_loss(model: HybridLM, batch: tuple[torch.Tensor, torch.Tensor], amp: torch.dtype | None,
            eos_token_id: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets whose loss mask is set."""
    total, count = lm_loss_sum(model, batch, amp, eos_token_id)
    return total / count.clamp_min(1.0)


@torch.no_grad()
def validation_loss(model: HybridLM, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    amp: torch.dtype | None, eos_token_id: int | None = None) -> float:
    """Cross-entropy per target token over all ``batches`` (a token mean, as the elastic trainer's per-budget
    validation loss is: batches with fewer loss tokens weigh less)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    for b in batches:
        s, n = lm_loss_sum(model, b, amp, eos_token_id)
        total, count = total + s.item(), count + n.item()
    model.train(was)
    return total / max(count, 1.0)


class LanguageModeling(Objective):
    """Next-token prediction of one model (no distributed training: one device)."""

    def __init__(self, run: RunConfig, model: HybridLM, amp: torch.dtype | None, tok: Any,
                 val_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        cfg = run.train
        self.run, self.model, self.module, self.amp, self.tok = run, model, model, amp, tok
        self.parts = {"model": (model, build_optimizer(model, cfg))}
        self.phases = [Phase(0, "", cfg.seq_len, cfg.batch_size, cfg.steps)]
        self.eos = run.model.eos_token_id if cfg.document_masking else None
        self.val_batches = val_batches

    def micro_loss(self, step: int, micro_step: int, rows: slice, tokens: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
        return lm_loss(self.model, (tokens, mask), self.amp, self.eos), {}

    def evaluate(self, step: int) -> dict[str, float]:
        evals = {"val_loss": validation_loss(self.model, self.val_batches, self.amp, self.eos)}
        if self.run.data.source == "synthetic" and self.run.eval.tasks:
            from ..eval.tasks import task_table

            table = task_table(self.model, self.tok, n=self.run.eval.n, hard=self.run.eval.hard)
            evals.update({f"acc_{level}_{fam}": v for level, row in table.items() for fam, v in row.items()})
        return evals

    def finish(self, out: Path, dist: Distributed) -> None:
        with atomic_directory(out / "final", overwrite=True) as tmp:
            write_model_files(self.model, tmp, tokenizer_dir=out / "tokenizer")


def _current_layout(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded compatibility record with its model in today's flat form: read like a config.json (every earlier
    layout reads: all fields flat; the MoE settings nested; the kinds' sections under ``model.sections``), then
    flattened again, so only a different architecture differs. A record that does not read as a config is left as
    it is (the comparison then names what differs)."""
    model = saved.get("model")
    if not isinstance(model, dict):
        return saved
    sections = model.get("sections")
    model = {k: v for k, v in model.items() if k != "sections"} | (sections if isinstance(sections, dict) else {})
    try:
        return {**saved, "model": ModelConfig.from_dict(model).flat_dict()[0]}
    except ConfigError:
        return saved


def compat_record(run: RunConfig) -> dict[str, Any]:
    """What a resumed pretraining run may not change (``--allow-config-change`` to do it anyway)."""
    d = run.to_dict()
    return {"model": run.model.flat_dict()[0], "tokenizer": d["tokenizer"], "data": compat_data(d["data"]),
            "train": {"seed": run.train.seed, "document_masking": run.train.document_masking}}


def pretrain(run: RunConfig, resume: bool = False, progress: bool = True,
             allow_config_change: bool = False) -> dict[str, Any]:
    """Train a parent from scratch (or resume); returns the final metrics. Writes under train.out:
    ``run_config.json``, ``metrics.jsonl``, ``checkpoints/step_*`` and ``final/`` (a model directory).
    Nothing is written before the inputs are checked."""
    cfg = run.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`elasticlm pretrain` trains on one device; run it without torchrun (data-parallel "
                          "training is `elasticlm train`)")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not divisible by train.grad_accum={cfg.grad_accum}")
    out = Path(cfg.out)
    ckpt = open_run(out, resume=resume)
    check_resume(ckpt, compat_record(run), allow_config_change, normalize=_current_layout)
    device = resolve_device(cfg.device, "train.device")
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    tok_dir = out / "tokenizer"
    if ckpt is not None:
        tok = load_tokenizer(tok_dir if (tok_dir / "tokenizer.json").is_file() else ckpt)
    else:
        tok = prepare_tokenizer(run)
    eos = run.model.eos_token_id
    assert eos is not None

    model = HybridLM(run.model).to(device)
    micro = cfg.batch_size // cfg.grad_accum
    amp = run_autocast(cfg.dtype, device, model, (micro, cfg.seq_len), ckpt)
    from .plan import Cluster, device_memory, plan_pretrain, preflight, resolve_checkpointing

    cluster = Cluster(memory=device_memory(device), device=device.type)
    plan = plan_pretrain(run, cluster, cfg.activation_checkpointing)
    preflight(plan, device.type)
    model.activation_checkpointing = resolve_checkpointing(cfg.activation_checkpointing, plan)
    if model.activation_checkpointing:
        log.info("activation checkpointing: on (%s)", "train.activation_checkpointing" if
                 cfg.activation_checkpointing else "auto: the plan does not fit this device without it")
    if cfg.dtype == "bfloat16" and device.type == "cpu":
        log.warning("bf16 on CPU is ~100x slower than fp32 for matmuls on CPUs without AVX512-BF16/AMX; "
                    "train.dtype=auto measures")
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    many = batch_encoder(tok)
    stream = PackedStream(documents(run.data, "train"), encode, eos, cfg.seq_len, cfg.batch_size, encode_many=many)
    val_stream = PackedStream(documents(run.data, "val"), encode, eos, cfg.seq_len, micro, encode_many=many)
    val_batches = [tuple(t.to(device) for t in val_stream.next_masked_batch()) for _ in range(cfg.val_batches)]
    objective = LanguageModeling(run, model, amp, tok, val_batches)
    objective.compat = compat_record(run)
    with removed_unless_resumable(out):
        if not (tok_dir / "tokenizer.json").is_file():  # the first write of the run: everything is checked now
            save_tokenizer(tok, tok_dir)
        return fit(objective, cfg, stream, out=out, tokenizer_dir=tok_dir, run_config=run.to_dict(),
                   resumed_from=ckpt, device=device, progress=progress)
