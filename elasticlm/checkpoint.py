"""Model directories on disk: native elasticlm or Hugging Face (every family of ``config.FAMILIES``), safetensors +
JSON only.

A native directory holds ``config.json`` (``{"elasticlm_format": 1, "model": {...}}``, per-layer
widths allowed), ``model.safetensors`` and any tokenizer files. A NemotronH directory is what
``transformers`` writes (``config.json`` with ``model_type: nemotron_h``, one or several
safetensors shards with ``backbone.*`` keys).

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place
only when complete, so a crash never leaves a directory that loads as a valid checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, Subnet
from .errors import CheckpointError, ConfigError
from .model import padding
from .model.gguf_import import hf_directory
from .model.hf import (
    CACHE_ANCHOR,
    HF_CLASSES,
    config_from_hf,
    config_to_hf,
    fuse_experts,
    hf_state_dict,
    is_hf_config,
    name_from_hf,
    resolve_tied_head,
    stored_config_from_hf,
)
from .model.hybrid import HybridLM
from .model.quantize import QUANTIZATION, align_, dequantize_, is_quantized, quantize_
from .outputs import atomic_file, atomic_output, resolve_output
from .tokenizer import copy_tokenizer_config

NATIVE_FORMAT = 1
# native: elasticlm's own; hf: the family's transformers class (per-layer widths zero-padded); gguf: one llama.cpp file
FORMATS = ("native", "hf", "gguf")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """The ModelConfig of a checkpoint directory (or a .gguf file, see :mod:`elasticlm.model.gguf_import`) and its
    kind: ``"native"`` or ``"hf"``."""
    path = hf_directory(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a model directory with config.json)")
    raw = read_json(path / "config.json")
    try:
        if "elasticlm_format" in raw:
            if raw["elasticlm_format"] != NATIVE_FORMAT:
                raise CheckpointError(f"{path}: unsupported elasticlm_format {raw['elasticlm_format']!r}")
            return ModelConfig.from_dict(raw.get("model")), "native"
        if is_hf_config(raw):
            return config_from_hf(raw), "hf"
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    raise CheckpointError(
        f"{path / 'config.json'}: model_type {raw.get('model_type')!r} is not supported "
        f"(expected an elasticlm directory or a Hugging Face one of {', '.join(sorted(HF_CLASSES))})"
    )


def _read_safetensors(file: Path, private: bool) -> dict[str, torch.Tensor]:
    if private:  # each tensor in its own memory, so one replaced later is freed (safetensors >= 0.8)
        try:
            return load_file(file, backend="pread")
        except TypeError:
            pass
    return load_file(file)  # memory-mapped: pages stay mapped while any tensor of the file lives


def read_weights(path: Path, private: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a directory's safetensors file(s), single or sharded. ``private``: read each
    tensor into its own memory instead of mapping the file (see :func:`load` with ``serving``)."""
    if (path / WEIGHTS_INDEX).exists():
        index = read_json(path / WEIGHTS_INDEX)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise CheckpointError(f"{path / WEIGHTS_INDEX} has an empty weight_map")
    elif (path / WEIGHTS).exists():
        shards = [WEIGHTS]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            bins = [p.name for p in path.glob("*.bin")]
            hint = " (pickle .bin checkpoints are not read; convert them to safetensors)" if bins else ""
            raise CheckpointError(f"{path} has no safetensors weights{hint}")
        shards = found
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = path / shard
        try:
            out.update(_read_safetensors(file, private))
        except FileNotFoundError:
            raise CheckpointError(f"{file} is listed in the index but missing") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{file} is corrupt or truncated ({msg})") from None
    return out


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
         serving: bool = False) -> HybridLM:
    """Load a native elasticlm or Hugging Face (any family of ``config.FAMILIES``) directory as a
    HybridLM (eval mode).

    ``serving=True`` stores the projections in the layout that decodes fastest, for the parent and
    every nested budget alike (:meth:`HybridLM.use_decode_layout`; one copy of the weights).

    A ``.gguf`` file is imported through transformers' GGUF loader first (:mod:`elasticlm.model.gguf_import`).

    Raises CheckpointError with a one-line message for a missing, corrupt, truncated or
    mismatched checkpoint.
    """
    path = hf_directory(path)
    config, kind = read_config(path)
    raw = read_weights(path, private=serving)
    raw_config = read_json(path / "config.json")
    quantization = raw_config.get("quantization") if kind == "native" else None
    if quantization is not None and (not isinstance(quantization, dict)
                                     or quantization.get("method") != QUANTIZATION["method"]):
        raise CheckpointError(f"{path / 'config.json'}: unsupported quantization {quantization!r} "
                              f"(this version reads {QUANTIZATION['method']!r}, from `elasticlm quantize`)")
    anchored = bool(raw_config.get(CACHE_ANCHOR))
    # an export padded to uniform widths stores the padded tensors; the model is sliced to the real ones below
    stored = stored_config_from_hf(raw_config) if kind == "hf" else config
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = name_from_hf(key, config.family, anchored) if kind == "hf" else key
        if name is not None:
            weights[name] = tensor
    if kind == "hf":
        try:
            weights = fuse_experts(weights)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        tied = resolve_tied_head(stored, weights).tie_word_embeddings
        config = dataclasses.replace(config, tie_word_embeddings=tied)
        stored = dataclasses.replace(stored, tie_word_embeddings=tied)
    elif config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = HybridLM(stored, device="meta")
    if quantization is not None:
        quantize_(model)  # its structure: int8 values and scales where the float weights were
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: weights missing {missing[:3]}{' …' if len(missing) > 3 else ''} "
                              f"({len(missing)} in all); the checkpoint does not match its config.json")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected weights {unexpected[:3]}{' …' if len(unexpected) > 3 else ''} "
                              "for the architecture in config.json")
    kinds = {k: v.dtype for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"config.json implies {tuple(shape)}")
        if weights[name].is_floating_point() != kinds[name].is_floating_point:
            raise CheckpointError(f"{path}: {name} is stored as {str(weights[name].dtype).removeprefix('torch.')}, "
                                  f"expected a {'floating-point' if kinds[name].is_floating_point else 'integer'} "
                                  "tensor; the file was not written from this architecture")
    target = dtype or next(v.dtype for v in weights.values() if v.is_floating_point())
    weights = {k: v.to(device=device, dtype=target if v.is_floating_point() else v.dtype) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    del raw, weights  # the model holds them now; dropping these lets use_decode_layout free what it replaces
    if quantization is not None:
        align_(model)
    model = padding.unpad(model, config)
    if serving:
        model.use_decode_layout()
    return model.eval()


ROUTING = "elastic.json"
ROUTER_WEIGHTS = "router.safetensors"  # the trained router of an elastic checkpoint


def read_routing(path: str | os.PathLike) -> dict[str, Any] | None:
    """The routing metadata (``elastic.json``) of an elastic checkpoint, or None for a plain model."""
    file = Path(path) / ROUTING
    if not file.is_file():
        return None
    data = read_json(file)
    if not isinstance(data.get("budgets"), list) or not all("subnet" in b and "budget" in b for b in data["budgets"]):
        raise CheckpointError(f"{file} is malformed: expected a 'budgets' list with 'budget' and 'subnet' entries")
    return data


def read_budgets(path: str | os.PathLike, config: ModelConfig) -> tuple[dict[str, Subnet], dict[str, float]]:
    """The budgets of an elastic checkpoint (label → Subnet, label → target parameters); empty for a plain model.
    Raises CheckpointError for a Subnet that does not fit ``config``."""
    routing = read_routing(path)
    budgets: dict[str, Subnet] = {}
    targets: dict[str, float] = {}
    for b in (routing or {"budgets": []})["budgets"]:
        try:
            subnet = Subnet.from_dict(b["subnet"])
            subnet.validate(config)
        except ConfigError as exc:
            raise CheckpointError(f"{Path(path) / ROUTING}: budget {b['budget']}: {exc}") from None
        budgets[b["budget"]] = subnet
        targets[b["budget"]] = float(b["parameters"] if b.get("target_kind") != "params" else b["target"])
    return budgets, targets


def check_output_path(path: str | os.PathLike, overwrite: bool = False, kind: str = "model",
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise OutputError if ``path`` may not be written under the output-path policy
    (:mod:`elasticlm.outputs`); call it before long work, too."""
    resolve_output(path, force=overwrite, kind=kind, inputs=inputs)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, kind: str = "model",
                     inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block completes
    (:func:`elasticlm.outputs.atomic_output`: one writer at a time, ``overwrite`` only for a ``kind`` directory,
    never an input)."""
    with atomic_output(path, force=overwrite, kind=kind, inputs=inputs) as tmp:
        yield tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    atomic_file(path, text)


def save(model: HybridLM, path: str | os.PathLike, format: str = "native", *,
         tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
         extra_config: dict[str, Any] | None = None, inputs: Iterable[str | os.PathLike] = (),
         gguf_type: str = "auto") -> Path:
    """Write ``model`` to ``path`` as ``"native"`` or ``"hf"`` (NemotronH) safetensors + JSON, or as
    ``"gguf"`` (one llama.cpp file, ``model.gguf``, in a directory with the tokenizer files).

    Tokenizer files are copied from ``tokenizer_dir`` (the directory the model was loaded from, say; a
    ``.gguf`` file: the tokenizer it carries); the model itself does not know where it came from.
    ``"hf"`` and ``"gguf"`` raise ConfigError, before anything is written, for what their readers cannot express.
    """
    source = tokenizer_dir
    if source is not None:
        source = hf_directory(source)  # a .gguf file: the tokenizer it carries
    check_format(model.config, format, source)
    path = Path(path)
    with atomic_directory(path, overwrite, "model", inputs) as tmp:
        write_model_files(model, tmp, format, tokenizer_dir=source, extra_config=extra_config, gguf_type=gguf_type)
    return path


def check_format(config: ModelConfig, format: str, tokenizer_dir: str | os.PathLike | None) -> None:
    """Raise ConfigError if ``config`` cannot be written as ``format``."""
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}; use one of {', '.join(FORMATS)}")
    if format == "hf":
        config_to_hf(config)
    if format == "gguf":
        from .model.gguf import gguf_arch, gguf_incompatibility, tokenizer_metadata

        reason = gguf_incompatibility(config)
        if reason:
            raise ConfigError(f"cannot export to GGUF (llama.cpp {gguf_arch(config.family)}): {reason}")
        if tokenizer_dir is None:
            raise ConfigError("a GGUF file carries its tokenizer, and this model has none (no tokenizer directory)")
        tokenizer_metadata(tokenizer_dir, config)


def write_model_files(model: HybridLM, directory: Path, format: str = "native", *,
                      tokenizer_dir: str | os.PathLike | None = None,
                      extra_config: dict[str, Any] | None = None, gguf_type: str = "auto") -> None:
    """Write weights, config.json and tokenizer files into an existing directory (not atomic:
    callers wrap it in :func:`atomic_directory`). ``"gguf"`` writes ``model.gguf`` instead of the
    weights and config."""
    dtype = model.dtype
    if format != "native" and is_quantized(model):  # other formats get the exact float values of the int8 weights
        model = dequantize_(copy.deepcopy(model), dtype)
    if format == "gguf":
        from .model.gguf import GGUF_FILE, write_gguf

        if tokenizer_dir is None:
            raise ConfigError("a GGUF file carries its tokenizer, and this model has none (no tokenizer directory)")
        write_gguf(model, directory / GGUF_FILE, tokenizer_dir, gguf_type)
    else:
        if format == "hf":
            config = config_to_hf(model.config, dtype)
            state = hf_state_dict(model)
        else:
            config = {"elasticlm_format": NATIVE_FORMAT, "model": model.config.to_dict()}
            if is_quantized(model):
                config["quantization"] = QUANTIZATION
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        config.update(extra_config or {})
        save_file({k: v.cpu() for k, v in state.items()}, directory / WEIGHTS, metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if name == "tokenizer_config.json" and (Path(tokenizer_dir) / name).is_file():
                copy_tokenizer_config(Path(tokenizer_dir) / name, directory / name)
            elif (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, directory / name)
