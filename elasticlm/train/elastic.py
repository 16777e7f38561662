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

Data parallel: under ``torchrun`` every rank packs the same global batch and keeps its rows; each rank
tokenizes only every world-th document and the token lists are all-gathered (``shared_encoder``). The
micro-batch split is the same as with gradient accumulation on one process, so a 2-process run
equals a 1-process run with ``grad_accum`` doubled); ``parallel = "ddp"`` wraps the student and
router in DistributedDataParallel, ``parallel = "fsdp"`` shards each block with FSDP2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import ROUTER_WEIGHTS, ROUTING, atomic_directory, load, read_config, read_json, write_model_files
from ..config import count_parameters
from ..data.datasets import PackedStream, compat_data, documents
from ..elastic.prune import describe_subnet
from ..elastic.router import Router, RouterSchedule
from ..elastic.space import ElasticSpace, memory_bytes
from ..errors import ConfigError
from ..model.documents import document_ids_from_eos
from ..model.hybrid import HybridLM
from ..runtime import resolve_device
from ..tokenizer import batch_encoder, load_tokenizer
from .checkpoint import gathered
from .config import ElasticRunConfig
from .distributed import Distributed, average_gradients, from_rank0, init_distributed, rows_of, shared_encoder
from .losses import ce_loss_from_hidden, kd_loss, kd_loss_from_hidden, teacher_hidden
from .trainer import (
    Objective,
    Phase,
    autocast_dtype,
    build_optimizer,
    check_resume,
    fit,
    open_run,
    removed_unless_resumable,
    run_autocast,
)

log = logging.getLogger("elasticlm.train")

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
                budget_tolerance: float = 0.0) -> tuple[torch.Tensor, dict[str, Any]]:
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
        bl, costs = self.router.budget_loss(scale, temperature, seed, step, tolerance=budget_tolerance)
        stats["budget_loss"], stats["expected_costs"] = bl.item(), costs
        # the part of the loss that is not the language model's: logged apart, since a budget held at the
        # largest pressure (see Router.update_pressure) makes it dominate the total
        stats["aux_loss"] = budget_weight * bl.item()
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
            "memory": dict(space.memory), "keep_attention": space.keep_attention,
            "axes": [{"name": a.name, "layers": list(a.layers), "values": [list(v) for v in a.values],
                      "heterogeneous": a.heterogeneous} for a in space.axes],
            "budgets": budgets}


def write_routing(directory: Path, space: ElasticSpace, router: Router) -> None:
    """``elastic.json``: the routing metadata of :func:`routing_metadata`."""
    (directory / ELASTIC).write_text(json.dumps(routing_metadata(space, router), indent=2) + "\n")


def save_elastic_checkpoint(path: Path, student: ElasticStudent, space: ElasticSpace, tok_dir: Path) -> None:
    """An elastic model directory: a loadable model + ``router.safetensors`` + ``elastic.json`` (routing
    metadata) — what `extract`, `serve` and `eval` read."""
    with atomic_directory(path, overwrite=True) as tmp:
        write_model_files(student.model, tmp, tokenizer_dir=tok_dir)
        router = {k: v.detach().cpu().contiguous() for k, v in student.router.state_dict().items()}
        save_file(router, tmp / ROUTER_WEIGHTS)
        write_routing(tmp, space, student.router)


# -- the objective -------------------------------------------------------------------------------


