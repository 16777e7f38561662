"""Run configuration: one TOML file, every field overridable on the command line.

    [model]      ModelConfig fields, or `preset = "demo"` plus overrides
    [tokenizer]  kind = "bytes" | "file" (path = DIR with tokenizer.json) | "train" (vocab_size)
    [data]       DataConfig fields (source = "synthetic" | "text" | "jsonl" | "hf", …)
    [train]      TrainConfig fields (optimiser, schedule, batch, checkpoints, logging)
    [eval]       EvalConfig fields (periodic task accuracy)

``--set train.lr=1e-3 --set model.hidden_size=128`` overrides a field; values are parsed as
JSON when they can be (numbers, booleans, lists, quoted strings) and kept as text otherwise.
The elastic trainer (`elasticlm train`) reads [parent], [elastic], [distill], [data], [train], [eval]
and an array of [[stages]] (:class:`ElasticRunConfig`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, ModelConfig, check_fields, overlay_tables, parse_value, read_config_file
from ..data.datasets import DataConfig
from ..errors import ConfigError


@dataclass
class TokenizerConfig:
    kind: str = "bytes"  # bytes | file | train
    path: str | None = None  # kind = "file": a directory holding tokenizer.json
    vocab_size: int = 4096  # kind = "train"
    train_documents: int = 20_000  # kind = "train": documents read from the training split

    def validate(self) -> None:
        if self.kind not in ("bytes", "file", "train"):
            raise ConfigError(f"tokenizer.kind must be bytes, file or train, got {self.kind!r}")
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.kind='file' needs tokenizer.path (a directory with tokenizer.json)")


@dataclass
class TrainConfig:
    out: str = "runs/parent"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    document_masking: bool = True  # packed documents do not see each other (attention, conv, SSM state)
    # Per-block activation checkpointing: true / false, or unset = auto (on when `elasticlm plan`
    # predicts that the activations without it would not fit this device's memory).
    activation_checkpointing: bool | None = None
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bf16 autocast on cuda, fp32 on cpu; or float32 / bfloat16
    threads: int = 0  # torch intra-op threads on CPU (0 = torch's default)
    log_every: int = 10
    eval_every: int = 250
    val_batches: int = 8
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    tensorboard: bool = True  # if the tensorboard package is installed
    parallel: str = "ddp"  # under torchrun: ddp (replicated) or fsdp (FSDP2, each block sharded); elastic trainer

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "val_batches",
                     "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"train.{name} must be a positive int, got {v!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")
        if len(self.betas) != 2:
            raise ConfigError("train.betas must be two numbers")


@dataclass
class EvalConfig:
    tasks: bool = True  # exact-match task accuracy at each evaluation (synthetic data)
    n: int = 40  # held-out examples per family (and difficulty) at each evaluation
    hard: bool = False  # also evaluate the hard difficulty during training (`elasticlm eval` always does)


@dataclass
class RunConfig:
    model: ModelConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(),
                **{name: dataclasses.asdict(getattr(self, name)) for name in ("tokenizer", "data", "train", "eval")}}


_SECTIONS = {"tokenizer": TokenizerConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls: type, table: dict[str, Any], section: str) -> Any:
    check_fields(cls, table, f"[{section}]")
    hints = typing.get_type_hints(cls)
    for name, value in table.items():  # each field against its annotation, before the dataclass sees it
        problem = _type_problem(value, hints.get(name, Any))
        if problem:
            raise ConfigError(f"{section}.{name} must be {problem}, got {value!r}")
    try:
        obj = cls(**table)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from None
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should be when it does not match the annotation ``hint`` (None when it does). Numbers
    must be finite; an int is accepted for a float.

    >>> _type_problem(3, float), _type_problem(float("nan"), float), _type_problem([1, "a"], list[int])
    (None, 'a finite float', 'list of int')
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, a) for a in args]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if hint is type(None):
        return None if value is None else "unset"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "int"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite float"
    if hint is str:
        return None if isinstance(value, str) else "str"
    if origin is list:
        if not isinstance(value, list):
            return "a list"
        inner = args[0] if args else Any
        return "list of " + _type_name(inner) if any(_type_problem(v, inner) for v in value) else None
    if origin is dict:
        if not isinstance(value, dict):
            return "a table"
        inner = args[1] if len(args) > 1 else Any
        return "table of " + _type_name(inner) if any(_type_problem(v, inner) for v in value.values()) else None
    return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def apply_overrides(tables: dict[str, Any], overrides: list[str],
                    sections: tuple[str, ...] = ("model", "tokenizer", "data", "train", "eval")) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to raw TOML tables (returns a new dict);
    ``stages[1].tokens=…`` sets a field of one entry of an array of tables, and ``model.moe.top_k=1`` a field of
    a table inside a section.

    >>> apply_overrides({"model": {"moe": {"top_k": 2, "n_group": 1}}}, ["model.moe.top_k=1"])["model"]["moe"]
    {'top_k': 1, 'n_group': 1}
    >>> apply_overrides({"model": {"mamba": {"chunk_size": 64}}}, ["model.chunk_size=32"])["model"]
    {'mamba': {'chunk_size': 32}}
    """
    out = {k: dict(v) if isinstance(v, dict) else [dict(t) for t in v] if isinstance(v, list) else v
           for k, v in tables.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. train.lr=1e-3)")
        key, value = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        if "[" in section and section.endswith("]"):
            array, index = section[:-1].split("[", 1)
            try:
                out[array][int(index)][name] = parse_value(value)
            except (ValueError, IndexError, KeyError, TypeError):
                raise ConfigError(f"override {item!r}: no {section} in the config file") from None
            continue
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}")
        *path, field = name.split(".")  # model.sliding_attention.window=512: a table inside the section
        if section == "model" and not path:  # model.chunk_size=32 (an older flat key) overrides [model.mamba]'s
            out["model"] = overlay_tables(out.get("model") or {}, {field: parse_value(value)})
            continue
        target = out.setdefault(section, {})
        for part in path:
            inner = target.get(part, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"override {item!r}: {section}.{part} is not a table")
            inner = dict(inner)  # a copy: the caller's tables stay as they were
            target[part] = inner
            target = inner
        target[field] = parse_value(value)
    return out


