"""Bring a parent from a GGUF file (llama.cpp's format, e.g. a quantized model from a package or the Hub).

We do not dequantize anything ourselves: transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``,
which uses the ``gguf`` package's dequantizers) rebuilds the Hugging Face model and its tokenizer; we write
them as a Hugging Face directory and the existing HF import (:mod:`elasticlm.model.hf`) takes it from there.
Which GGUF architectures and tensor types work: docs/parents.md.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError, ConfigError

# GGUF ``general.architecture`` values that transformers' loader reads AND whose transformers class we import
# (elasticlm.model.hf). transformers reads more (gemma, phi3, mistral, …) that elasticlm cannot run, and its
# "mamba" / "nemotron" GGUFs are Mamba-1 / Nemotron-4, not Mamba-2 / Nemotron-H.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}

_IMPORTED: dict[Path, Path] = {}  # GGUF file → its dequantized Hugging Face directory, for this process


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def gguf_architecture(file: Path) -> str:
    """The ``general.architecture`` of a GGUF file (metadata only), or a CheckpointError naming the file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("reading a GGUF file needs the gguf package: pip install 'elasticlm[gguf]'") from None
    try:
        field = GGUFReader(str(file)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{file} is not a readable GGUF file ({str(exc).splitlines()[0] if str(exc) else exc})"
                              ) from None


def gguf_to_hf(file: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Dequantize ``file`` (float32) with transformers' GGUF loader and write the model and its tokenizer as a
    Hugging Face directory ``out`` (created; must not exist or be empty). Returns ``out``."""
    file, out = Path(file), Path(out)
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist (expected a .gguf file)")
    arch = gguf_architecture(file)
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{file}: GGUF architecture {arch!r} cannot be imported; elasticlm reads "
                          f"{', '.join(sorted(GGUF_ARCHITECTURES))} GGUF files (through transformers' loader); "
                          "for others, start from the Hugging Face directory")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        raise ConfigError("importing a GGUF file needs transformers (pip install 'elasticlm[hf]') and gguf") from None
    # transformers' GGUF pieces, not `from_pretrained(..., gguf_file=...)`: that one requires `accelerate` (not a
    # dependency here) and, in transformers 5, may keep quantized weights packed; this path always gives dense
    # float32 weights, dequantized by the gguf package, with transformers' own config and tensor-name mapping.
    try:
        config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        # e.g. a tensor type the gguf package cannot dequantize, or a tokenizer model transformers lacks
        raise ConfigError(f"{file}: transformers' GGUF loader failed ({str(exc).splitlines()[0]})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{file}: the GGUF tensors do not match transformers' {type(model).__name__} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def hf_directory(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a ``.gguf`` file the Hugging Face directory it dequantizes to — made once per
    process in a temporary directory (float32 weights: 4 bytes per parameter of disk), removed at exit."""
    path = Path(path)
    if not is_gguf(path) or path.is_dir():
        return path
    key = path.resolve()
    if key not in _IMPORTED:
        tmp = Path(tempfile.mkdtemp(prefix="elasticlm-gguf-"))
        atexit.register(shutil.rmtree, tmp, True)
        try:
            _IMPORTED[key] = gguf_to_hf(path, tmp / "hf")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _IMPORTED[key]


__all__ = ["GGUF_ARCHITECTURES", "gguf_architecture", "gguf_to_hf", "hf_directory", "is_gguf"]
