"""Elastic training (DESIGN 2.4, 2.5): one run makes every budget of one model good at once.

The student starts as a copy of the importance-ordered parent; the frozen parent is the teacher.
Every step draws one budget per sample of the global batch (stage weights; the draw depends only
on the seed and the step, so every rank agrees; under FSDP2 one draw per micro-step across ranks, see
``elastic.budget_rows``), runs the teacher once on the whole micro-batch,
and the student once per budget present on that budget's rows, with the Subnet and gates the
router samples for it. Loss per micro-batch: forward KL(teacher ‖ student) at temperature τ,
token mean, plus the router's budget loss. Stages change context length, batch size and budget
weights; the learning rate, the router's scale/temperature schedules and the step count run over
all stages, so ``--resume`` is exact across stage boundaries.

Data parallel: under ``torchrun`` every rank reads the same global batch and keeps its rows (the
micro-batch split is the same as with gradient accumulation on one process, so a 2-process run
equals a 1-process run with ``grad_accum`` doubled); ``parallel = "ddp"`` wraps the student and
router in DistributedDataParallel, ``parallel = "fsdp"`` shards each block with FSDP2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..checkpoint import ROUTING, atomic_directory, load, read_config, read_json, write_model_files
from ..config import count_parameters
from ..data.datasets import PackedStream, documents
from ..elastic.prune import describe_subnet
from ..elastic.router import Router, RouterSchedule
from ..elastic.space import ElasticSpace, memory_bytes
from ..errors import CheckpointError, ConfigError
from ..model.documents import document_ids_from_eos
from ..model.hybrid import HybridLM
from ..runtime import resolve_device
from ..tokenizer import load_tokenizer
from .checkpoint import OPTIMIZER, STATE, latest, optimizer_from_flat, optimizer_to_flat, rng_state, set_rng_state
from .config import ElasticRunConfig
from .losses import kd_loss, kd_loss_from_hidden, teacher_hidden
from .trainer import MetricsLog, amp_record, autocast_dtype, build_optimizer, lr_at, run_autocast

log = logging.getLogger("elasticlm.train")

ROUTER = "router.safetensors"
ELASTIC = ROUTING  # elastic.json: the routing metadata


# -- pure pieces ------------------------------------------------------------------------------


def sample_budgets(weights: list[float], n: int, seed: int, step: int) -> list[int]:
    """One budget index per row of the global batch, from ``weights``; depends only on
    ``(seed, step)`` so every rank of a distributed run draws the same."""
    digest = hashlib.blake2b(repr(("budgets", seed, step)).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.multinomial(w / w.sum(), n, replacement=True, generator=gen).tolist()


def budget_per_row(weights: list[float], rows: int, group: int, seed: int, step: int) -> list[int]:
    """A budget index for each row of the global batch, one draw per ``group`` consecutive rows (the draw
    depends only on seed, step and group index, so every rank agrees).

    >>> budget_per_row([1.0, 1.0], 6, 3, seed=0, step=0) == budget_per_row([1.0, 1.0], 6, 3, 0, 0)
    True
    >>> b = budget_per_row([1.0, 1.0], 6, 3, seed=0, step=0); b[:3] == [b[0]] * 3 and b[3:] == [b[3]] * 3
    True
    """
    draws = sample_budgets(weights, math.ceil(rows / group), seed, step)
    return [draws[r // group] for r in range(rows)]


def rows_of(rank: int, world: int, micro: int, micro_step: int) -> slice:
    """Rows of the global batch that rank ``rank`` trains at accumulation step ``micro_step``.

    >>> rows_of(1, 2, 4, 0), rows_of(0, 1, 4, 1)   # 2 ranks × 4 rows == 1 rank, 2 micro-steps × 4
    (slice(4, 8, None), slice(4, 8, None))
    """
    start = (micro_step * world + rank) * micro
    return slice(start, start + micro)


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


class ElasticStudent(nn.Module):
    """The student and its router as one module, so one data-parallel wrapper covers both and one
    forward call per micro-batch serves every budget in it."""

    def __init__(self, model: HybridLM, router: Router) -> None:
        super().__init__()
        self.model, self.router = model, router

    def forward(self, inputs: torch.Tensor, doc_ids: torch.Tensor | None, keep: torch.Tensor,
                teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, targets: torch.Tensor,
                budgets: list[int], *, step: int, seed: int,
                scale: float, temperature: float, kd_temperature: float, ce_weight: float,
                budget_weight: float, amp: torch.dtype | None, run_budgets: list[int] | None = None,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of one micro-batch (KD token mean + budget loss) and per-budget statistics.
        ``run_budgets``: budgets to run even without rows here (FSDP needs every rank to make the
        same module calls); such a budget runs on one row whose loss is weighted 0.
        ``teacher``: the teacher's logits, or its final-norm output and head weight (see
        :func:`teacher_hidden`; the KD loss then runs over token chunks).
        ``teacher=None`` is the trainable-teacher mode: the student's own full budget is the teacher
        and trains with ``ce_weight`` · CE."""
        n_keep = keep.sum().clamp_min(1.0)
        total = inputs.new_zeros((), dtype=torch.float32)
        if teacher is None:
            with torch.autocast(inputs.device.type, dtype=amp) if amp else contextlib.nullcontext():
                full = self.model(inputs, document_ids=doc_ids)
            ce = F.cross_entropy(full.float().flatten(0, 1), targets.flatten(), reduction="none")
            total = total + ce_weight * (ce * keep.flatten()).sum() / n_keep
            teacher = full.detach()
        stats: dict[str, Any] = {"kd": {}, "tokens": {}, "routing": {}}
        for b in sorted(set(budgets) | set(run_budgets or [])):
            present = [i for i, x in enumerate(budgets) if x == b]
            rows = torch.tensor(present or [0], device=inputs.device)
            routing = self.router.route(b, scale, temperature, seed, step)
            doc = doc_ids.index_select(0, rows) if doc_ids is not None else None
            k = keep.index_select(0, rows) * (1.0 if present else 0.0)
            if isinstance(teacher, tuple):  # teacher hidden states + head: the loss runs over token chunks
                h_t, w_t = teacher[0].index_select(0, rows), teacher[1]

                def head(h: torch.Tensor, w: torch.Tensor, h_t=h_t, w_t=w_t, k=k) -> torch.Tensor:
                    return kd_loss_from_hidden(h, w, h_t, w_t, k, kd_temperature)
            else:
                t_rows = teacher.index_select(0, rows)

                def head(h: torch.Tensor, w: torch.Tensor, t_rows=t_rows, k=k) -> torch.Tensor:
                    return kd_loss(F.linear(h, w), t_rows, k, kd_temperature)
            with torch.autocast(inputs.device.type, dtype=amp) if amp else contextlib.nullcontext():
                kd = self.model(inputs.index_select(0, rows), routing.subnet, document_ids=doc,
                                modulation=routing.modulation, head=head)
            total = total + kd / n_keep
            if present:
                stats["kd"][b] = kd.item()
                stats["tokens"][b] = k.sum().item()
            stats["routing"][b] = routing
        bl, costs = self.router.budget_loss(scale, temperature, seed, step)
        stats["budget_loss"], stats["expected_costs"] = bl.item(), costs
        return total + budget_weight * bl, stats


