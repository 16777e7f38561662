"""Training checkpoints, one format for every kind of training: a loadable model directory plus the
optimizers, any other trained module, and the trainer state.

``<out>/checkpoints/step_0000250/`` holds ``config.json`` + ``model.safetensors`` (+ tokenizer): an ordinary
native model directory that ``elasticlm.load`` reads; ``<name>.safetensors`` for every other trained module
(the elastic router: ``router.safetensors``); ``optimizer.safetensors`` (every optimizer tensor, keys
``<part>.<index>.<name>``) and ``trainer_state.json`` (step, data position, RNG, autocast, param groups).
An FSDP2 run writes its shards with torch.distributed.checkpoint under ``dcp/`` instead of the optimizer file
(the model files are still written, gathered to rank 0 only).

A directory is written under a hidden temporary name and renamed into place when complete, so a crash
mid-write leaves nothing that looks like a checkpoint; ``latest`` ignores anything without
``trainer_state.json``.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import WEIGHTS, atomic_directory, load, read_json, write_model_files
from ..errors import CheckpointError
from ..model.hybrid import HybridLM
from ..outputs import writer_tag
from .distributed import Distributed, barrier, from_rank0

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
DCP_DIR = "dcp"  # torch.distributed.checkpoint shards of every part and its optimizer

# The trained parts of a run: name -> (module, its optimizer). "model" is the HybridLM (written as a model
# directory); any other part is saved as <name>.safetensors.
Parts = dict[str, tuple[nn.Module, torch.optim.Optimizer]]


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state as flat tensors (for safetensors) and JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, Any]:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    found = [p for p in sorted((out / "checkpoints").glob("step_*"))
             if (p / STATE).is_file() and (p / WEIGHTS).is_file()]
    return found[-1] if found else None


def rotate(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in sorted((out / "checkpoints").glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _model(parts: Parts) -> HybridLM:
    model = parts["model"][0]
    assert isinstance(model, HybridLM)
    return model


def _plain_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_training_checkpoint(path: Path, parts: Parts, state: dict[str, Any], tokenizer_dir: Path | None,
                             write_files: Callable[[Path], None] | None = None) -> None:
    """An unsharded training checkpoint (one process, or rank 0 of a DDP run)."""
    tensors, groups = {}, {}
    for name, (_, opt) in parts.items():
        t, g = optimizer_to_flat(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        groups[name] = g
    with atomic_directory(path, overwrite=True) as tmp:
        write_model_files(_model(parts), tmp, tokenizer_dir=tokenizer_dir)
        for name, (module, _) in parts.items():
            if name != "model":
                save_file(_plain_weights(module), tmp / f"{name}.safetensors")
        if write_files is not None:
            write_files(tmp)
        save_file(tensors, tmp / OPTIMIZER)
        # written last: marks the checkpoint complete
        (tmp / STATE).write_text(json.dumps({**state, "param_groups": groups, "rng": rng_state()}) + "\n")


def _dcp_state(parts: Parts) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out: dict[str, Any] = {}
    for name, (module, opt) in parts.items():
        out[name], out[_optim_key(name)] = get_state_dict(module, [opt])
    return out


def _optim_key(name: str) -> str:
    return "optim" if name == "model" else f"{name}_optim"


def save_sharded_checkpoint(path: Path, parts: Parts, state: dict[str, Any], tokenizer_dir: Path | None,
                            dist: Distributed, write_files: Callable[[Path], None] | None = None) -> None:
    """An FSDP2 training checkpoint: every rank writes its own shards of every part and its optimizer
    (``dcp/``, torch.distributed.checkpoint); the whole model is gathered to rank 0 only, parameter by
    parameter into CPU memory, for the loadable ``model.safetensors``; rank 0 adds the other parts' weights,
    ``write_files`` and ``trainer_state.json`` (last) and publishes the directory with a rename. Every rank
    must call this."""
    import torch.distributed.checkpoint as dcp

    tmp = path.parent / f".{path.name}.tmp-{from_rank0(writer_tag(), dist)}"  # rank 0's name, on every rank
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    dcp.save(_dcp_state(parts), checkpoint_id=tmp / DCP_DIR)
    full = gathered(_model(parts), sharded=True)
    if dist.main:
        write_model_files(full, tmp, tokenizer_dir=tokenizer_dir)
        for name, (module, _) in parts.items():
            if name != "model":
                save_file(_plain_weights(module), tmp / f"{name}.safetensors")
        if write_files is not None:
            write_files(tmp)
        (tmp / STATE).write_text(json.dumps({**state, "rng": rng_state(), "sharded": True}) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    del full
    barrier(dist)


def load_training_checkpoint(path: Path, parts: Parts, sharded: bool = False) -> dict[str, Any]:
    """Restore every part and optimizer in place from ``path`` (this rank's shards of it when ``sharded``)
    and the RNG; returns the trainer state."""
    state = read_json(path / STATE)
    if state.get("sharded") and not sharded:
        raise CheckpointError(f"{path} was written by an FSDP2 run (its optimizer state is in {DCP_DIR}/ shards); "
                              "resume it under torchrun with train.parallel=fsdp")
    if sharded:
        _load_sharded(path, parts)
    else:
        _load_plain(path, parts, state)
    set_rng_state(state["rng"])
    return state


def _load_plain(path: Path, parts: Parts, state: dict[str, Any]) -> None:
    model = _model(parts)
    device, dtype = model.device, model.dtype
    saved = load(path, device=device, dtype=dtype)
    if saved.config != model.config:
        raise CheckpointError(f"{path}: the checkpoint's model differs from this run's; resume with the same "
                              "model (or parent) settings, or start a new train.out")
    model.load_state_dict(saved.state_dict())
    groups = state["param_groups"]
    legacy = isinstance(groups, list)  # a pretrain checkpoint from before the trainers merged: one optimizer
    if legacy:
        groups = {"model": groups}
    try:
        for name, (module, _) in parts.items():
            if name != "model":
                module.load_state_dict({k: v.to(device) for k, v in load_file(path / f"{name}.safetensors").items()})
        tensors = load_file(path / OPTIMIZER)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    for name, (_, opt) in parts.items():
        prefix = "" if legacy else name + "."
        mine = {k[len(prefix):]: v.to(device) if k.endswith(("exp_avg", "exp_avg_sq")) else v
                for k, v in tensors.items() if k.startswith(prefix)}
        optimizer_from_flat(opt, mine, groups[name])


def _load_sharded(path: Path, parts: Parts) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (path / DCP_DIR).is_dir():
        raise CheckpointError(f"{path} has no {DCP_DIR}/ shards: it was written by an unsharded run; resume it with "
                              "train.parallel=ddp")
    sd = _dcp_state(parts)
    try:
        dcp.load(sd, checkpoint_id=path / DCP_DIR)
    except Exception as exc:
        raise CheckpointError(f"{path / DCP_DIR} is corrupt or incomplete ({str(exc).splitlines()[0]})") from None
    for name, (module, opt) in parts.items():
        set_state_dict(module, [opt], model_state_dict=sd[name], optim_state_dict=sd[_optim_key(name)])


def gathered(model: HybridLM, sharded: bool) -> HybridLM:
    """``model`` with whole (unsharded) weights: itself, or under FSDP2 a copy gathered to rank 0 (every rank
    must call this; the others get a model without weights)."""
    if not sharded:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # parameter by parameter, into rank 0's CPU memory only (the other ranks get an empty dict)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = HybridLM(model.config, device="meta")
    if state:
        plain.load_state_dict(state, assign=True)
    return plain
