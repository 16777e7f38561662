"""Budgets as users write them (``0.5``, ``50%``, ``780K``) and the trained budget one of them names."""

from __future__ import annotations

import math

from ..errors import ConfigError

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_budget(text: str | float, parent_parameters: int) -> int:
    """A parameter budget as an exact count: a fraction of the parent (``0.5``, ``50%``) or an
    absolute count (``300M``, ``6B``, ``1.2e6``, ``250000``).

    >>> parse_budget("0.5", 1000), parse_budget("75%", 1000), parse_budget("300K", 10**6)
    (500, 750, 300000)
    """
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100 * parent_parameters
        elif raw[-1:].upper() in _SUFFIX:
            value = float(raw[:-1]) * _SUFFIX[raw[-1].upper()]
        else:
            number = float(raw)
            value = number * parent_parameters if number <= 1 else number
    except (ValueError, IndexError):
        raise ConfigError(f"budget {text!r} is not a fraction (0.5, 50%) or a parameter count (300M, 6B)") from None
    if not math.isfinite(value):
        raise ConfigError(f"budget {text!r} is not a finite number")
    count = round(value)
    if not 0 < count <= parent_parameters:
        raise ConfigError(f"budget {text!r} = {count:,} parameters must be in (0, {parent_parameters:,}] "
                          "(the parent's size)")
    return count


def find_budget(budgets: dict[str, float], text: str | float, parent_parameters: int) -> str:
    """The label in ``budgets`` (label → target cost) that ``text`` names: the label itself
    (``"0.5"``), or the same target written another way (``"50%"``, ``"779K"``, within 0.5 %).

    >>> find_budget({"1.0": 1000.0, "0.5": 500.0}, "50%", 1000)
    '0.5'
    """
    raw = str(text).strip()
    if raw in budgets:
        return raw
    known = ", ".join(budgets) or "none"
    try:
        count = parse_budget(raw, parent_parameters)
    except ConfigError:
        raise ConfigError(f"unknown budget {raw!r}; this checkpoint has budgets {known}") from None
    for label, target in budgets.items():
        if abs(target - count) <= 0.005 * target:
            return label
    raise ConfigError(f"unknown budget {raw!r}; this checkpoint has budgets {known}")