# -- checkpoints -------------------------------------------------------------------------------


def routing_metadata(space: ElasticSpace, router: Router, context: int = 4096) -> dict[str, Any]:
    """What `extract`, `info` and nested serving need: each budget's resolved Subnet and costs."""
    cfg = space.config
    parent = count_parameters(cfg)
    budgets = []
    for b, label in enumerate(space.budgets):
        subnet = router.resolve(b)
        n = count_parameters(cfg, subnet)
        budgets.append({
            "budget": label, "target": space.targets[b], "target_kind": space.target,
            "cost": space.cost_of(subnet), "parameters": n, "fraction_of_parent": n / parent,
            "memory_bytes_bf16": memory_bytes(cfg, subnet, context=context),
            "architecture": describe_subnet(cfg, subnet), "subnet": subnet.to_dict(),
        })
    return {"elasticlm_elastic": 1, "parent_parameters": parent, "target": space.target,
            "memory": dict(space.memory), "axes": [{"name": a.name, "layers": list(a.layers),
                                                    "values": [list(v) for v in a.values],
                                                    "heterogeneous": a.heterogeneous} for a in space.axes],
            "budgets": budgets}


def save_elastic_checkpoint(path: Path, student: ElasticStudent, space: ElasticSpace, tok_dir: Path,
                            optimizers: dict[str, torch.optim.Optimizer] | None = None,
                            state: dict[str, Any] | None = None) -> None:
    """A loadable model directory + ``router.safetensors`` + ``elastic.json`` (routing metadata);
    training checkpoints add the optimizers and ``trainer_state.json`` (written last)."""
    with atomic_directory(path, overwrite=True) as tmp:
        write_model_files(student.model, tmp, tokenizer_dir=tok_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in student.router.state_dict().items()}, tmp / ROUTER)
        (tmp / ELASTIC).write_text(json.dumps(routing_metadata(space, student.router), indent=2) + "\n")
        if optimizers is not None and state is not None:
            tensors, groups = {}, {}
            for name, opt in optimizers.items():
                t, g = optimizer_to_flat(opt)
                tensors.update({f"{name}.{k}": v for k, v in t.items()})
                groups[name] = g
            save_file(tensors, tmp / OPTIMIZER)
            (tmp / STATE).write_text(json.dumps({**state, "param_groups": groups, "rng": rng_state()}) + "\n")