def run_config_from_tables(tables: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(tables) - {"model", *_SECTIONS})
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}; expected model, tokenizer, data, train, eval")
    model_table = dict(tables.get("model") or {})
    name = model_table.pop("preset", None)
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        model_table = overlay_tables(PRESETS[name], model_table)
    if not model_table:
        raise ConfigError("the [model] table is missing (give ModelConfig fields or preset = \"...\")")
    run = RunConfig(
        model=ModelConfig.from_dict(model_table),
        **{s: _build(cls, tables.get(s) or {}, s) for s, cls in _SECTIONS.items()},
    )
    return run


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    tables = read_config_file(path) if path is not None else {}
    return run_config_from_tables(apply_overrides(tables, overrides or []))


# -- elastic training (`elasticlm train`) ------------------------------------------------------


@dataclass
class ParentConfig:
    path: str = ""  # the importance-ordered parent directory (`elasticlm reorder`); teacher and student init
    # The parent's architecture when path does not exist yet: a preset name (e.g. "nemotron-nano-12b-v2") or a
    # config.json. Only `elasticlm plan` reads it (training needs the weights at path).
    architecture: str | None = None


@dataclass
class DistillConfig:
    temperature: float = 1.0  # KD temperature τ (logits / τ; the loss is scaled by τ² as usual)
    trainable_teacher: bool = False  # the teacher is the student's full budget, trained with ce_weight · CE
    ce_weight: float = 1.0  # α: weight of the full budget's CE when trainable_teacher
    teacher: str | None = None  # another teacher directory (default: the parent), e.g. KD of one pruned model

    def validate(self) -> None:
        if not self.temperature > 0 or self.ce_weight < 0:
            raise ConfigError("distill.temperature must be > 0 and distill.ce_weight >= 0")
        if self.teacher is not None and self.trainable_teacher:
            raise ConfigError("distill.teacher and distill.trainable_teacher exclude each other (a trainable "
                              "teacher is the student's own full budget)")


