"""Will a training run fit? Per-rank peak memory of a pretrain or elastic run, from its config alone.

The plan adds up what one rank holds at its peak (``elasticlm plan``):

- **static**: fp32 master weights, fp32 gradients and AdamW's two fp32 moments of the student (each
  divided by the number of ranks under FSDP2), the frozen teacher (bf16 under autocast, sharded under
  FSDP2), the router and its optimizer;
- **activations** of one micro-batch, saved for backward: per layer kind a count of values per token
  (below), or — with per-block activation checkpointing — only each block's input plus one block's
  recomputed inside; the final norm's output, the packed-document index tensors, the teacher's hidden
  states (the KD loss runs over token chunks, so logits exist one chunk at a time);
- **workspace**: the backward of the largest block (its activation gradients), the KD / CE chunk
  (``[chunk, vocab]`` logits, log-softmaxes and their gradients), FSDP2's all-gather and
  reduce-scatter buffers (two blocks in flight).

Evaluation during an elastic run (4 rows of the first stage's length) computes its CE and KD over the same token
chunks and without gradients: its logits exist one chunk at a time, as in training, and it keeps no activations
for a backward (``tests/test_elastic_eval.py`` holds it to one chunk of logits), so it has no stage of its own.

Bytes saved per token and layer come from each layer kind's ``SAVED_BYTES`` (:mod:`elasticlm.kinds`;
counted on this code with ``torch.autograd.graph.saved_tensors_hooks``, per precision mode: fp32, bf16
autocast on fp32 weights, bf16 weights as FSDP2's mixed precision runs them). Note that bf16 saves little
inside a Mamba-2 layer: the scan and the gated norm upcast to fp32. ``bench/bench_plan.py`` holds the whole
plan against measured peak memory of real training steps on CPU (fp32); ``bench/simulate_plan.py`` against
PyTorch's FSDPMemTracker on a fake-tensor FSDP2 step of the 12B parent (bf16 weights).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig, Subnet, count_active_parameters, count_parameters
from ..errors import ConfigError
from ..kinds import kind_of
from ..model.documents import DENSE_MASK_MAX_LEN
from .losses import kd_chunk_tokens

GiB = 1024**3
# fp32 values of [chunk, vocab] alive at the peak of a chunk's backward: student and teacher logits,
# both log-softmaxes, the teacher's probabilities, their product, and two gradients.
KD_CHUNK_COPIES = 8
CE_CHUNK_COPIES = 4
DEFAULT_GPU_FLOPS = 989e12  # H100 / H200 dense bf16 peak (the data sheets); an assumption unless --flops
DEFAULT_MFU = 0.35


def parse_bytes(text: str) -> float:
    """``"141GB"`` → 141e9, ``"80GiB"`` → 80·2³⁰, ``"24G"`` → 24e9, a plain number → bytes.

    >>> parse_bytes("141GB"), parse_bytes("1GiB"), parse_bytes("512MB")
    (141000000000.0, 1073741824.0, 512000000.0)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read {text!r} as a memory size; write e.g. 141GB, 80GiB or 24e9")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return value * (1024 if binary else 1000) ** power