class ElasticDistillation(Objective):
    """Every budget of one model trained at once (the module docstring): the plug-in of elastic training
    into the one training loop."""

    def __init__(self, run: ElasticRunConfig, student: ElasticStudent, wrapped: nn.Module, teacher: HybridLM,
                 space: ElasticSpace, amp: torch.dtype | None, sharded: bool, val_batches: list[Any], tok: Any,
                 ) -> None:
        cfg, ec = run.train, run.elastic
        self.run, self.student, self.teacher, self.space, self.tok = run, student, teacher, space, tok
        self.model, self.module, self.router = student.model, wrapped, student.router
        self.amp, self.sharded, self.val_batches = amp, sharded, val_batches
        self.eos = teacher.config.eos_token_id
        self.router_lr = ec.router_lr if ec.router_lr is not None else ec.router_lr_ratio * cfg.lr
        # After wrapping: FSDP2 replaces the parameters with sharded ones, which the optimizer must hold.
        self.parts = {"model": (student.model, build_optimizer(student.model, cfg)),
                      "router": (student.router, torch.optim.Adam(student.router.parameters(), lr=self.router_lr))}
        self.phases = [Phase(i, s.name, s.seq_len, s.batch_size, s.steps) for i, s in enumerate(run.stages)]
        self.schedule = RouterSchedule(self.total_steps, tuple(ec.logit_scale), tuple(ec.temperature))
        self.architectures: dict[str, Any] = {}
        self.dist = Distributed()

    def set_learning_rates(self, step: int, lr: float) -> dict[str, float]:
        super().set_learning_rates(step, lr)
        r_lr = self.router_lr * min(1.0, (step + 1) / max(1, self.run.elastic.router_warmup_steps))
        for group in self.parts["router"][1].param_groups:
            group["lr"] = r_lr
        return {"router_lr": r_lr}

    def begin_step(self, step: int, phase: Phase, micro: int, dist: Distributed) -> None:
        ec, stage = self.run.elastic, self.run.stages[phase.index]
        weights = stage.budget_weights or [1.0] * len(self.space.budgets)
        group = ec.budget_rows or (micro * dist.world if self.sharded else 1)
        self.budgets = budget_per_row(weights, stage.batch_size, group, self.run.train.seed, step)
        self.scale, self.temp = self.schedule.scale_at(step), self.schedule.temperature_at(step)
        self.micro, self.dist = micro, dist

    def micro_loss(self, step: int, micro_step: int, rows: slice, tokens: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
        dist, run = self.dist, self.run
        # under FSDP every rank runs every budget of this micro-step (same collectives everywhere)
        everyone = sorted({x for r in range(dist.world)
                           for x in self.budgets[rows_of(r, dist.world, self.micro, micro_step)]}
                          ) if self.sharded else None
        inputs, targets, keep = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].float()
        doc = document_ids_from_eos(inputs, self.eos) if run.train.document_masking else None
        t_logits = None
        if not run.distill.trainable_teacher:  # one teacher forward serves every budget
            with torch.no_grad(), torch.autocast(inputs.device.type, dtype=self.amp) if self.amp else \
                    contextlib.nullcontext():
                t_logits = teacher_hidden(self.teacher, inputs, doc)
        return self.module(inputs, doc, keep, t_logits, targets, self.budgets[rows], step=step,
                           seed=run.train.seed, scale=self.scale, temperature=self.temp,
                           kd_temperature=run.distill.temperature, ce_weight=run.distill.ce_weight,
                           budget_weight=run.elastic.budget_loss_weight, amp=self.amp, run_budgets=everyone,
                           budget_tolerance=run.elastic.budget_tolerance)

    def before_update(self) -> None:
        if self.sharded:
            average_gradients(self.router, self.dist)  # the router is replicated, not sharded
        self.router.update_pressure(self.run.elastic.budget_pressure, self.band)

    @property
    def band(self) -> float:
        """How far off target a budget may resolve before the pressure rises (and, at its cap, it is projected)."""
        return max(self.run.elastic.budget_tolerance, 0.02)

    def after_update(self) -> None:
        if self.run.elastic.budget_pressure <= 0:  # a fixed budget-loss weight: no pressure, no projection
            return
        for b, dev in self.router.project_saturated(self.band):
            self.say(f"budget {self.space.budgets[b]}: {1 + dev:.3f} × target with the budget loss at its largest "
                     f"weight (its gradient has vanished); projected onto the nearest architecture within "
                     f"{100 * self.band:.0f} %")

    def step_metrics(self, step: int, phase: Phase, stats: list[dict[str, Any]]) -> dict[str, Any]:
        kd_sum: dict[int, float] = {}
        kd_tok: dict[int, float] = {}
        for st in stats:
            for b, v in st["kd"].items():
                kd_sum[b] = kd_sum.get(b, 0.0) + v
                kd_tok[b] = kd_tok.get(b, 0.0) + st["tokens"][b]
        row: dict[str, Any] = {"stage": phase.index + 1, "logit_scale": self.scale, "temperature": self.temp,
                               "budget_loss": stats[-1]["budget_loss"]}
        for b, label in enumerate(self.space.budgets):
            if b in kd_sum:
                row[f"kd_{label}"] = kd_sum[b] / max(kd_tok[b], 1.0)
            resolved = self.router.resolve(b)
            row[f"cost_{label}"] = self.space.cost_of(resolved) / self.space.targets[b]
            row[f"pressure_{label}"] = float(self.router.pressure[b])
            for axis, idx in self.router.resolved_choices(b).items():  # per-axis trajectories
                row[f"width_{label}_{axis}"] = self.space.axis(axis).kept_fraction(idx)
            if resolved != self.architectures.get(label):  # the router's choice for this budget changed
                self.architectures[label] = resolved
                row[f"arch_{label}"] = describe_subnet(self.space.config, resolved)
                self.say(f"step {step}: budget {label} → {row[f'arch_{label}']} "
                         f"({count_parameters(self.space.config, resolved):,} parameters)")
        return row

    def postfix(self, row: dict[str, Any]) -> str:
        return _postfix(row, self.space.budgets)

    def evaluate(self, step: int) -> dict[str, float]:
        synthetic = self.run.data.source == "synthetic" and self.run.eval.tasks
        return _evaluate(self.model, self.router, self.space, self.teacher, self.val_batches, self.eos,
                         self.run.train.document_masking, self.amp, self.tok if synthetic else None, self.run.eval.n)

    def write_files(self, directory: Path) -> None:
        write_routing(directory, self.space, self.router)

    def finish(self, out: Path, dist: Distributed) -> None:
        full = gathered(self.model, self.sharded)
        if dist.main:
            save_elastic_checkpoint(out / "final", ElasticStudent(full, self.router), self.space, out / "tokenizer")
            self.say(summary_table(read_json(out / "final" / ELASTIC)))


