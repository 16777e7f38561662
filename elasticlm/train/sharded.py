"""Sharded from the start (FSDP2): build on the meta device, shard per block, and let every rank read only
the rows of its own shards from the safetensors files — no rank ever holds the whole model.

    model = HybridLM(config, device="meta", dtype=...)
    shard_model(model, mp_policy)            # fully_shard per block, then the root
    model.to_empty(device=device)
    fill_shards(model, parent_dir)           # each rank: safetensors slices of its rows only

Host memory per rank while loading is about 1/N of the model plus one tensor's slice
(bench/bench_sharded_load.py measures it).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import WEIGHTS, WEIGHTS_INDEX, read_config, read_json
from ..errors import CheckpointError
from ..model.hf import CACHE_ANCHOR, name_from_hf
from ..model.hybrid import HybridLM
from ..model.padding import PADDING_KEY


def shard_model(model: HybridLM, mp_policy: Any = None) -> HybridLM:
    """FSDP2: one shard group per block, the embeddings, final norm and head at the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.mark_sharded()
    return model


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_INDEX).exists():
        index = json.loads((path / WEIGHTS_INDEX).read_text())
        return [path / f for f in sorted(set(index.get("weight_map", {}).values()))]
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no safetensors weights")
    return files


def local_rows(global_shape: torch.Size, param: Any) -> tuple[slice, ...]:
    """The index of this rank's shard of a DTensor parameter in the global tensor.

    FSDP2 shards dim 0 like ``torch.chunk``: with 10 rows on 4 ranks, ranks hold rows 0–2, 3–5, 6–8 and 9.
    """
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(global_shape, param.device_mesh, param.placements)
        return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    except ImportError:  # the same arithmetic, for a 1-D mesh sharding dim 0
        mesh = param.device_mesh
        n, world, rank = global_shape[0], mesh.size(), mesh.get_local_rank()
        per = -(-n // world)
        return (slice(min(rank * per, n), min((rank + 1) * per, n)),) + tuple(slice(0, s) for s in global_shape[1:])


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorFile:
    """Rows of tensors from a safetensors file with plain positioned reads (``os.pread``): only the bytes
    asked for are read, and nothing is memory-mapped, so resident memory holds just the rows read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, n, 8))
        except Exception as exc:
            os.close(self.fd)
            raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
        header.pop("__metadata__", None)
        self.base, self.header = 8 + n, header

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read_rows_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` with rows ``start:start + len(out)`` (dim 0) of tensor ``key``: read straight into
        ``out``'s memory when it is contiguous and of the file's dtype, else through one buffer."""
        info = self.header[key]
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        stop = start + (out.shape[0] if out.dim() else 1)
        nbytes = (stop - start) * row
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        buffer = memoryview(target.view(torch.uint8).numpy()).cast("B") if target.dim() else bytearray(nbytes)
        got = os.preadv(self.fd, [buffer], self.base + info["data_offsets"][0] + start * row)
        if got != nbytes:
            raise CheckpointError(f"{self.path} is truncated (tensor {key})")
        if not target.dim():
            target.copy_(torch.frombuffer(buffer, dtype=dtype).view(()))
        if target is not out:
            out.copy_(target)

    def close(self) -> None:
        os.close(self.fd)


@torch.no_grad()
def fill_shards(model: HybridLM, path: str | Path) -> None:
    """Copy this rank's rows of every parameter from the model directory at ``path`` (native or Hugging
    Face NemotronH, single or sharded safetensors) into the FSDP2-sharded ``model``, in its dtype."""
    from torch.distributed.tensor import DTensor

    path = Path(path)
    config, kind = read_config(path)
    if config != model.config and kind == "native":
        raise CheckpointError(f"{path}: its config.json differs from the model being filled")
    raw = read_json(path / "config.json") if kind == "hf" else {}
    anchored = bool(raw.get(CACHE_ANCHOR))
    if raw.get(PADDING_KEY):
        raise CheckpointError(f"{path}: a Hugging Face export padded to uniform widths ({PADDING_KEY}) cannot be read "
                              "shard by shard yet; convert it once with `elasticlm convert --to native` first")
    files = [TensorFile(f) for f in _weight_files(path)]
    try:
        where: dict[str, tuple[TensorFile, str]] = {}
        for f in files:
            for key in f.keys():
                name = name_from_hf(key, config.family, anchored) if kind == "hf" else key
                if name is not None:
                    where[name] = (f, key)
        if any(re.search(r"\.experts\.\d+\.", name) for name in where):
            raise CheckpointError(f"{path}: a checkpoint with one tensor per routed expert cannot be read shard by "
                                  "shard yet; convert it once with `elasticlm convert --to native` first")
        if model.lm_head is not None and "lm_head.weight" not in where and "embeddings.weight" in where:
            where["lm_head.weight"] = where["embeddings.weight"]  # a tied checkpoint read into an untied model
        for name, param in model.state_dict().items():
            if name not in where:
                raise CheckpointError(f"{path}: weight {name} is missing; the checkpoint does not match its config")
            f, key = where[name]
            if f.shape(key) != tuple(param.shape):
                raise CheckpointError(f"{path}: {name} has shape {f.shape(key)}, the model {tuple(param.shape)}")
            if isinstance(param, DTensor):
                local = param.to_local()
                if local.numel():
                    f.read_rows_into(key, local_rows(param.shape, param)[0].start, local)
            else:
                f.read_rows_into(key, 0, param.data)
    finally:
        for f in files:
            f.close()


__all__ = ["fill_shards", "local_rows", "shard_model"]