@dataclass
class StageConfig:
    name: str = ""
    seq_len: int = 256
    batch_size: int = 8
    tokens: int = 1_000_000  # this stage trains ceil(tokens / (batch_size · seq_len)) steps
    budget_weights: list[float] | None = None  # sampling weight per budget (default: uniform)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def check(self, n_budgets: int, where: str) -> None:
        for name in ("seq_len", "batch_size", "tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{where}.{name} must be a positive int, got {v!r}")
        w = self.budget_weights
        if w is not None and (len(w) != n_budgets or any(not isinstance(x, (int, float)) or x < 0 for x in w)
                              or not sum(w) > 0):
            raise ConfigError(f"{where}.budget_weights must hold {n_budgets} non-negative numbers (one per budget) "
                              f"with a positive sum, got {w!r}")


def default_stages(train: TrainConfig, n_budgets: int) -> list[StageConfig]:
    """Stage 1: 70 % of ``train.steps`` at ``train.seq_len``, uniform budgets; stage 2: the rest at
    four times the context (same tokens per step), weighted to the largest budget (paper: 0.5/0.3/0.2)."""
    tokens = train.steps * train.batch_size * train.seq_len
    weights = [0.5, 0.3, 0.2] if n_budgets == 3 else [float(n_budgets - i) for i in range(n_budgets)]
    long_batch = max(1, train.batch_size // 4)
    return [StageConfig("short", train.seq_len, train.batch_size, int(tokens * 0.7), None),
            StageConfig("long", train.seq_len * 4, long_batch, tokens - int(tokens * 0.7), weights)]


@dataclass
class ElasticRunConfig:
    parent: ParentConfig
    elastic: Any  # elasticlm.elastic.space.ElasticConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("parent", "elastic", "distill", "data",
                                                                             "train", "eval")}
        out["stages"] = [dataclasses.asdict(s) for s in self.stages]
        return out


_ELASTIC_SECTIONS = {"parent": ParentConfig, "distill": DistillConfig, "data": DataConfig, "train": TrainConfig,
                     "eval": EvalConfig}


def elastic_run_config_from_tables(tables: dict[str, Any]) -> ElasticRunConfig:
    from ..elastic.space import ElasticConfig

    known = {*_ELASTIC_SECTIONS, "elastic", "stages"}
    unknown = sorted(set(tables) - known)
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}; expected {sorted(known)}")
    parent = _build(ParentConfig, tables.get("parent") or {}, "parent")
    if not parent.path:
        raise ConfigError("[parent] path is missing: the importance-ordered parent directory (`elasticlm reorder`)")
    run = ElasticRunConfig(
        parent=parent,
        elastic=_build(ElasticConfig, tables.get("elastic") or {}, "elastic"),
        **{s: _build(cls, tables.get(s) or {}, s) for s, cls in _ELASTIC_SECTIONS.items() if s != "parent"},
    )
    raw = tables.get("stages")
    n = len(run.elastic.budgets)
    if raw is None:
        run.stages = default_stages(run.train, n)
    else:
        if not isinstance(raw, list) or not raw:
            raise ConfigError("[[stages]] must be a non-empty array of tables")
        run.stages = [_build(StageConfig, dict(t), f"stages[{i}]") for i, t in enumerate(raw)]
    for i, s in enumerate(run.stages):
        s.check(n, f"stages[{i}]")
        if s.batch_size % run.train.grad_accum:
            raise ConfigError(f"stages[{i}].batch_size={s.batch_size} is not divisible by "
                              f"train.grad_accum={run.train.grad_accum}")
    return run


def load_elastic_run_config(path: str | Path | None, overrides: list[str] | None = None) -> ElasticRunConfig:
    tables = read_config_file(path) if path is not None else {}
    return elastic_run_config_from_tables(apply_overrides(tables, overrides or [], (*_ELASTIC_SECTIONS, "elastic")))