def parse_flops(text: str) -> float:
    """``"989T"`` → 9.89e14, ``"200G"`` → 2e11, ``"1.2e15"``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGTP]?)(?:FLOP/?S?)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"cannot read {text!r} as FLOP/s; write e.g. 989T or 2e11")
    return float(m.group(1)) * 1000 ** ("KMGTP".index(m.group(2).upper()) + 1 if m.group(2) else 0)


# -- activations -------------------------------------------------------------------------------


MODES = ("fp32", "autocast", "bf16")  # see Precision; each layer kind's saved bytes per mode: elasticlm.kinds


def layer_bytes_per_token(config: ModelConfig, layer: int, width: Any, hidden: int, scan_chunk: int, mode: str,
                          documents: bool = True) -> float:
    """Bytes one block saves for backward per token (the kind's measured coefficients)."""
    doc_scale = (1.0 if mode == "fp32" else 0.5) * float(documents)
    return kind_of(config.pattern[layer]).saved_bytes_per_token(config, width, hidden, scan_chunk, mode, doc_scale)


@dataclass
class Precision:
    """How a run stores values: ``mode`` (a key of the kinds' ``SAVED_BYTES``) and bytes per value of the residual
    stream (what a checkpointed block keeps) and of the teacher's weights and hidden states."""

    mode: str = "fp32"
    residual: int = 4
    teacher: int = 4

    @classmethod
    def of(cls, amp: bool, fsdp: bool) -> Precision:
        if not amp:
            return cls()
        return cls("bf16", 2, 2) if fsdp else cls("autocast", 4, 2)


def activation_bytes(config: ModelConfig, subnet: Subnet | None, tokens: int, precision: Precision,
                     checkpointing: bool, scan_chunk: int | None = None, documents: bool = True,
                     dense_mask_len: int = 0) -> dict[str, float]:
    """Saved activations of the student for ``tokens`` tokens at ``subnet`` (default: the full model):
    ``saved`` (held from forward to backward) and ``block_workspace`` (one block recomputed and its
    backward: only the largest block at a time). ``dense_mask_len``: the row length when the model uses a
    dense document mask (short rows on CPU, see ``elasticlm.model.documents``), else 0."""
    subnet = subnet or Subnet.full(config)
    chunk = scan_chunk or config.mamba.chunk_size
    d = subnet.hidden_size
    per_block = []
    for i, width in enumerate(subnet.layers):
        if width is None:
            continue
        per_block.append(layer_bytes_per_token(config, i, width, d, chunk, precision.mode, documents))
    # A width cut inside KV / B-C groups slices weight rows per group: a copy (not a view), which
    # autograd keeps for backward; with checkpointing only the recomputed block's copy exists.
    copies = [_sliced_copy_parameters(config, i, width, d) * precision.residual
              for i, width in enumerate(subnet.layers) if width is not None]
    largest = max(per_block, default=0.0) * tokens
    outer = (2 * d * precision.residual + 16) * tokens  # embedding output, final norm input / output, ids
    # The backward of one block: its (recomputed) saved values, their gradients and the scan's temporaries.
    # Measured on CPU (bench/bench_plan.py): 1.25x the block's saved values with checkpointing (the recompute
    # included), 1.2x on top of them without; see peak_of for how it overlaps the loss chunk.
    if checkpointing:
        saved = len(per_block) * d * precision.residual * tokens + outer
        workspace = 1.25 * largest + max(copies, default=0.0)
    else:
        saved = sum(per_block) * tokens + outer + sum(copies)
        workspace = 1.2 * largest
    doc_index = (1 + 4 * config.mamba.conv_kernel + 3 * 8 * 2) * tokens if documents else 0  # reset, taps, buckets
    if documents and dense_mask_len and any(kind_of(c).attends for c in config.pattern):
        # short CPU rows: one [t, t] bool mask, and what SDPA makes of it (measured with saved_tensors_hooks)
        doc_index += 3.6 * tokens * dense_mask_len
    return {"saved": saved + doc_index, "block_workspace": workspace}


def _sliced_copy_parameters(config: ModelConfig, layer: int, width: Any, hidden: int) -> int:
    """Parameters of the block when slicing copies any of them (kept units inside groups) rather than
    taking views; 0 when every sliced tensor is a view."""
    kind, full = kind_of(config.pattern[layer]), config.layer_widths(layer)
    layout = kind.layout(config, full, width, hidden)
    if all(d.is_view for dims in layout.values() for d in dims):
        return 0
    return int(kind.parameters(config, full, width, hidden))


def layer_flops_per_token(config: ModelConfig, context: int) -> float:
    """Forward FLOPs per token of the full model beyond the 2·parameters of its matmuls: attention
    scores over ``context`` (causal: half on average) and the chunked scan."""
    return sum(kind_of(config.pattern[i]).extra_flops_per_token(config, config.layer_widths(i), context)
               for i in range(config.num_layers))


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class Cluster:
    gpus_per_node: int = 1
    nodes: int = 1
    memory: float | None = None  # bytes per device; None = not checked
    flops: float | None = None  # peak FLOP/s per device
    mfu: float = DEFAULT_MFU
    device: str = "cuda"

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def usable(self) -> float | None:
        """What the allocator can hand out: 8 % for fragmentation and 1.5 GiB for the CUDA context,
        NCCL and kernels' workspaces on a GPU."""
        if self.memory is None:
            return None
        return self.memory * 0.92 - (1.5 * GiB if self.device == "cuda" else 0.0)


@dataclass
class StagePlan:
    name: str
    seq_len: int
    micro_batch: int
    checkpointing: bool
    items: dict[str, float]
    peak: float
    fits: bool | None
    peak_without_checkpointing: float
    tokens_per_s: float | None = None
    hours: float | None = None
    tokens: int = 0


@dataclass
class Plan:
    kind: str  # pretrain | elastic
    parameters: int
    world: int
    parallel: str
    amp: bool
    stages: list[StagePlan]
    memory: float | None
    usable: float | None
    advice: list[str] = field(default_factory=list)
    flops: float | None = None
    flops_source: str = ""

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else all(bool(s.fits) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "parameters": self.parameters, "world_size": self.world, "parallel": self.parallel,
            "bf16": self.amp, "device_memory_bytes": self.memory, "usable_bytes": self.usable,
            "peak_bytes": self.peak, "fits": self.fits, "advice": self.advice,
            "estimates": {"flops_per_device": self.flops, "source": self.flops_source,
                          "note": "throughput and time are estimates, not measurements"},
            "stages": [{"name": s.name, "seq_len": s.seq_len, "micro_batch": s.micro_batch,
                        "activation_checkpointing": s.checkpointing, "peak_bytes": s.peak, "fits": s.fits,
                        "peak_without_checkpointing_bytes": s.peak_without_checkpointing,
                        "breakdown_bytes": s.items, "tokens": s.tokens,
                        "estimated_tokens_per_s": s.tokens_per_s, "estimated_hours": s.hours}
                       for s in self.stages],
        }


def stage_memory(config: ModelConfig, *, seq_len: int, micro_batch: int, world: int, sharded: bool, amp: bool,
                 checkpointing: bool, teacher: bool, grad_accum: int, router_parameters: int = 0,
                 subnet: Subnet | None = None, scan_chunk: int | None = None, documents: bool = True,
                 dense_mask: bool = False, trainable_teacher: bool = False) -> dict[str, float]:
    """Per-rank bytes of one training step, broken down (see the module docstring). ``trainable_teacher``
    (``distill.trainable_teacher``): no separate teacher; the full budget runs on every row with gradients before
    the sampled budgets, so its saved activations and its cross-entropy's fp32 log-probabilities (``[tokens,
    vocab]``) are held alongside theirs, and the sampled budgets' KD runs on whole logits (not chunks) against
    the full budget's."""
    p = count_parameters(config)
    shard = world if sharded else 1
    prec = Precision.of(amp, sharded)
    tokens = micro_batch * seq_len
    dense = seq_len if dense_mask and seq_len <= DENSE_MASK_MAX_LEN else 0
    act = activation_bytes(config, subnet, tokens, prec, checkpointing, scan_chunk, documents, dense)
    d = (subnet or Subnet.full(config)).hidden_size
    chunk_tokens = min(tokens, kd_chunk_tokens(config.vocab_size))  # the loss's own chunking
    items = {
        "student_weights": 4.0 * p / shard,
        "student_grads": 4.0 * p / shard,
        "optimizer_adamw": 8.0 * p / shard,
        "router": 16.0 * router_parameters,
        "teacher_weights": (prec.teacher * p / shard) if teacher else 0.0,
        "activations": act["saved"],
        "block_workspace": act["block_workspace"],
        "teacher_hidden": (prec.teacher * tokens * d) if teacher else 0.0,
        "loss_chunk": 4.0 * chunk_tokens * config.vocab_size * (KD_CHUNK_COPIES if teacher else CE_CHUNK_COPIES),
        "teacher_logits": 0.0,
        "communication": 0.0,
    }
    if trainable_teacher:
        logits = 1.0 * tokens * config.vocab_size
        items["activations"] += activation_bytes(config, None, tokens, prec, checkpointing, scan_chunk, documents,
                                                 dense)["saved"]
        # fp32 log-probabilities of the full budget's CE, plus its low-precision logits under autocast (the KD target)
        items["teacher_logits"] = 4 * logits + (2 * logits if prec.mode != "fp32" else 0.0)
        items["loss_chunk"] = 4.0 * logits * KD_CHUNK_COPIES
    if sharded:  # two blocks in flight: bf16 (or fp32) all-gather of parameters, fp32 reduce-scatter of grads
        largest_block = max(_block_parameters(config, i) for i in range(config.num_layers))
        outer = config.vocab_size * config.hidden_size
        weight_bytes = 2 if prec.mode == "bf16" else 4
        items["communication"] = 2 * largest_block * (weight_bytes + 4) + outer * weight_bytes
    return items


def _block_parameters(config: ModelConfig, layer: int) -> int:
    from ..config import layer_parameters

    return layer_parameters(config, config.pattern[layer], config.layer_widths(layer), config.hidden_size)


def peak_of(items: dict[str, float], grad_accum: int, checkpointing: bool) -> float:
    """The step's peak. Gradients fill up while activations are freed during backward, so they overlap
    only with gradient accumulation. With checkpointing the loss chunk's backward ends before the last
    block is recomputed; without, the last block's backward workspace joins the loss chunk at the start
    of backward (both as measured, bench/bench_plan.py)."""
    static = items["student_weights"] + items["optimizer_adamw"] + items["router"] + items["teacher_weights"]
    work, loss = items["block_workspace"], items["loss_chunk"]
    transient = (items["activations"] + items["teacher_hidden"] + items["teacher_logits"] + items["communication"]
                 + (max(work, loss) if checkpointing else work + loss))
    grads = items["student_grads"]
    return static + max(transient + (grads if grad_accum > 1 else 0.0), grads + items["communication"])


def plan_stage(config: ModelConfig, *, name: str, seq_len: int, batch_size: int, grad_accum: int, cluster: Cluster,
               sharded: bool, amp: bool, checkpointing: bool | None, teacher: bool, router_parameters: int = 0,
               tokens: int = 0, documents: bool = True, trainable_teacher: bool = False) -> StagePlan:
    world = cluster.world
    micro = max(1, batch_size // (grad_accum * world))
    chunk = config.mamba.chunk_size
    scan_chunk = min(chunk, 32) if cluster.device == "cpu" else chunk  # see scan_chunk_size
    common = dict(seq_len=seq_len, micro_batch=micro, world=world, sharded=sharded, amp=amp, teacher=teacher,
                  grad_accum=grad_accum, router_parameters=router_parameters, scan_chunk=scan_chunk,
                  documents=documents, dense_mask=cluster.device == "cpu", trainable_teacher=trainable_teacher)
    without = stage_memory(config, checkpointing=False, **common)
    peak_without = peak_of(without, grad_accum, False)
    usable = cluster.usable()
    if checkpointing is None:  # auto: on when the run would not fit without it
        checkpointing = usable is not None and peak_without > usable
    items = stage_memory(config, checkpointing=checkpointing, **common) if checkpointing else without
    peak = peak_of(items, grad_accum, bool(checkpointing))
    return StagePlan(name, seq_len, micro, checkpointing, items, peak, None if usable is None else peak <= usable,
                     peak_without, tokens=tokens)


def _flops_per_token(config: ModelConfig, seq_len: int, teacher: bool, checkpointing: bool,
                     budget_fraction: float, trainable_teacher: bool = False) -> float:
    p = count_active_parameters(config)  # a mixture of experts computes with top_k experts per token
    matmul = 2 * p + layer_flops_per_token(config, seq_len)
    passes = 4 if checkpointing else 3  # forward + backward (+ recompute)
    student = matmul * budget_fraction * passes
    # a frozen teacher: one forward; a trainable one: the full budget trained on every row besides the sampled one
    return student + (matmul if teacher else 0.0) + (matmul * passes if trainable_teacher else 0.0)


def plan_elastic(run: Any, config: ModelConfig, cluster: Cluster, checkpointing: bool | None = None) -> Plan:
    """The plan of an elastic run (:class:`~elasticlm.train.config.ElasticRunConfig`) on ``config``."""
    from ..elastic.router import Router
    from ..elastic.space import ElasticSpace

    cfg = run.train
    amp = _amp(cfg.dtype, cluster)
    sharded = cluster.world > 1 and cfg.parallel == "fsdp"
    space = ElasticSpace.build(config, run.elastic)
    import torch

    with torch.random.fork_rng(devices=[]):  # building a router to count it must not move the run's RNG
        router_params = sum(p.numel() for p in Router(space, run.elastic.router_hidden).parameters())
    fractions = [t / space.cost_of(Subnet.full(config)) if space.target in ("params", "active") else 1.0
                 for t in space.targets]
    stages = []
    for i, s in enumerate(run.stages):
        w = s.budget_weights or [1.0] * len(fractions)
        mean_fraction = sum(a * b for a, b in zip(w, fractions, strict=True)) / sum(w)
        ckpt = checkpointing if checkpointing is not None else cfg.activation_checkpointing
        stage = plan_stage(config, name=s.name or f"stage {i + 1}", seq_len=s.seq_len, batch_size=s.batch_size,
                           grad_accum=cfg.grad_accum, cluster=cluster, sharded=sharded, amp=amp,
                           checkpointing=ckpt, teacher=not run.distill.trainable_teacher,
                           router_parameters=router_params, tokens=s.tokens,
                           trainable_teacher=run.distill.trainable_teacher)
        _estimate(stage, cluster, _flops_per_token(config, s.seq_len, not run.distill.trainable_teacher,
                                                   stage.checkpointing, mean_fraction,
                                                   trainable_teacher=run.distill.trainable_teacher))
        stages.append(stage)
    return _finish(Plan("elastic", count_parameters(config), cluster.world, "fsdp" if sharded else
                        ("ddp" if cluster.world > 1 else "single"), amp, stages, cluster.memory, cluster.usable()),
                   config, cluster, run.train.grad_accum)


def plan_pretrain(run: Any, cluster: Cluster, checkpointing: bool | None = None) -> Plan:
    """The plan of a parent pretraining run (:class:`~elasticlm.train.config.RunConfig`)."""
    cfg = run.train
    if cluster.world > 1:
        raise ConfigError("`elasticlm pretrain` trains on one device (torchrun is supported by `elasticlm train` "
                          "only); plan it with --gpus 1 --nodes 1")
    amp = _amp(cfg.dtype, cluster)
    sharded = False
    ckpt = checkpointing if checkpointing is not None else cfg.activation_checkpointing
    stage = plan_stage(run.model, name="pretrain", seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                       grad_accum=cfg.grad_accum, cluster=cluster, sharded=sharded, amp=amp, checkpointing=ckpt,
                       teacher=False, tokens=cfg.steps * cfg.batch_size * cfg.seq_len)
    _estimate(stage, cluster, _flops_per_token(run.model, cfg.seq_len, False, stage.checkpointing, 1.0))
    return _finish(Plan("pretrain", count_parameters(run.model), cluster.world, "fsdp" if sharded else
                        ("ddp" if cluster.world > 1 else "single"), amp, [stage], cluster.memory, cluster.usable()),
                   run.model, cluster, cfg.grad_accum)


def _amp(dtype: str, cluster: Cluster) -> bool:
    return dtype == "bfloat16" or (dtype == "auto" and cluster.device == "cuda")


def _estimate(stage: StagePlan, cluster: Cluster, flops_per_token: float) -> None:
    if cluster.flops:
        stage.tokens_per_s = cluster.world * cluster.flops * cluster.mfu / flops_per_token
        stage.hours = stage.tokens / stage.tokens_per_s / 3600 if stage.tokens else None


def _finish(plan: Plan, config: ModelConfig, cluster: Cluster, grad_accum: int) -> Plan:
    plan.flops = cluster.flops
    usable = plan.usable
    if usable is None or plan.fits:
        return plan
    for s in plan.stages:
        if s.fits:
            continue
        if not s.checkpointing:
            plan.advice.append(f"{s.name}: turn on activation checkpointing (train.activation_checkpointing = "
                               "true, or leave it unset for auto)")
        if s.micro_batch > 1:
            plan.advice.append(f"{s.name}: lower the micro-batch ({s.micro_batch} rows per rank): raise "
                               "train.grad_accum")
        static = s.items["student_weights"] + s.items["student_grads"] + s.items["optimizer_adamw"] + \
            s.items["teacher_weights"]
        if plan.parallel != "fsdp" and static > 0.5 * usable:
            plan.advice.append("shard the model: train.parallel = \"fsdp\" (weights, gradients, optimizer and "
                               "teacher divided by the number of GPUs)")
        elif plan.parallel == "fsdp" and static > 0.5 * usable:
            need = math.ceil(plan.world * static / (0.5 * usable))
            plan.advice.append(f"more GPUs: about {need} to bring the sharded state under half of each device")
        if s.micro_batch == 1 and s.checkpointing:
            plan.advice.append(f"{s.name}: one row of {s.seq_len} tokens does not fit even with checkpointing; "
                               "shorten the stage's seq_len (sequence parallelism is not implemented)")
    return plan


def device_memory(device: str | Any) -> float | None:
    """Total memory of the current CUDA device, or the memory available to a process on a CPU host."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_checkpointing(setting: bool | None, plan: Plan) -> bool:
    """``train.activation_checkpointing``: an explicit true / false wins; unset (auto) turns it on when
    the plan of this run on this device does not fit without it."""
    if setting is not None:
        return setting
    return any(s.checkpointing for s in plan.stages)


def forward_memory(config: ModelConfig, rows: int, seq_len: int, logit_copies: int = 3) -> float:
    """Peak bytes of a no-grad fp32 forward of ``rows × seq_len`` tokens (evaluation, calibration): the weights,
    one block's working set (a forward keeps no more than a checkpointed training step's recomputed block) and
    ``logit_copies`` fp32 ``[tokens, vocab]`` tensors (logits, log-softmax, the reference's)."""
    from ..config import count_parameters
    from ..model.documents import DENSE_MASK_MAX_LEN

    tokens = rows * seq_len
    dense = seq_len if seq_len <= DENSE_MASK_MAX_LEN else 0
    act = activation_bytes(config, None, tokens, Precision(), checkpointing=True, dense_mask_len=dense)
    return count_parameters(config) * 4 + act["block_workspace"] + tokens * config.vocab_size * 4 * logit_copies


def check_forward_memory(config: ModelConfig, rows: int, seq_len: int, device: Any, knobs: str) -> None:
    """Refuse a forward pass that would not fit this device's memory (on a CPU: the memory available now),
    instead of being killed by the kernel without a message."""
    available = device_memory(device)
    need = forward_memory(config, rows, seq_len)
    if available is not None and need > 0.9 * available:
        raise ConfigError(f"{rows} sequences of {seq_len} tokens need about {need / GiB:.1f} GiB, more than the "
                          f"{available / GiB:.1f} GiB available; lower {knobs}")


def preflight(plan: Plan, device: str) -> None:
    """Refuse a run whose plan does not fit this device's memory (before anything is allocated or written),
    naming the knobs to turn."""
    if plan.fits is not False:
        return
    worst = max(plan.stages, key=lambda s: s.peak)
    knobs = "; ".join(plan.advice[:3]) or "lower the batch size or sequence length"
    raise ConfigError(f"this run needs about {worst.peak / GiB:.1f} GiB per {device} at its peak ({worst.name}: "
                      f"{worst.seq_len} tokens × {worst.micro_batch} rows), more than the {plan.usable / GiB:.1f} GiB "
                      f"available; {knobs} (`elasticlm plan --config …` shows the breakdown)")


def format_plan(plan: Plan) -> str:
    """The plan as a readable table."""
    gib = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    lines = [f"{plan.kind} run: {plan.parameters / 1e9:.3f} B parameters, {plan.world} rank(s), "
             f"{plan.parallel}, {'bf16 autocast' if plan.amp else 'fp32'}"]
    if plan.memory:
        lines.append(f"device memory {plan.memory / GiB:.1f} GiB, usable {plan.usable / GiB:.1f} GiB "
                     "(8 % fragmentation reserve, 1.5 GiB CUDA context)")
    names = list(plan.stages[0].items)
    header = "| GiB per rank | " + " | ".join(f"{s.name} ({s.seq_len} tok × {s.micro_batch})" for s in plan.stages)
    lines += ["", header + " |", "|---|" + "---|" * len(plan.stages)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(gib(s.items[n]) for s in plan.stages) + " |")
    lines.append("| **peak** | " + " | ".join(f"**{s.peak / GiB:.2f}**" for s in plan.stages) + " |")
    lines.append("| peak without checkpointing | " + " | ".join(gib(s.peak_without_checkpointing)
                                                               for s in plan.stages) + " |")
    lines.append("| activation checkpointing | " + " | ".join("on" if s.checkpointing else "off"
                                                             for s in plan.stages) + " |")
    if plan.usable:
        lines.append("| fits | " + " | ".join(
            f"yes ({(plan.usable - s.peak) / GiB:.1f} GiB headroom)" if s.fits else "NO" for s in plan.stages) + " |")
    if plan.flops:
        lines += ["", f"Estimates (not measurements): {plan.flops / 1e12:.0f} TFLOP/s per device ({plan.flops_source})"
                  f" at {DEFAULT_MFU:.0%} utilisation"]
        for s in plan.stages:
            if s.tokens_per_s:
                hours = f", {s.tokens / 1e9:.2f} B tokens ≈ {s.hours:.1f} h" if s.hours else ""
                lines.append(f"  {s.name}: ≈ {s.tokens_per_s:,.0f} tokens/s{hours}")
    if plan.memory is None:
        lines += ["", "device memory unknown: pass --gpu-memory (e.g. 141GB) to say whether it fits."]
    if plan.fits is True:
        lines += ["", "fits."]
    elif plan.fits is False:
        lines += ["", "does NOT fit. Turn one of these knobs:"] + [f"  - {a}" for a in plan.advice]
    return "\n".join(lines)


__all__ = ["Cluster", "Plan", "StagePlan", "activation_bytes", "device_memory", "format_plan", "parse_bytes",
           "parse_flops", "plan_elastic", "plan_pretrain", "resolve_checkpointing", "stage_memory"]
