"""Training checkpoints: a loadable model directory plus optimizer and trainer state.

``<out>/checkpoints/step_0000250/`` holds ``config.json`` + ``model.safetensors`` (+ tokenizer):
an ordinary native model directory that ``elasticlm.load`` reads; plus ``optimizer.safetensors``
(every optimizer tensor) and ``trainer_state.json`` (step, data position, RNG, param groups).
The directory is written under a hidden temporary name and renamed into place when complete, so
a crash mid-write leaves nothing that looks like a checkpoint; ``latest`` ignores anything
without ``trainer_state.json``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import WEIGHTS, atomic_directory, load, read_json, write_model_files
from ..errors import CheckpointError
from ..model.hybrid import HybridLM

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


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


def save_checkpoint(out: Path, step: int, model: HybridLM, opt: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    tokenizer_dir: Path | None, keep: int) -> Path:
    path = checkpoint_dir(out, step)
    tensors, groups = optimizer_to_flat(opt)
    with atomic_directory(path, overwrite=True) as tmp:
        write_model_files(model, tmp, tokenizer_dir=tokenizer_dir)
        save_file(tensors, tmp / OPTIMIZER)
        state = {**trainer_state, "step": step, "param_groups": groups, "rng": rng_state()}
        (tmp / STATE).write_text(json.dumps(state) + "\n")  # written last: marks the checkpoint complete
    for old in sorted((out / "checkpoints").glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    found = [p for p in sorted((out / "checkpoints").glob("step_*"))
             if (p / STATE).is_file() and (p / WEIGHTS).is_file()]
    return found[-1] if found else None


def load_checkpoint(path: Path, model: HybridLM, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` and ``opt`` in place from ``path``; returns the trainer state."""
    state = read_json(path / STATE)
    saved = load(path, device=model.embeddings.weight.device, dtype=model.embeddings.weight.dtype)
    if saved.config != model.config:
        raise CheckpointError(f"{path}: the checkpoint's model config differs from the run's; "
                              "resume with the same [model] settings or start a new --out")
    model.load_state_dict(saved.state_dict())
    try:
        tensors = load_file(path / OPTIMIZER)
    except Exception as exc:
        raise CheckpointError(f"{path / OPTIMIZER} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    device = model.embeddings.weight.device
    optimizer_from_flat(opt, {k: v.to(device) if k.endswith(("exp_avg", "exp_avg_sq")) else v
                              for k, v in tensors.items()}, state["param_groups"])
    set_rng_state(state["rng"])
    return state
