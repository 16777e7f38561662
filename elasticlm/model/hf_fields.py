"""Reading a Hugging Face config.json: one rule for every family adapter."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


class Fields:
    """``fields(name, *aliases, default=...)``: the first of the keys that is set (not null); without a default a
    missing key is a one-line ConfigError naming the family and the key.

    >>> Fields({"hidden_size": 64, "n_groups": None}, "mamba2")("n_groups", default=1)
    1
    >>> Fields({"eos_token_id": [2, 7]}, "llama").eos()
    2
    """

    def __init__(self, cfg: dict[str, Any], family: str) -> None:
        self.cfg, self.family = cfg, family

    def __call__(self, name: str, *aliases: str, default: Any = None) -> Any:
        for key in (name, *aliases):
            if self.cfg.get(key) is not None:
                return self.cfg[key]
        if default is None:
            raise ConfigError(f"{self.family} config.json is missing {name!r}")
        return default

    def eos(self) -> int | None:
        """The end-of-sequence id (the first, where the config lists several)."""
        eos = self.cfg.get("eos_token_id")
        if isinstance(eos, list):
            return eos[0] if eos else None
        return eos