def load_elastic_checkpoint(path: Path, student: ElasticStudent,
                            optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    state = read_json(path / STATE)
    if state.get("sharded"):
        raise CheckpointError(f"{path} was written by an FSDP2 run (its optimizer state is in {DCP_DIR}/ shards); "
                              "resume it under torchrun with train.parallel=fsdp")
    device = student.model.embeddings.weight.device
    saved = load(path, device=device)
    if saved.config != student.model.config:
        raise CheckpointError(f"{path}: the checkpoint's model differs from [parent]; resume with the same parent")
    student.model.load_state_dict(saved.state_dict())
    try:
        student.router.load_state_dict({k: v.to(device) for k, v in load_file(path / ROUTER).items()})
        tensors = load_file(path / OPTIMIZER)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    for name, opt in optimizers.items():
        mine = {k[len(name) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(name + ".")}
        optimizer_from_flat(opt, mine, state["param_groups"][name])
    set_rng_state(state["rng"])
    return state


# -- sharded (FSDP2) checkpoints -----------------------------------------------------------------

DCP_DIR = "dcp"  # torch.distributed.checkpoint shards: student, AdamW, router, router optimizer


def _sharded_state(student: ElasticStudent, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(student.model, [optimizers["model"]])
    router_sd, router_optim_sd = get_state_dict(student.router, [optimizers["router"]])
    return {"model": model_sd, "optim": optim_sd, "router": router_sd, "router_optim": router_optim_sd}


def save_sharded_checkpoint(path: Path, student: ElasticStudent, space: ElasticSpace, tok_dir: Path,
                            optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any],
                            dist: Distributed) -> None:
    """An FSDP2 training checkpoint: every rank writes its own shards of the student, its optimizer and
    the router (``dcp/``, torch.distributed.checkpoint); the whole student is gathered to rank 0 only,
    parameter by parameter into CPU memory, for the loadable ``model.safetensors``; rank 0 adds
    ``router.safetensors``, ``elastic.json`` and ``trainer_state.json`` (last) and publishes the
    directory with a rename. Every rank must call this."""
    import torch.distributed.checkpoint as dcp

    tmp = path.parent / f".{path.name}.tmp-sharded"  # one name every rank can agree on
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist)
    dcp.save(_sharded_state(student, optimizers), checkpoint_id=tmp / DCP_DIR)
    full = _gathered(student, sharded=True)
    if dist.main:
        write_model_files(full.model, tmp, tokenizer_dir=tok_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in student.router.state_dict().items()}, tmp / ROUTER)
        (tmp / ELASTIC).write_text(json.dumps(routing_metadata(space, student.router), indent=2) + "\n")
        (tmp / STATE).write_text(json.dumps({**state, "rng": rng_state(), "sharded": True}) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    del full
    _barrier(dist)


def load_sharded_checkpoint(path: Path, student: ElasticStudent, optimizers: dict[str, torch.optim.Optimizer]
                            ) -> dict[str, Any]:
    """Every rank reads its own shards of a :func:`save_sharded_checkpoint` directory (the world size may
    differ from the one that wrote it: torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = read_json(path / STATE)
    if not (path / DCP_DIR).is_dir():
        raise CheckpointError(f"{path} has no {DCP_DIR}/ shards: it was written by an unsharded run; resume it with "
                              "train.parallel=ddp")
    sd = _sharded_state(student, optimizers)
    try:
        dcp.load(sd, checkpoint_id=path / DCP_DIR)
    except Exception as exc:
        raise CheckpointError(f"{path / DCP_DIR} is corrupt or incomplete ({str(exc).splitlines()[0]})") from None
    set_state_dict(student.model, [optimizers["model"]], model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    set_state_dict(student.router, [optimizers["router"]], model_state_dict=sd["router"],
                   optim_state_dict=sd["router_optim"])
    set_rng_state(state["rng"])
    return state


# -- the trainer -------------------------------------------------------------------------------


def train_elastic(run: ElasticRunConfig, resume: bool = False, progress: bool = True,
                  resume_from: str | Path | None = None) -> dict[str, Any]:
    """Elastic training from ``run.parent.path``; writes under ``train.out``: ``run_config.json``,
    ``metrics.jsonl``, ``checkpoints/step_*``, ``stages/<i>-<name>/`` (the state at the end of every
    stage but the last) and ``final/`` (model + router + elastic.json).

    ``resume_from`` continues from a given training checkpoint (e.g. ``stages/1-short`` of another
    run) into a new ``train.out`` — how to branch a stage-2 ablation off one stage-1 run."""
    cfg, ec = run.train, run.elastic
    out = Path(cfg.out)
    device = resolve_device(cfg.device, "train.device")
    dist = init_distributed(device)
    if dist.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    amp = autocast_dtype(cfg.dtype, device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    ckpt = latest(out) if resume else None
    if resume and ckpt is None:
        raise CheckpointError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").glob("step_*")):
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue, or choose another train.out")
    if resume_from is not None:
        if resume:
            raise ConfigError("give either --resume or --resume-from, not both")
        ckpt = Path(resume_from)
        if not (ckpt / STATE).is_file():
            raise CheckpointError(f"--resume-from {ckpt}: not a training checkpoint of `elasticlm train` (no "
                                  f"{STATE}); use checkpoints/step_* or stages/* of a run")

    parent_dir = Path(run.parent.path)
    # The frozen teacher only runs forward passes: keep it in the autocast dtype (half the memory on GPU).
    teacher_dir = Path(run.distill.teacher or parent_dir)
    # Under FSDP2 nothing is loaded whole: models are built on the meta device, sharded, and every rank reads
    # only its rows (elasticlm.train.sharded). Native directories only; a Hugging Face parent loads whole.
    meta_init = (dist.world > 1 and cfg.parallel == "fsdp" and read_config(parent_dir)[1] == "native"
                 and read_config(teacher_dir)[1] == "native")
    if meta_init:
        teacher = HybridLM(read_config(teacher_dir)[0], device="meta", dtype=amp or torch.float32)
    else:
        teacher = load(teacher_dir, device=device, dtype=amp or torch.float32)
    if not (parent_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{parent_dir} has no tokenizer.json; the parent must come from `elasticlm pretrain` "
                          "or `elasticlm reorder`")
    tok = load_tokenizer(parent_dir)
    eos = teacher.config.eos_token_id
    if eos is None:
        raise ConfigError(f"{parent_dir}: the model config has no eos_token_id (needed to pack documents)")
    # fp32 master weights
    student_model = HybridLM(read_config(parent_dir)[0], device="meta") if meta_init else \
        load(parent_dir, device=device, dtype=torch.float32)
    if cfg.dtype == "auto" and device.type == "cpu" and not meta_init:  # bf16 only where it pays; kept on resume
        first = run.stages[0]
        shape = (max(1, first.batch_size // (cfg.grad_accum * dist.world)), first.seq_len)
        amp = _from_rank0(run_autocast(cfg.dtype, device, student_model, shape, ckpt), dist)
    space = ElasticSpace.build(student_model.config, ec)
    if run.distill.teacher:
        if teacher.config.vocab_size != student_model.config.vocab_size:
            raise ConfigError(f"distill.teacher {run.distill.teacher} has vocab_size {teacher.config.vocab_size}, "
                              f"the parent {student_model.config.vocab_size}; KD needs the same vocabulary")
    teacher.eval().requires_grad_(False)
    router = Router(space, ec.router_hidden, ec.router_mode).to(device)
    if ec.router_init_steps and ckpt is None:
        loss = router.fit_budgets(ec.router_init_steps, seed=cfg.seed, scale=ec.logit_scale[0],
                                  temperature=ec.temperature[0])
        if dist.main:
            log.info("router warm start: budget loss %.4f after %d steps", loss, ec.router_init_steps)
    student = ElasticStudent(student_model, router)
    from .plan import Cluster, device_memory, plan_elastic, resolve_checkpointing

    cluster = Cluster(dist.world, 1, device_memory(device), device=device.type)
    student_model.activation_checkpointing = resolve_checkpointing(
        cfg.activation_checkpointing, plan_elastic(run, student_model.config, cluster))
    if student_model.activation_checkpointing and dist.main:
        log.info("activation checkpointing: on (%s)", "train.activation_checkpointing" if
                 cfg.activation_checkpointing else "auto: the plan does not fit this device without it")

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        tok_dir = out / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (parent_dir / name).is_file():
                shutil.copy2(parent_dir / name, tok_dir / name)
    tok_dir = out / "tokenizer"

    total = run.total_steps
    sched = RouterSchedule(total, tuple(ec.logit_scale), tuple(ec.temperature))
    lr_cfg = dataclasses.replace(cfg, steps=total)  # the parent trainer's schedule, over all stages

    first = run.stages[0]
    stream = PackedStream(documents(run.data, "train"), lambda s: tok.encode(s).ids, eos, first.seq_len,
                          first.batch_size)
    val_stream = PackedStream(documents(run.data, "val"), lambda s: tok.encode(s).ids, eos, first.seq_len, 4)
    val_batches = [tuple(t.to(device) for t in val_stream.next_masked_batch()) for _ in range(cfg.val_batches)]

    wrapped: nn.Module = student
    sharded = dist.world > 1 and cfg.parallel == "fsdp"
    if dist.world > 1:
        wrapped = _parallelize(student, teacher, run, dist, device, (parent_dir, teacher_dir) if meta_init else None)
    # After wrapping: FSDP2 replaces the parameters with sharded ones, which the optimizer must hold.
    opt = build_optimizer(student_model, cfg)
    router_lr = ec.router_lr if ec.router_lr is not None else ec.router_lr_ratio * cfg.lr
    router_opt = torch.optim.Adam(router.parameters(), lr=router_lr)
    optimizers = {"model": opt, "router": router_opt}
    start = 0
    if ckpt is not None:  # every rank loads the same checkpoint (its own shards of it when sharded)
        state = load_sharded_checkpoint(ckpt, student, optimizers) if sharded else \
            load_elastic_checkpoint(ckpt, student, optimizers)
        start = int(state["step"])
        stream.load_state_dict(state["data"])
        if dist.main:
            log.info("resumed from %s (step %d of %d)", ckpt, start, total)

    metrics = MetricsLog(out, start if ckpt is not None else None, cfg.tensorboard and dist.main) if dist.main \
        else None
    synthetic = run.data.source == "synthetic" and run.eval.tasks
    labels = space.budgets
    bar = tqdm(total=total, initial=start, disable=not (progress and dist.main), unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    architectures: dict[str, Any] = {}
    t_log, tok_log = time.perf_counter(), 0
    student.train()
    try:
        for step in range(start, total):
            stage_index, stage = run.stage_at(step)
            if (stream.seq_len, stream.batch_size) != (stage.seq_len, stage.batch_size):
                stream.seq_len, stream.batch_size = stage.seq_len, stage.batch_size
                bar.write(f"stage {stage_index + 1}/{len(run.stages)} ({stage.name or 'unnamed'}): "
                          f"seq_len {stage.seq_len}, batch {stage.batch_size}, {stage.steps} steps")
            lr = lr_at(step, lr_cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            r_lr = router_lr * min(1.0, (step + 1) / max(1, ec.router_warmup_steps))
            for group in router_opt.param_groups:
                group["lr"] = r_lr
            scale, temp = sched.scale_at(step), sched.temperature_at(step)
            tokens, mask = (t.to(device) for t in stream.next_masked_batch())
            weights = stage.budget_weights or [1.0] * len(labels)
            micro = stage.batch_size // (cfg.grad_accum * dist.world)
            if micro < 1:
                raise ConfigError(f"stage {stage_index + 1}: batch_size {stage.batch_size} is smaller than "
                                  f"grad_accum × world size ({cfg.grad_accum} × {dist.world})")
            budgets = budget_per_row(weights, stage.batch_size, ec.budget_rows or (micro * dist.world if sharded
                                                                                   else 1), cfg.seed, step)
            kd_sum: dict[int, float] = {}
            kd_tok: dict[int, float] = {}
            loss_sum, stats = 0.0, {}
            for a in range(cfg.grad_accum):
                rows = rows_of(dist.rank, dist.world, micro, a)
                # under FSDP every rank runs every budget of this micro-step (same collectives everywhere)
                everyone = sorted({x for r in range(dist.world) for x in budgets[rows_of(r, dist.world, micro, a)]}
                                  ) if sharded else None
                ids, keep_mask = tokens[rows], mask[rows]
                inputs, targets, keep = ids[:, :-1], ids[:, 1:], keep_mask[:, 1:].float()
                doc = document_ids_from_eos(inputs, eos) if cfg.document_masking else None
                t_logits = None
                if not run.distill.trainable_teacher:  # one teacher forward serves every budget
                    with torch.no_grad(), torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                        t_logits = teacher_hidden(teacher, inputs, doc)
                sync = a == cfg.grad_accum - 1 or dist.world == 1
                ctx = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else contextlib.nullcontext()
                with ctx:
                    loss, stats = wrapped(inputs, doc, keep, t_logits, targets, budgets[rows], step=step,
                                          seed=cfg.seed, scale=scale, temperature=temp,
                                          kd_temperature=run.distill.temperature, ce_weight=run.distill.ce_weight,
                                          budget_weight=ec.budget_loss_weight, amp=amp, run_budgets=everyone)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                for b, v in stats["kd"].items():
                    kd_sum[b] = kd_sum.get(b, 0.0) + v
                    kd_tok[b] = kd_tok.get(b, 0.0) + stats["tokens"][b]
            if dist.world > 1:  # log the global batch's loss, as one process with accumulation would
                loss_sum = _mean_over_ranks(loss_sum, device)
            if not math.isfinite(loss_sum):
                raise ConfigError(f"the loss became {loss_sum} at step {step + 1}; lower train.lr or check the data")
            if sharded:
                _average_gradients(router)  # the router is replicated, not sharded
            grad_norm = torch.nn.utils.clip_grad_norm_(student_model.parameters(),
                                                       cfg.grad_clip or float("inf")).item()
            opt.step()
            router_opt.step()
            opt.zero_grad(set_to_none=True)
            router_opt.zero_grad(set_to_none=True)
            done = step + 1
            tok_log += stage.batch_size * stage.seq_len
            bar.update(1)
            if dist.main and (done % cfg.log_every == 0 or done == total):
                elapsed = time.perf_counter() - t_log
                row: dict[str, Any] = {"loss": loss_sum, "lr": lr, "router_lr": r_lr, "grad_norm": grad_norm,
                                       "tok_s": tok_log / max(elapsed, 1e-9), "stage": stage_index + 1,
                                       "logit_scale": scale, "temperature": temp,
                                       "budget_loss": stats["budget_loss"]}
                t_log, tok_log = time.perf_counter(), 0
                for b, label in enumerate(labels):
                    if b in kd_sum:
                        row[f"kd_{label}"] = kd_sum[b] / max(kd_tok[b], 1.0)
                    resolved = router.resolve(b)
                    row[f"cost_{label}"] = space.cost_of(resolved) / space.targets[b]
                    if resolved != architectures.get(label):  # the router's choice for this budget changed
                        architectures[label] = resolved
                        row[f"arch_{label}"] = describe_subnet(space.config, resolved)
                        bar.write(f"step {done}: budget {label} → {row[f'arch_{label}']} "
                                  f"({count_parameters(space.config, resolved):,} parameters)")
                last = dict(row)
                metrics.write(done, **row)
                bar.set_postfix_str(_postfix(row, labels))
            if done % cfg.eval_every == 0 or done == total:
                if dist.main or sharded:  # sharded weights: every rank takes part in each forward
                    evals = _evaluate(student_model, router, space, teacher, val_batches, eos, cfg.document_masking,
                                      amp, tok if synthetic else None, run.eval.n)
                    if dist.main:
                        metrics.write(done, **evals)
                        last.update(evals)
                        bar.write(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in evals.items()))
                    student.train()
            stage_done = done < total and run.stage_at(done)[0] != stage_index
            if done % cfg.checkpoint_every == 0 or done == total or stage_done:
                state = {"step": done, "stage": stage_index, "data": stream.state_dict(), "amp": amp_record(amp)}
                path = out / "checkpoints" / f"step_{done:07d}"
                if sharded:
                    save_sharded_checkpoint(path, student, space, tok_dir, optimizers, state, dist)
                elif dist.main:
                    save_elastic_checkpoint(path, student, space, tok_dir, optimizers, state)
                if dist.main:
                    if stage_done:  # kept out of the rotation: evaluate it, or branch a run from it
                        keep = out / "stages" / f"{stage_index + 1}-{stage.name or 'stage'}"
                        with atomic_directory(keep, overwrite=True) as tmp:
                            # hard links: checkpoint files are never modified in place, so this costs no copy
                            shutil.copytree(path, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
                        bar.write(f"stage {stage_index + 1} done: {keep}")
                    for old in sorted((out / "checkpoints").glob("step_*"))[:-cfg.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
                _barrier(dist)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    full = _gathered(student, sharded)
    if dist.main:
        save_elastic_checkpoint(out / "final", full, space, tok_dir)
        bar.write(summary_table(read_json(out / "final" / ELASTIC)))
    _barrier(dist)
    return last


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def _gathered(student: ElasticStudent, sharded: bool) -> ElasticStudent:
    """The student with whole (unsharded) weights: itself, or under FSDP2 a copy gathered to rank 0 (every
    rank must call this; the others get a model without weights)."""
    if not sharded:
        return student
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # parameter by parameter, into rank 0's CPU memory only (the other ranks get an empty dict)
    state = get_model_state_dict(student.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = HybridLM(student.model.config, device="meta")
    if state:
        plain.load_state_dict(state, assign=True)
    return ElasticStudent(plain, student.router)


def _from_rank0(value: Any, dist: Distributed) -> Any:
    """Rank 0's value on every rank (a measured choice must be the same everywhere)."""
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(dist: Distributed) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t) / tdist.get_world_size()


