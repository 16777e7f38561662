"""What the verbs share: dtype and device names, reading config files and Subnets, argument types."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..config import FAMILIES
from ..errors import ConfigError

HF_FAMILIES = ", ".join(FAMILIES)  # the Hugging Face families (model_type) the formats read and write

DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _device(name: str) -> Any:
    from ..runtime import resolve_device

    return resolve_device(name)


def _read_mapping(path: str) -> dict[str, Any]:
    """A JSON or TOML file as a dict (a TOML file may nest the model under [model])."""
    from ..config import read_config_file

    data = read_config_file(path)
    return data.get("model", data) if Path(path).suffix == ".toml" else data


def _read_subnet(path: str | None):  # -> Subnet | None
    from ..config import Subnet

    return None if path is None else Subnet.from_dict(_read_mapping(path))


def format_label(fmt: str, family: str) -> str:
    from ..model.hf import hf_label

    return {"hf": hf_label(family), "native": "elasticlm native", "gguf": "GGUF for llama.cpp"}[fmt]


GGUF_TYPE_HELP = ("GGUF tensor type for the weight matrices: auto keeps the weights' precision; q8_0 needs "
                  "rows that are a multiple of 32 (others fall back to f16); norms and SSM parameters stay f32")


def _set_val_data(run: Any, path: str | None) -> None:
    """``--val-data FILE``: the run's validation data (data.val_path); training then reads all of data.path."""
    if path:
        run.data.val_path = path
        run.data.validate()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parent_architecture(parent: Any) -> Any:
    from ..checkpoint import read_config
    from ..config import ModelConfig, preset, read_config_file

    if parent.path and Path(parent.path).is_dir():
        return read_config(parent.path)[0]
    arch = parent.architecture
    if not arch:
        raise ConfigError(f"[parent] path {parent.path!r} does not exist yet; to plan before it does, set "
                          "[parent] architecture = a preset name or a config.json")
    config = ModelConfig.from_dict(read_config_file(arch)) if Path(arch).is_file() else preset(arch)
    if config.depth_order is None:  # sizes do not depend on which layers the importance pass drops first
        config.depth_order = list(range(config.num_layers))
    return config


def _loss_scope(args: argparse.Namespace, points: list[Any], whole: bool) -> str:
    """What the loss column covers, for the line under the table."""
    tokens = sorted({p.val_tokens for p in points if p.val_tokens is not None})
    counted = "/".join(f"{t:,}" for t in tokens) + " tokens"  # one count per distinct tokenizer
    if whole:
        part = "every token" if args.val_samples is None else f"{args.val_samples} windows"
        return f"{part} of {args.data}: {counted} in windows of up to {args.seq_len}"
    return f"{args.val_samples or 48} held-out sequences of {args.seq_len} tokens ({counted})"


def _check_listen(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or "
                          "--host") from None


def _data_spec(args: argparse.Namespace) -> Any:
    """The DataConfig of ``--data`` (and ``--separator``)."""
    from ..data.datasets import data_config_from_spec

    # synthetic prompts are random digits: a validation loss counts the trace and answer only
    return data_config_from_spec(args.data, mask_prompt=args.data == "synthetic",
                                 separator=_escapes(args.separator) if args.separator else None)


def _escapes(text: str) -> str:
    """\\n and \\t as typed in a shell: a new line and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _calibration(args: argparse.Namespace, model: Any, model_dir: str, samples: int, split: str,
                 loss_mask: bool = False) -> Any:
    from ..data.datasets import calibration_windows, is_local
    from ..elastic.importance import calibration_batches
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    eos = model.config.eos_token_id
    if eos is None:
        raise ConfigError(f"{model_dir}: the model has no eos_token_id, needed to pack calibration documents")
    data = _data_spec(args)
    if is_local(data):  # a file the user gives is used whole: no hashed split
        flags = ("--val-samples" if split == "val" else "--samples", "--seq-len")
        return calibration_windows(data, lambda text: tok.encode(text).ids, eos, samples, args.seq_len,
                                   args.batch_size, loss_mask, flags)
    return calibration_batches(data, lambda text: tok.encode(text).ids, eos, samples, args.seq_len,
                               args.batch_size, split, loss_mask)


def _check_memory(model: Any, rows: int, seq_len: int, knobs: str) -> None:
    from ..train.plan import check_forward_memory

    check_forward_memory(model.config, rows, seq_len, model.device, knobs)


def _utf8(text: str, option: str) -> str:
    """``text`` as the OS gave it (undecodable bytes arrive surrogate-escaped), or a clear refusal."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate that is no escaped byte
        raise ConfigError(f"{option} cannot be encoded as UTF-8 ({exc.reason} at offset {exc.start})") from None
    except UnicodeDecodeError as bad:
        raise ConfigError(f"{option} is not valid UTF-8 (byte 0x{raw[bad.start]:02x} at offset {bad.start}); "
                          "pass UTF-8 text, or token ids with --prompt-ids") from None


def _count(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer >= ``low`` (and <= ``high``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value
    return parse


def _number(low: float | None, high: float | None, low_open: bool = False) -> Any:
    """An argparse type: a finite number in [low, high] (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    return parse


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


DATA_HELP = ("calibration data: 'synthetic' (the embedded blend), a .jsonl file (field 'text'), a text "
             "file or folder, or hf:NAME[:CONFIG]; a file or folder is used whole (hold it out yourself)")
SEPARATOR_HELP = ("text data: cut each file into documents at this string (\\n\\n: paragraphs); default: "
                  "each file is one document")
