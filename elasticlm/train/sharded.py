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
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint import WEIGHTS, WEIGHTS_INDEX, read_config
from ..errors import CheckpointError
from ..model.hf import name_from_hf
from ..model.hybrid import HybridLM


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


@torch.no_grad()
def fill_shards(model: HybridLM, path: str | Path) -> None:
    """Copy this rank's rows of every parameter from the model directory at ``path`` (native or Hugging
    Face NemotronH, single or sharded safetensors) into the sharded ``model``, in its dtype."""
    from torch.distributed.tensor import DTensor

    path = Path(path)
    config, kind = read_config(path)
    if config != model.config and kind == "native":
        raise CheckpointError(f"{path}: its config.json differs from the model being filled")
    where: dict[str, tuple[Path, str]] = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    name = name_from_hf(key) if kind == "hf" else key
                    if name is not None:
                        where[name] = (file, key)
        except Exception as exc:
            raise CheckpointError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    if model.lm_head is not None and "lm_head.weight" not in where and "embeddings.weight" in where:
        where["lm_head.weight"] = where["embeddings.weight"]  # a tied checkpoint read into an untied model
    handles: dict[Path, Any] = {}
    try:
        for name, param in model.state_dict().items():
            if name not in where:
                raise CheckpointError(f"{path}: weight {name} is missing; the checkpoint does not match its config")
            file, key = where[name]
            if file not in handles:
                handles[file] = safe_open(file, "pt").__enter__()
            piece = handles[file].get_slice(key)
            if tuple(piece.get_shape()) != tuple(param.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(piece.get_shape())}, the model "
                                      f"{tuple(param.shape)}")
            if isinstance(param, DTensor):
                index = local_rows(param.shape, param)
                local = param.to_local()
                if local.numel():
                    local.copy_(piece[index].to(local.dtype))
            else:
                param.copy_(piece[:].to(param.dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


__all__ = ["fill_shards", "local_rows", "shard_model"]