def _average_gradients(module: nn.Module) -> None:
    import torch.distributed as tdist

    for p in module.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad /= tdist.get_world_size()


def _parallelize(student: ElasticStudent, teacher: HybridLM, run: ElasticRunConfig, dist: Distributed,
                 device: torch.device, sources: tuple[Path, Path] | None = None) -> nn.Module:
    """DDP, or FSDP2 per block; ``sources`` (student, teacher directories): the models are on the meta
    device and every rank fills only its own shards from those files."""
    mode = run.train.parallel
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from .sharded import fill_shards, shard_model

        # bf16 compute on fp32 master weights, gradients reduced in fp32 (the teacher is stored in bf16 already)
        amp = autocast_dtype(run.train.dtype, device)
        mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
        for i, (model, policy) in enumerate(((student.model, mp), (teacher, MixedPrecisionPolicy()))):
            shard_model(model, policy)
            if sources is not None:
                model.to_empty(device=device)
                fill_shards(model, sources[i])
        return student
    from torch.nn.parallel import DistributedDataParallel

    # Each step runs a different Subnet: dropped layers and unused budgets leave parameters unused.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids, find_unused_parameters=True)


def _postfix(row: dict[str, Any], labels: tuple[str, ...]) -> str:
    kd = " ".join(f"{label}:{row[f'kd_{label}']:.3f}" for label in labels if f"kd_{label}" in row)
    cost = " ".join(f"{label}→{row[f'cost_{label}']:.3f}" for label in labels)
    return f"kd {kd} | cost/target {cost} | tok/s {row['tok_s']:,.0f}"


