"""The interface every layer kind implements (see :mod:`elasticlm.kinds`)."""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError
from .layout import Layout, Run, layout_size

if TYPE_CHECKING:
    from ..config import ModelConfig

Width = Any  # a frozen dataclass of ints, one per elastic field of the kind (MambaWidth, AttentionWidth, …)


def width_fields(width: Width | Mapping[str, Any]) -> dict[str, Any]:
    """A width as ``{field: value}`` (a Mapping of expected widths passes through)."""
    return dict(width) if isinstance(width, Mapping) else dataclasses.asdict(width)


def check_values(settings: Any, where: str = "", *, positive: tuple[str, ...] = (), finite: tuple[str, ...] = (),
                 flags: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the first of ``settings``' fields that is not what it must be: ``positive`` ints,
    ``finite`` numbers, ``flags`` (true or false). A string ("1e-5") would otherwise fail deep inside torch.

    >>> from types import SimpleNamespace
    >>> check_values(SimpleNamespace(top_k=0), "[model.moe] ", positive=("top_k",))
    Traceback (most recent call last):
    ...
    elasticlm.errors.ConfigError: [model.moe] top_k must be a positive int, got 0
    """
    for name in positive:
        v = getattr(settings, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{where}{name} must be a positive int, got {v!r}")
    for name in finite:
        v = getattr(settings, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}{name} must be a finite number, got {v!r}")
    for name in flags:
        if not isinstance(getattr(settings, name), bool):
            raise ConfigError(f"{where}{name} must be true or false, got {getattr(settings, name)!r}")


def per_layer(value: int | list[int], count: int, name: str) -> list[int]:
    """Expand a per-kind width to one value per layer of that kind.

    >>> per_layer(8, 3, "x")
    [8, 8, 8]
    >>> per_layer([8, 4], 2, "x")
    [8, 4]
    """
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ConfigError(f"{name} must be an int or a list of ints, got {value!r}")
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ConfigError(f"{name} has {len(values)} entries but the pattern has {count} such layers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must hold positive ints, got {v!r}")
    return values


class LayerKind:
    """A layer kind: pattern character, width type and everything that follows from a width choice.

    ``fields`` maps each width field to its elastic axis name (the ``[elastic]`` table's key and the
    router's axis) and ``scores`` to the importance score key it is ranked by. Layouts describe the
    *mixer's* parameters under their state-dict names (the block's pre-norm is common to every kind).
    """

    char: ClassVar[str]
    name: ClassVar[str]
    width: ClassVar[type]
    fields: ClassVar[dict[str, str]]  # width field → elastic axis
    scores: ClassVar[dict[str, str]]  # width field → importance score key
    uniform_keywords: ClassVar[dict[str, str]]  # Subnet.uniform keyword → width field
    # width field → how `elasticlm prune` searches it: "heads" / "channels" (a grid of fractions, see
    # elastic/prune.py) or "fill" (solved so that the count meets the budget; one field in all kinds at most)
    prune_grid: ClassVar[dict[str, str]]
    # The kind's nn.Module, "module:Class" under elasticlm.model (resolved on first use: the model layer imports
    # this one, not the other way round). Built as ``Mixer(config, full_width, device=, dtype=)``.
    module: ClassVar[str]
    # Token mixers (attention, Mamba) carry information between positions; channel mixers (MLP, MoE) do not.
    mixes_tokens: ClassVar[bool] = True
    # True for kinds that attend over earlier tokens: the first block of a transformer decoder layer.
    attends: ClassVar[bool] = False
    # The Hugging Face ``layer_types`` entry of this kind in transformer families (None: not a transformer layer).
    hf_layer_type: ClassVar[str | None] = None
    # A kind with settings of its own keeps them in a typed section: a dataclass whose defaults make a valid
    # section, stored in ``ModelConfig.sections[name]`` and written as ``[model.<name>]`` / ``"<name>": {…}``.
    section: ClassVar[type | None] = None
    # Older configs wrote a section's fields flat, as "<legacy_prefix><field>" (moe_top_k) or under the names of
    # ``legacy_keys`` (flat key → section field: ssm_state_size → state_size); they still load.
    legacy_prefix: ClassVar[str | None] = None
    legacy_keys: ClassVar[dict[str, str]] = {}

    def legacy_field(self, key: str) -> str | None:
        """The section field an older config's flat ``key`` meant, or None when the key is not this kind's."""
        if key in self.legacy_keys:
            return self.legacy_keys[key]
        if self.legacy_prefix and key.startswith(self.legacy_prefix):
            return key.removeprefix(self.legacy_prefix)
        return None

    def legacy_name(self, field: str) -> str:
        """The flat key older configs wrote for section ``field`` (the inverse of :meth:`legacy_field`)."""
        named = {f: k for k, f in self.legacy_keys.items()}
        return named.get(field, (self.legacy_prefix or "") + field)

    def mixer_class(self) -> type:
        """The ``nn.Module`` class that runs a layer of this kind."""
        return _resolve(self.module)

    # -- config ------------------------------------------------------------------------------
    def full_width(self, config: ModelConfig, k: int) -> Width:
        """The parent's width of the ``k``-th layer of this kind."""
        raise NotImplementedError

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        """The per-kind ModelConfig fields of a model whose layers of this kind have ``widths`` (in order);
        ``{}`` when there are none (the parent's values stay)."""
        raise NotImplementedError

    def check_section(self, config: ModelConfig, section: Any) -> None:
        """Raise ConfigError when the kind's section does not fit ``config`` (kinds with a section)."""

    def sub_section(self, config: ModelConfig, widths: list[Width]) -> Any:
        """The section of a model whose layers of this kind have ``widths`` (kinds with a section)."""
        return config.section(self)

    # -- Hugging Face transformer families (kinds with an ``hf_layer_type``) -----------------
    def hf_fields(self, config: ModelConfig) -> dict[str, Any]:
        """config.json keys this kind sets in a transformer family's config (e.g. a window size)."""
        return {}

    def section_from_hf(self, cfg: dict[str, Any]) -> Any:
        """The kind's section read from a transformer family's config.json (kinds with a section)."""
        return None

    # -- parameters --------------------------------------------------------------------------
    def layout(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any], hidden: Any) -> Layout:
        """What ``width`` (and hidden size ``hidden``) keeps of each mixer parameter of a layer whose parent
        width is ``full``. Widths may be expectations when only sizes are asked for."""
        raise NotImplementedError

    def inner(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any] | None = None) -> Run:
        """The layout of the activation just before the output projection (soft masks, importance)."""
        raise NotImplementedError

    def parameters(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any], hidden: Any) -> Any:
        """Parameters of one block (pre-norm + mixer); multilinear in the widths."""
        return layout_size(self.layout(config, full, width, hidden)) + hidden

    def active_parameters(self, config: ModelConfig, full: Width, width: Width | Mapping[str, Any],
                          hidden: Any) -> Any:
        """Parameters one token uses (all of them, except in a mixture of experts)."""
        return self.parameters(config, full, width, hidden)

    def minimum(self, config: ModelConfig, field: str) -> int:
        """The smallest value width ``field`` may take (1 unless the kind needs more)."""
        return 1

    # -- training plan (elasticlm.train.plan) -------------------------------------------------
    def saved_bytes_per_token(self, config: ModelConfig, width: Width, hidden: int, scan_chunk: int, mode: str,
                              documents: float) -> float:
        """Bytes one block of this kind saves for backward per token, in precision ``mode`` ("fp32",
        "autocast", "bf16"); ``documents`` scales what packed-document masking adds (0: none)."""
        raise NotImplementedError

    def extra_flops_per_token(self, config: ModelConfig, width: Width, context: int) -> float:
        """Forward FLOPs per token beyond the 2·parameters of its matmuls (attention scores, scans)."""
        return 0.0

    # -- deployment memory -------------------------------------------------------------------
    def state_bytes(self, config: ModelConfig, width: Width | Mapping[str, Any], *, batch: int, context: int,
                    dtype_bytes: int, state_bytes: int) -> Any:
        """Inference state of one layer (KV cache, recurrent state) beyond its weights; 0 by default."""
        return 0

    @property
    def state_name(self) -> str | None:
        """The key its state is reported under by :func:`~elasticlm.elastic.space.memory_bytes` (None: none)."""
        return None


@cache
def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"elasticlm.model.{module}"), name)


__all__ = ["LayerKind", "Width", "per_layer", "width_fields"]
