"""Shipping an elastic checkpoint: every trained budget as a standalone model, and what each costs.

``extract_budgets`` slices budgets out of an elastic checkpoint (no training): weights, config,
tokenizer and a model card per budget; sub-models are written as stock Hugging Face directories
(transformers loads them without remote code; per-layer FFN widths and head counts zero-padded to one width,
exactly), those that no such directory can hold (per-layer Mamba widths) natively.
``budget_report`` is what ``elasticlm info`` prints for an elastic checkpoint.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import (
    ROUTER_WEIGHTS,
    ROUTING,
    atomic_directory,
    check_format,
    check_output_path,
    read_routing,
    write_model_files,
)
from ..config import LAYER_NAMES, ModelConfig, Subnet, count_parameters, subnet_config
from ..errors import ConfigError
from ..model.gguf import DT_CLAMP_NOTE, gguf_arch, gguf_incompatibility
from ..model.hf import hf_incompatibility, hf_label
from ..model.padding import padding_note
from ..model.quantize import METHOD, is_quantized, quantize_, state_bytes
from .deployment import Deployment
from .extract import extract
from .prune import describe_subnet
from .space import memory_bytes


def output_format(config: ModelConfig, requested: str, label: str) -> str:
    """``auto``: the parent family's Hugging Face class when the sub-model can be one, else native."""
    if requested == "gguf":
        reason = gguf_incompatibility(config)
        if reason:
            raise ConfigError(f"budget {label} cannot be written as GGUF (llama.cpp {gguf_arch(config.family)}): "
                              f"{reason}")
        return requested
    reason = hf_incompatibility(config)
    if requested == "hf" and reason:
        raise ConfigError(f"budget {label} cannot be written as {hf_label(config.family)}: {reason}")
    if requested == "auto":
        return "native" if reason else "hf"
    return requested


def model_card(label: str, entry: dict[str, Any], config: ModelConfig, parent: ModelConfig, fmt: str,
               source: str) -> str:
    """A short README.md: what the model is, its architecture per layer, and how it was made."""
    n = count_parameters(config)
    lines = [
        f"# Budget {label} of an elastic model",
        "",
        f"- parameters: {n:,} ({n / count_parameters(parent):.1%} of the parent's {count_parameters(parent):,})",
        f"- budget: {label} (target {entry.get('target', n):,.0f} {entry.get('target_kind', 'params')})",
        f"- format: {format_name(fmt, config.family)}{padding_note(config) if fmt == 'hf' else ''}",
        f"- made by: `elasticlm extract` (elasticlm {__version__}, {datetime.date.today()}) from the elastic "
        f"checkpoint `{source}`, by slicing the nested sub-model its router chose for this budget; no training "
        "after the elastic run. The weights are the prefixes of the importance-ordered parent's axes.",
        f"- architecture: {entry.get('architecture', '')}",
        "",
        "| layer | type | widths |",
        "|---|---|---|",
    ]
    for i in range(config.num_layers):
        lines.append(f"| {i} | {LAYER_NAMES[config.pattern[i]]} | {config.layer_widths(i)} |")
    if fmt == "gguf" and "M" in config.pattern:
        lines += ["", f"Note for llama.cpp: {DT_CLAMP_NOTE}."]
    return "\n".join(lines) + "\n"


def format_name(fmt: str, family: str) -> str:
    return {"hf": f"{hf_label(family)} (transformers, no remote code)", "native": "elasticlm native",
            "gguf": f"GGUF for llama.cpp ({gguf_arch(family)}), model.gguf"}[fmt]