@torch.no_grad()
def _evaluate(model: HybridLM, router: Router, space: ElasticSpace, teacher: HybridLM, batches: list[Any],
              eos: int, masking: bool, amp: torch.dtype | None, tok: Any, n: int) -> dict[str, float]:
    """Per budget (its resolved Subnet): validation CE and KD loss; task accuracy on synthetic data."""
    model.eval()
    out: dict[str, float] = {}
    subnets = [router.resolve(b) for b in range(len(space.budgets))]
    ce, kd, count = [0.0] * len(subnets), [0.0] * len(subnets), 0.0
    for tokens, mask in batches:
        inputs, targets, keep = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].float()
        doc = document_ids_from_eos(inputs, eos) if masking else None
        count += keep.sum().item()
        with torch.autocast(inputs.device.type, dtype=amp) if amp else contextlib.nullcontext():
            t = teacher(inputs, document_ids=doc)
            for b, subnet in enumerate(subnets):
                s = model(inputs, subnet, document_ids=doc)
                ce[b] += (F.cross_entropy(s.float().flatten(0, 1), targets.flatten(), reduction="none")
                          * keep.flatten()).sum().item()
                kd[b] += kd_loss(s, t, keep).item()
    for b, (label, subnet) in enumerate(zip(space.budgets, subnets, strict=True)):
        out[f"val_loss_{label}"] = ce[b] / max(count, 1.0)
        out[f"val_kd_{label}"] = kd[b] / max(count, 1.0)
        if tok is not None:
            from ..eval.tasks import task_table

            table = task_table(model, tok, n=n, hard=False, subnet=subnet)["default"]
            out[f"acc_{label}"] = sum(table.values()) / len(table)
    return out


def summary_table(meta: dict[str, Any]) -> str:
    """Markdown table of the resolved budgets in an ``elastic.json``."""
    lines = ["| budget | target | parameters | of parent | cost/target | architecture |", "|---|---|---|---|---|---|"]
    for b in meta["budgets"]:
        lines.append(f"| {b['budget']} | {b['target']:,.0f} | {b['parameters']:,} | {b['fraction_of_parent']:.1%} | "
                     f"{b['cost'] / b['target']:.4f} | {b['architecture']} |")
    return "\n".join(lines)


__all__ = ["ElasticStudent", "kd_loss", "kd_loss_from_hidden", "load_elastic_checkpoint", "rows_of",
           "routing_metadata", "sample_budgets", "save_elastic_checkpoint", "summary_table", "teacher_hidden",
           "train_elastic"]
