"""Run-time choices shared by the CLI and the trainer."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` → CUDA if available else CPU; otherwise a torch device that exists here.

    ``option`` names the setting in the error message (``--device``, ``train.device``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} {name!r} is not a torch device (auto, cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {name!r}, but this torch build or machine has no CUDA GPU; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {name!r} is not available on this machine; use cpu or auto")
    return device
