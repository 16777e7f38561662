"""Model presets and config files (TOML / JSON) with one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .model import ModelConfig

# -- presets --------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # ~0.3 M parameters: tests and smoke runs.
    "tiny": dict(pattern="M-M*M-", vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 attention_head_dim=16, intermediate_size=192,
                 mamba=dict(num_heads=8, head_dim=16, n_groups=2, state_size=16, chunk_size=32)),
    # ~6 M parameters: the CPU demo parent (trained in a later issue).
    "demo": dict(pattern="M-M-M*-M-M-M*-", vocab_size=4096, hidden_size=256, num_attention_heads=8,
                 num_key_value_heads=2, attention_head_dim=32, intermediate_size=768,
                 mamba=dict(num_heads=16, head_dim=32, n_groups=4, state_size=32, chunk_size=64)),
    # NVIDIA Nemotron Nano V2 12B (DESIGN 2.1); build it on the meta device.
    "nemotron-nano-12b-v2": dict(
        pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
        vocab_size=131072, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
        attention_head_dim=128, intermediate_size=20480,
        mamba=dict(num_heads=128, head_dim=80, n_groups=8, state_size=128, conv_kernel=4, chunk_size=128)),
}


def parse_value(text: str) -> Any:
    """A command-line override value: JSON when it parses (numbers, booleans, lists, quoted
    strings), the raw text otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (by suffix) or JSON file as a dict, with one-line errors."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{p} is malformed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a table / JSON object at the top level")
    return data


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(copy.deepcopy(PRESETS[name]))