# -- the trainer -------------------------------------------------------------------------------


# Elastic fields added after checkpoints began recording compatibility, with their defaults: a field at its
# default is left out of the record, so a checkpoint written before the field existed still resumes.
ADDED_LATER: dict[str, Any] = {"budget_tolerance": 0.0, "budget_pressure": 0.05, "moe_experts": None, "moe_ffn": None}
# The same for the parent's ModelConfig (transformer variants, Mamba2's dt clamp, mixture of experts).
PARENT_ADDED_LATER = ("rope_parameters", "attention_bias", "attention_out_bias", "qk_norm", "max_position_embeddings",
                      "mlp_type", "family", "time_step_limit", "moe_num_experts", "moe_intermediate_size",
                      "moe_shared_intermediate_size", "moe_top_k", "moe_n_group", "moe_topk_group",
                      "moe_norm_topk_prob", "moe_routed_scaling_factor")


def compat_record(run: ElasticRunConfig, space: ElasticSpace) -> dict[str, Any]:
    """What a resumed elastic run may not change (``--allow-config-change`` to do it anyway): the parent's
    architecture, the elastic space with budgets by value (``0.5`` and ``"50%"`` are one budget), distillation,
    data and stages."""
    d = run.to_dict()
    elastic = dict(d["elastic"], budgets=[f"{space.target} {t:.6g}" for t in space.targets])
    for name, default in ADDED_LATER.items():  # at their defaults, records of older checkpoints still match
        if elastic.get(name) == default:
            elastic.pop(name)
    fields, defaults = space.config.flat_dict()
    parent = {k: v for k, v in fields.items() if k not in PARENT_ADDED_LATER or v != defaults[k]}
    labels = {f"{space.target} {t:.6g}": label for label, t in zip(space.budgets, space.targets, strict=True)}
    return {"parent": parent, "elastic": elastic, "distill": d["distill"], "data": compat_data(d["data"]),
            "stages": d["stages"], "train": {"seed": run.train.seed, "document_masking": run.train.document_masking},
            "_labels": labels}


