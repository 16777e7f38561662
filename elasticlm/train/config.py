"""Run configuration: one TOML file, every field overridable on the command line.

    [model]      ModelConfig fields, or `preset = "demo"` plus overrides
    [tokenizer]  kind = "bytes" | "file" (path = DIR with tokenizer.json) | "train" (vocab_size)
    [data]       DataConfig fields (source = "synthetic" | "text" | "jsonl" | "hf", …)
    [train]      TrainConfig fields (optimiser, schedule, batch, checkpoints, logging)
    [eval]       EvalConfig fields (periodic task accuracy)

``--set train.lr=1e-3 --set model.hidden_size=128`` overrides a field; values are parsed as
JSON when they can be (numbers, booleans, lists, quoted strings) and kept as text otherwise.
The elastic trainer (a later issue) extends this format with its own tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, ModelConfig, check_fields, parse_value, read_config_file
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
        return {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "tokenizer", "data", "train",
                                                                              "eval")}


_SECTIONS = {"tokenizer": TokenizerConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls: type, table: dict[str, Any], section: str) -> Any:
    check_fields(cls, table, f"[{section}]")
    try:
        obj = cls(**table)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from None
    for f in dataclasses.fields(cls):  # cheap type check against the defaults' types
        v, default = getattr(obj, f.name), f.default if f.default is not dataclasses.MISSING else None
        if default is not None and v is not None and type(default) in (int, float, bool, str):
            ok = isinstance(v, type(default)) or (type(default) is float and isinstance(v, int)
                                                   and not isinstance(v, bool))
            if not ok or (type(default) is int and isinstance(v, bool)):
                raise ConfigError(f"{section}.{f.name} must be {type(default).__name__}, got {v!r}")
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def apply_overrides(tables: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to raw TOML tables (returns a new dict)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tables.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. train.lr=1e-3)")
        key, value = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        if section not in ("model", *_SECTIONS):
            raise ConfigError(f"override {item!r}: unknown section {section!r}")
        out.setdefault(section, {})[name] = parse_value(value)
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
        model_table = {**PRESETS[name], **model_table}
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