def extract_budgets(deployment: Deployment, labels: list[str], out: str | Path, fmt: str = "auto",
                    force: bool = False, inputs: list[str | Path] | None = None,
                    gguf_type: str = "auto") -> list[tuple[str, Path, str]]:
    """Write each budget (labels of ``deployment.budgets``) as a standalone model. One budget: ``out`` is its
    directory; several: ``out/budget-<label>/`` each. Atomic: an interrupted run leaves nothing at ``out``."""
    model, source = deployment.model, deployment.source
    if fmt not in ("auto", "hf", "native", "gguf"):
        raise ConfigError(f"--format must be auto, hf, native or gguf, got {fmt!r}")
    if fmt == "gguf":
        check_format(model.config, "gguf", source)  # the tokenizer, before any slicing
    if fmt == "auto" and is_quantized(model):
        fmt = "native"  # the one format that keeps the int8 weights (hf and gguf get their float values)
    out = Path(out)
    routing = (read_routing(source) if source is not None else None) or {"budgets": []}
    entries = {b["budget"]: b for b in routing["budgets"]}
    plans = []
    for label in labels:  # check every budget before writing anything
        subnet = deployment.budgets[label]
        config = subnet_config(model.config, subnet)
        plans.append((label, subnet, config, output_format(config, fmt, label)))
    inputs = inputs if inputs is not None else [p for p in [source] if p is not None]
    check_output_path(out, force, "extract", inputs)
    written = []
    with atomic_directory(out, force, "extract", inputs) as tmp:
        for label, subnet, _, f in plans:
            target = tmp if len(plans) == 1 else tmp / f"budget-{label}"
            target.mkdir(exist_ok=True)
            small = extract(model, subnet)
            write_model_files(small, target, f, tokenizer_dir=source, gguf_type=gguf_type)
            entry = entries.get(label) or {"architecture": describe_subnet(model.config, subnet),
                                           "target": deployment.targets.get(label, 0), "target_kind": "params"}
            card = model_card(label, entry, small.config, model.config, f, str(source))
            if label in deployment.untrained:
                card = card.replace("\n\n| layer |", f"\n- **not trained**: {deployment.untrained[label].describe()}"
                                                     "\n\n| layer |", 1)
            (target / "README.md").write_text(card)
            final = out if len(plans) == 1 else out / f"budget-{label}"
            written.append((label, final, f))
    return written


def quantize_checkpoint(source: str | Path, out: str | Path, method: str = "int8",
                        force: bool = False) -> tuple[Deployment, int, int]:
    """Write ``source`` (a model directory, elastic or plain) with its matrices in int8 (:mod:`elasticlm.int8`):
    one copy that holds every budget, each budget's slice exactly the slice of the dequantized parent. The
    budgets, the router and the tokenizer come along. Returns the quantized deployment (read from ``out``) and
    the float and int8 sizes in bytes."""
    if method != METHOD:
        raise ConfigError(f"--to must be {METHOD}, got {method!r}")
    source = Path(source)
    check_output_path(out, force, "model", [source])
    loaded = Deployment.load(source)
    model = loaded.model
    if is_quantized(model):
        raise ConfigError(f"{source} is already quantized ({METHOD})")
    before = state_bytes(model)
    quantize_(model)
    with atomic_directory(out, force, "model", [source]) as tmp:
        read_from = loaded.source  # where load read it (a .gguf source: the directory it was imported to)
        assert read_from is not None
        write_model_files(model, tmp, "native", tokenizer_dir=read_from)
        for name in (ROUTING, ROUTER_WEIGHTS):
            if (read_from / name).is_file():
                shutil.copy2(read_from / name, tmp / name)
    return Deployment(model, Path(out), loaded.budgets, loaded.targets), before, state_bytes(model)


def budget_report(cfg: ModelConfig, budgets: dict[str, Subnet], context: int = 4096, dtype: str = "bfloat16") -> str:
    """Per-budget parameters and deployment memory, and one checkpoint vs separate models."""
    parent = count_parameters(cfg)
    lines = [f"budgets      {len(budgets)} (nested in one set of weights)",
             f"| budget | parameters | of parent | memory @ {context:,} tokens ({dtype}) | architecture |",
             "|---|---|---|---|---|"]
    total_separate = 0
    for label, subnet in budgets.items():
        n = count_parameters(cfg, subnet)
        total_separate += n
        mem = memory_bytes(cfg, subnet, context=context, dtype=dtype)
        lines.append(f"| {label} | {n:,} | {n / parent:.1%} | {_size(mem['total'])} (weights {_size(mem['weights'])}, "
                     f"KV {_size(mem['kv_cache'])}, Mamba state {_size(mem['mamba_state'])}) | "
                     f"{describe_subnet(cfg, subnet)} |")
    lines.append(f"one elastic checkpoint holds {parent:,} parameters; the {len(budgets)} budgets as separate "
                 f"models hold {total_separate:,} ({total_separate / parent:.2f}x)")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["budget_report", "extract_budgets", "model_card", "quantize_checkpoint"]