def train_elastic(run: ElasticRunConfig, resume: bool = False, progress: bool = True,
                  resume_from: str | Path | None = None, allow_config_change: bool = False) -> dict[str, Any]:
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
    ckpt = open_run(out, resume=resume, resume_from=resume_from, dist=dist)

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
        amp = from_rank0(run_autocast(cfg.dtype, device, student_model, shape, ckpt), dist)
    space = ElasticSpace.build(student_model.config, ec)
    check_resume(ckpt, compat_record(run, space), allow_config_change, branch=resume_from is not None)
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
    from .plan import Cluster, device_memory, plan_elastic, preflight, resolve_checkpointing

    cluster = Cluster(dist.world, 1, device_memory(device), device=device.type)
    plan = plan_elastic(run, student_model.config, cluster, cfg.activation_checkpointing)
    preflight(plan, device.type)
    student_model.activation_checkpointing = resolve_checkpointing(cfg.activation_checkpointing, plan)
    if student_model.activation_checkpointing and dist.main:
        log.info("activation checkpointing: on (%s)", "train.activation_checkpointing" if
                 cfg.activation_checkpointing else "auto: the plan does not fit this device without it")

    tok_dir = out / "tokenizer"
    first = run.stages[0]
    encode = lambda s: tok.encode(s).ids  # noqa: E731
    # each rank tokenizes 1/world of the documents; every rank packs the same global batch from them
    many = shared_encoder(batch_encoder(tok), dist)
    stream = PackedStream(documents(run.data, "train"), encode, eos, first.seq_len, first.batch_size,
                          encode_many=many, chunk_multiple=dist.world)
    val_stream = PackedStream(documents(run.data, "val"), encode, eos, first.seq_len, 4, encode_many=many,
                              chunk_multiple=dist.world)
    val_batches = [tuple(t.to(device) for t in val_stream.next_masked_batch()) for _ in range(cfg.val_batches)]

    wrapped: nn.Module = student
    sharded = dist.world > 1 and cfg.parallel == "fsdp"
    if dist.world > 1:
        wrapped = _parallelize(student, teacher, run, dist, device, (parent_dir, teacher_dir) if meta_init else None)
    objective = ElasticDistillation(run, student, wrapped, teacher, space, amp, sharded, val_batches, tok)
    objective.compat = compat_record(run, space)
    with removed_unless_resumable(out, dist.main):
        if dist.main:  # the first write of the run: everything is checked now
            tok_dir.mkdir(parents=True, exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (parent_dir / name).is_file():
                    shutil.copy2(parent_dir / name, tok_dir / name)
        return fit(objective, cfg, stream, out=out, tokenizer_dir=tok_dir, run_config=run.to_dict(),
                   resumed_from=ckpt, dist=dist, device=device, progress=progress)


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
    return f"lm {row['lm_loss']:.3f} | kd {kd} | cost/target {cost} | tok/s {row['tok_s']:,.0f}"


@torch.no_grad()
def _evaluate(model: HybridLM, router: Router, space: ElasticSpace, teacher: HybridLM, batches: list[Any],
              eos: int, masking: bool, amp: torch.dtype | None, tok: Any, n: int) -> dict[str, float]:
    """Per budget (its resolved Subnet): validation CE and KD loss; task accuracy on synthetic data. Both losses run
    over token chunks from the final hidden states, as in training: no ``[tokens, vocab]`` logits bigger than one
    chunk exist, so evaluation needs no more memory than the training step the planner sizes."""
    model.eval()
    out: dict[str, float] = {}
    subnets = [router.resolve(b) for b in range(len(space.budgets))]
    ce, kd, count = [0.0] * len(subnets), [0.0] * len(subnets), 0.0
    for tokens, mask in batches:
        inputs, targets, keep = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].float()
        doc = document_ids_from_eos(inputs, eos) if masking else None
        count += keep.sum().item()
        with torch.autocast(inputs.device.type, dtype=amp) if amp else contextlib.nullcontext():
            h_t, w_t = teacher_hidden(teacher, inputs, doc)
            for b, subnet in enumerate(subnets):
                h_s, w_s = model(inputs, subnet, document_ids=doc, head=lambda h, w: (h, w))
                ce[b] += ce_loss_from_hidden(h_s, w_s, targets, keep).item()
                kd[b] += kd_loss_from_hidden(h_s, w_s, h_t, w_t, keep).item()
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


__all__ = ["ElasticDistillation", "ElasticStudent", "kd_loss", "kd_loss_from_hidden", "rows_of",
           "routing_metadata", "sample_budgets", "save_elastic_checkpoint", "summary_table", "teacher_hidden",
           "train_elastic"]
