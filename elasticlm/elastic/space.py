"""The elastic space (budgets and per-axis choice sets) and the cost model as pure functions:
exact and expected parameter counts, and deployment memory.

The parameter count of a Subnet is *multilinear* in its widths (:func:`elasticlm.config.block_parameters`):
every term is a product in which each axis (hidden size, Mamba heads per group, Mamba head channels,
query heads per KV group, FFN width, "layer kept") appears at most once. So when a router picks every
axis independently, the expected count is the same formula evaluated at each axis' expected value —
exact, and differentiable through the router's probabilities.

Worked example (one MLP layer, hidden 64, FFN 128, no bias): ``2·64·128 + 64 = 16,448`` parameters;
keeping FFN 128 or 64 with probability ½ each gives
``block_parameters(cfg, "-", 64, intermediate_size=96) = 12,352``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import (
    LayerWidth,
    ModelConfig,
    Subnet,
    count_active_parameters,
    count_parameters,
    outer_parameters,
    parse_budget,
)
from ..errors import ConfigError
from ..kinds import KINDS, kind_of, width_fields

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def expected_parameter_count(config: ModelConfig, hidden: Any, layers: list[dict[str, Any]],
                             kept: list[Any] | None = None, active: bool = False) -> Any:
    """E[parameter count] when every axis is chosen independently: ``hidden`` and the entries of
    ``layers[i]`` (the :func:`~elasticlm.config.block_parameters` keywords of layer ``i``) are expected
    widths, ``kept[i]`` the probability that layer ``i`` runs. Differentiable when they are tensors.
    ``active``: the parameters one token uses (mixture-of-experts layers count their top-k experts)."""
    if len(layers) != config.num_layers or (kept is not None and len(kept) != config.num_layers):
        raise ValueError(f"give one entry per layer ({config.num_layers})")
    total = outer_parameters(config, hidden)
    for i, widths in enumerate(layers):
        p = 1 if kept is None else kept[i]
        kind = kind_of(config.pattern[i])
        count = kind.active_parameters if active else kind.parameters
        total = total + p * count(config, config.layer_widths(i), widths, hidden)
    return total


def memory_bytes(config: ModelConfig, subnet: Subnet | None = None, *, context: int = 4096, batch: int = 1,
                 dtype: str = "bfloat16", state_dtype: str = "float32") -> dict[str, int]:
    """Deployment memory of ``subnet`` (default: the parent): weights in ``dtype``, the attention KV
    cache at ``context`` tokens, and the Mamba conv window plus SSM state (the SSM state in
    ``state_dtype``, as the decode step keeps it; it does not grow with the context)."""
    if dtype not in DTYPE_BYTES or state_dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}")
    subnet = subnet or Subnet.full(config)
    w, s = DTYPE_BYTES[dtype], DTYPE_BYTES[state_dtype]
    states = _state_keys()
    for i, width in enumerate(subnet.layers):
        if width is not None:
            kind = kind_of(config.pattern[i])
            if kind.state_name:
                states[kind.state_name] += kind.state_bytes(config, width, batch=batch, context=context,
                                                            dtype_bytes=w, state_bytes=s)
    weights = count_parameters(config, subnet) * w
    return {"weights": weights, **states, "total": weights + sum(states.values())}


def _state_keys() -> dict[str, int]:
    """Every kind's state entry of :func:`memory_bytes`, at 0 (``kv_cache``, ``mamba_state``)."""
    return {k.state_name: 0 for k in KINDS.values() if k.state_name}


def expected_memory_bytes(config: ModelConfig, hidden: Any, layers: list[dict[str, Any]], kept: list[Any] | None,
                          *, context: int, batch: int, dtype: str, state_dtype: str = "float32") -> Any:
    """E[:func:`memory_bytes`] under independent per-axis choices (same arguments as
    :func:`expected_parameter_count`); exact for the same reason: every term is multilinear."""
    w, s = DTYPE_BYTES[dtype], DTYPE_BYTES[state_dtype]
    total = expected_parameter_count(config, hidden, layers, kept) * w
    for i, widths in enumerate(layers):
        p = 1 if kept is None else kept[i]
        state = kind_of(config.pattern[i]).state_bytes(config, widths, batch=batch, context=context, dtype_bytes=w,
                                                       state_bytes=s)
        total = total + p * state
    return total


# -- the elastic space ----------------------------------------------------------------------------

def _layer_axes() -> dict[str, tuple[str, str]]:
    """Width axis → (the pattern characters of the kinds it acts on, the Subnet field it sets). Kinds whose widths
    mean the same thing share an axis (query heads per KV group: full and sliding-window attention)."""
    axes: dict[str, tuple[str, str]] = {}
    for kind in KINDS.values():
        for fieldname, axis in kind.fields.items():
            chars, known = axes.get(axis, ("", fieldname))
            assert known == fieldname, f"axis {axis!r} sets {known!r} in one kind and {fieldname!r} in another"
            axes[axis] = (chars + kind.char, fieldname)
    return axes


LAYER_AXES = _layer_axes()
AXES = ("hidden", *LAYER_AXES, "depth")
DEFAULT_WIDTH_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)
DEFAULT_FFN_FRACTIONS = tuple(i / 32 for i in range(32, 7, -1))  # 1, 31/32, …, 1/4: fine enough to hit budgets
DEFAULT_DEPTH_FRACTIONS = (1.0, 0.875, 0.75)


ROUTER_MODES = ("hard", "soft", "st")  # see elastic/router.py


@dataclass
class ElasticConfig:
    """The ``[elastic]`` table: budgets, per-axis choice sets and the router.

    A choice is a fraction of the parent's width (a float ≤ 1: ``0.5``) or an absolute width (an
    int: ``96``; for ``depth`` the number of layers kept). ``None`` takes the default set. An axis
    listed in ``heterogeneous`` gets one choice per layer; hidden size and depth are always global.
    """

    budgets: list[Any] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    # params | active (parameters one token uses: MoE layers count top_k experts) | memory (weights + KV cache +
    # Mamba state at memory_context)
    target: str = "params"
    memory_context: int = 4096
    memory_batch: int = 1
    memory_dtype: str = "bfloat16"
    hidden: list[Any] | None = None
    mamba_heads: list[Any] | None = None  # heads per group
    mamba_head_dim: list[Any] | None = None
    attention_heads: list[Any] | None = None  # query heads per KV group
    ffn: list[Any] | None = None
    moe_experts: list[Any] | None = None  # routed experts per routing group
    moe_ffn: list[Any] | None = None  # FFN width of every routed expert
    depth: list[Any] | None = None  # layers kept
    heterogeneous: list[str] = field(default_factory=list)
    # Width choices (hidden, FFN, expert FFN, Mamba head channels) are multiples of this, so that sub-models run
    # on fast kernel tiles: 8 by default, 64 or 128 on GPUs (NVIDIA's pruned models use such multiples); an axis
    # whose parent width holds fewer than ALIGNED_STEPS multiples keeps unit steps (tiny models), and the
    # parent's own width is always a choice. Head and expert counts keep their group constraints instead. 1: off.
    align: int = 8
    # Depth never drops the last attention layer while other layers remain (inference engines' hybrid caches
    # need one; see ModelConfig.drop_order). false: follow the importance order only.
    keep_attention: bool = True
    # router (DESIGN 2.4)
    # hard: sliced execution + straight-through gates; soft: nested mask staircase; st: one-hot staircase
    # forward (= the sliced sub-model), soft staircase gradient (see elastic/router.py)
    router_mode: str = "hard"
    router_hidden: int = 256
    router_lr: float | None = None  # default: router_lr_ratio × the model's lr
    router_lr_ratio: float = 100.0
    router_warmup_steps: int = 60
    router_init_steps: int = 300  # budget-loss-only steps before training, so every budget starts on target
    logit_scale: list[float] = field(default_factory=lambda: [1.0, 10.0])
    temperature: list[float] = field(default_factory=lambda: [1.0, 0.05])
    budget_loss_weight: float = 1.0
    # Deviation from a budget's target that the budget loss does not penalise (0.02: ±2 %), so that inside
    # the band the language-model loss alone moves the router's choices. 0: every deviation counts.
    budget_tolerance: float = 0.0
    # Growth per step of a budget's budget-loss weight while its architecture is off target by more than
    # max(budget_tolerance, 2 %) (elastic/router.py: Router.update_pressure); 0: a fixed weight.
    budget_pressure: float = 0.05
    # Consecutive rows of the global batch that share one budget draw. 0 = auto: 1 (every row draws its own)
    # unless FSDP2 shards the model, where all rows of one micro-step across ranks share a budget, so no rank
    # runs a budget it has no rows for. The marginal distribution of budgets is the same either way.
    budget_rows: int = 0

    def validate(self) -> None:
        if self.target not in ("params", "active", "memory"):
            raise ConfigError(f"elastic.target must be params, active or memory, got {self.target!r}")
        if isinstance(self.budget_pressure, bool) or not isinstance(self.budget_pressure, (int, float)) \
                or not 0.0 <= self.budget_pressure <= 1.0:
            raise ConfigError(f"elastic.budget_pressure must be a number in [0, 1], got {self.budget_pressure!r}")
        if not 0.0 <= self.budget_tolerance < 0.5:
            raise ConfigError(f"elastic.budget_tolerance must be in [0, 0.5), got {self.budget_tolerance}")
        if self.router_mode not in ROUTER_MODES:
            raise ConfigError(f"elastic.router_mode must be hard, soft or st, got {self.router_mode!r}")
        if self.memory_dtype not in DTYPE_BYTES:
            raise ConfigError(f"elastic.memory_dtype must be one of {sorted(DTYPE_BYTES)}")
        if not isinstance(self.budgets, list) or not self.budgets:
            raise ConfigError("elastic.budgets must be a non-empty list, e.g. [1.0, 0.75, 0.5]")
        bad = sorted(set(self.heterogeneous) - set(LAYER_AXES))
        if bad:
            raise ConfigError(f"elastic.heterogeneous: {bad} cannot be per-layer; choose from {sorted(LAYER_AXES)}")
        for name in ("logit_scale", "temperature"):
            v = getattr(self, name)
            if len(v) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in v):
                raise ConfigError(f"elastic.{name} must be [start, end] with positive numbers, got {v!r}")
        if isinstance(self.budget_rows, bool) or not isinstance(self.budget_rows, int) or self.budget_rows < 0:
            raise ConfigError(f"elastic.budget_rows must be an int >= 0 (0 = auto), got {self.budget_rows!r}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ConfigError(f"elastic.align must be an int >= 1 (8; 64 or 128 on GPUs; 1: no alignment), "
                              f"got {self.align!r}")
        if self.router_hidden < 1 or self.router_warmup_steps < 0 or self.budget_loss_weight < 0:
            raise ConfigError("elastic.router_hidden must be >= 1, router_warmup_steps and budget_loss_weight >= 0")
        for axis in AXES:
            v = getattr(self, axis)
            if v is not None and (not isinstance(v, list) or not v):
                raise ConfigError(f"elastic.{axis} must be a non-empty list of choices (or left out for the default)")


@dataclass(frozen=True)
class Axis:
    """One router axis. ``values[j][s]`` is choice ``j`` for slot ``s``: the width of layer
    ``layers[s]`` for a layer axis (one slot per layer when heterogeneous; when homogeneous
    one slot whose choice applies to every layer, so ``values[j]`` still lists every layer);
    the hidden size or the number of kept layers for ``hidden`` / ``depth``."""

    name: str
    layers: tuple[int, ...]
    values: tuple[tuple[int, ...], ...]
    heterogeneous: bool = False

    @property
    def n_choices(self) -> int:
        return len(self.values)

    @property
    def n_slots(self) -> int:
        return len(self.layers) if self.heterogeneous else 1

    def kept_fraction(self, choices: list[int]) -> float:
        """Mean over the axis' entries of the chosen value / the full value (choice 0).

        >>> Axis("ffn", (2, 5), ((64, 32), (32, 16), (16, 8)), heterogeneous=True).kept_fraction([1, 2])
        0.375
        >>> Axis("ffn", (2, 5), ((64, 32), (32, 16)), heterogeneous=False).kept_fraction([1])
        0.5
        """
        picks = choices if self.heterogeneous else [choices[0]] * len(self.values[0])
        return sum(self.values[j][s] / self.values[0][s] for s, j in enumerate(picks)) / len(picks)


ALIGNED_STEPS = 8  # an axis is aligned when its parent width holds at least this many multiples of the alignment
WIDTH_AXES = ("hidden", "ffn", "moe_ffn", "mamba_head_dim")  # aligned axes; the others count heads or experts


def width_multiple(full: int, align: int) -> int:
    """The multiple the choices of a width axis of parent width ``full`` keep: ``align``, or 1 for an axis too
    narrow to hold ``ALIGNED_STEPS`` multiples of it (a tiny model, whose choices would collapse).

    >>> width_multiple(1536, 64), width_multiple(576, 128), width_multiple(48, 8)
    (64, 1, 1)
    """
    return align if full >= ALIGNED_STEPS * align else 1


def _resolve_choice(v: Any, full: int, where: str, multiple: int = 1) -> int:
    """A choice as a width: a fraction of ``full`` rounds to the nearest ``multiple`` (1.0 is ``full`` itself,
    aligned or not); an absolute width is taken as given."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: choice {v!r} must be a fraction (0.5) or a width (96)")
    if isinstance(v, float):
        if not 0 < v <= 1:
            raise ConfigError(f"{where}: fraction {v} must be in (0, 1]")
        if v == 1.0:
            return full
        top = max(multiple, full // multiple * multiple)
        return min(max(multiple, int(round(v * full / multiple)) * multiple), top)
    if not 0 < v <= full:
        raise ConfigError(f"{where}: width {v} must be in [1, {full}] (the parent's)")
    return v


def _aligned_choice(v: Any, full: int, where: str, multiple: int) -> int:
    """:func:`_resolve_choice` for a width axis: an absolute width must be aligned too (or the parent's)."""
    width = _resolve_choice(v, full, where, multiple)
    if width % multiple and width != full:
        raise ConfigError(f"{where}: width {width} is not a multiple of {multiple} (elastic.align); give aligned "
                          "widths or set elastic.align = 1")
    return width


@dataclass(frozen=True)
class ElasticSpace:
    """Budgets (resolved to exact target costs) and the router's axes for one parent."""

    config: ModelConfig
    budgets: tuple[str, ...]  # as written (labels)
    targets: tuple[float, ...]  # the cost each budget aims at (parameters, or bytes)
    axes: tuple[Axis, ...]
    target: str = "params"
    memory: tuple[tuple[str, Any], ...] = ()  # context, batch, dtype for target = memory
    keep_attention: bool = True  # see ElasticConfig.keep_attention

    @classmethod
    def build(cls, config: ModelConfig, ec: ElasticConfig) -> ElasticSpace:
        ec.validate()
        axes = []
        for name in AXES:
            axis = _build_axis(config, name, getattr(ec, name), name in ec.heterogeneous, ec.align)
            if axis is not None:
                axes.append(axis)
        memory = (("context", ec.memory_context), ("batch", ec.memory_batch), ("dtype", ec.memory_dtype))
        space = cls(config, (), (), tuple(axes), ec.target, memory, ec.keep_attention)
        parent = space.cost_of(Subnet.full(config))
        labels, targets = [], []
        for b in ec.budgets:
            label = _budget_label(b)
            if label in labels:
                raise ConfigError(f"elastic.budgets lists {label} twice")
            if ec.target in ("params", "active"):
                t = float(parse_budget(b, int(parent)))
            else:
                t = float(parse_memory_budget(b, parent))
            if t in targets:
                raise ConfigError(f"elastic.budgets: {labels[targets.index(t)]} and {label} are the same budget "
                                  f"({t:,.0f}); list each budget once")
            targets.append(t)
            labels.append(label)
        smallest = space.cost_of(space.subnet({a.name: [a.n_choices - 1] * a.n_slots for a in axes}))
        for label, t in zip(labels, targets, strict=True):
            if t < smallest * (1 - 0.02):
                raise ConfigError(f"budget {label} ({t:,.0f}) is below the smallest model the elastic space can "
                                  f"express ({smallest:,.0f}); add smaller choices or raise the budget")
        return dataclasses.replace(space, budgets=tuple(labels), targets=tuple(targets))

    # -- choices → Subnet / cost ----------------------------------------------------------
    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def subnet(self, choices: dict[str, list[int]]) -> Subnet:
        """The Subnet for choice indices ``choices[axis] = [index per slot]`` (missing axis = full)."""
        cfg = self.config
        hidden = cfg.hidden_size
        widths: list[dict[str, int]] = [dataclasses.asdict(cfg.layer_widths(i)) for i in range(cfg.num_layers)]
        kept = cfg.num_layers
        for axis in self.axes:
            idx = choices.get(axis.name)
            if idx is None:
                continue
            if axis.name == "hidden":
                hidden = axis.values[idx[0]][0]
            elif axis.name == "depth":
                kept = axis.values[idx[0]][0]
            else:
                fieldname = LAYER_AXES[axis.name][1]
                for s, layer in enumerate(axis.layers):
                    j = idx[s] if axis.heterogeneous else idx[0]
                    widths[layer][fieldname] = axis.values[j][s]
        dropped = set(self.dropped_layers(kept))
        layers: list[LayerWidth | None] = []
        for i, w in enumerate(widths):
            layers.append(None if i in dropped else kind_of(cfg.pattern[i]).width(**w))
        return Subnet(hidden, tuple(layers))

    def dropped_layers(self, kept: int) -> list[int]:
        """The layers removed when ``kept`` layers run: the first of the parent's drop order
        (:meth:`ModelConfig.drop_order`)."""
        drop = self.config.num_layers - kept
        if drop == 0:
            return []
        order = self.config.drop_order(self.keep_attention)
        assert order is not None
        return order[:drop]

    def cost_of(self, subnet: Subnet) -> float:
        """The router's resource for ``subnet``: parameters, or deployment bytes."""
        if self.target == "params":
            return float(count_parameters(self.config, subnet))
        if self.target == "active":
            return float(count_active_parameters(self.config, subnet))
        m = dict(self.memory)
        return float(memory_bytes(self.config, subnet, context=m["context"], batch=m["batch"],
                                  dtype=m["dtype"])["total"])

    def expected_cost(self, probs: dict[str, Any]) -> Any:
        """E[cost] when axis ``a`` picks choice ``j`` of slot ``s`` with probability ``probs[a][..., s, j]``
        independently (tensors: differentiable; leading dimensions are a batch of distributions).
        Equals :meth:`cost_of` for one-hot ``probs``."""
        import torch

        cfg = self.config
        hidden: Any = float(cfg.hidden_size)
        widths: list[dict[str, Any]] = [
            {k: float(v) for k, v in width_fields(cfg.layer_widths(i)).items()} for i in range(cfg.num_layers)]
        kept: list[Any] | None = None
        for axis in self.axes:
            p = probs[axis.name]
            values = torch.tensor(axis.values, dtype=p.dtype, device=p.device)  # [choices, slots]
            if axis.name == "hidden":
                hidden = p[..., 0, :] @ values[:, 0]
            elif axis.name == "depth":
                keep = torch.tensor([[float(i not in self.dropped_layers(int(v[0]))) for i in range(cfg.num_layers)]
                                     for v in axis.values], dtype=p.dtype, device=p.device)
                runs = p[..., 0, :] @ keep  # [..., layers]
                kept = [runs[..., i] for i in range(cfg.num_layers)]
            else:
                key = LAYER_AXES[axis.name][1]
                expected = (p * values.T).sum(-1) if axis.heterogeneous else p[..., 0, :] @ values  # [..., slots]
                for s, layer in enumerate(axis.layers):
                    widths[layer][key] = expected[..., s]
        if self.target in ("params", "active"):
            return expected_parameter_count(cfg, hidden, widths, kept, active=self.target == "active")
        m = dict(self.memory)
        return expected_memory_bytes(cfg, hidden, widths, kept, context=m["context"], batch=m["batch"],
                                     dtype=m["dtype"])


def _budget_label(b: Any) -> str:
    if isinstance(b, bool) or not isinstance(b, (int, float, str)):
        raise ConfigError(f"elastic.budgets: {b!r} is not a budget (0.5, \"75%\", \"300M\")")
    return str(b).strip()


_BYTES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory_budget(b: Any, parent_bytes: float) -> float:
    """A memory budget: a fraction of the parent's memory (0.5, 50%) or bytes (512MiB, 24GB, 24G)."""
    raw = str(b).strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100 * parent_bytes
        elif raw[-1:] in _BYTES:
            value = float(raw[:-1]) * _BYTES[raw[-1]]
        else:
            number = float(raw)
            value = number * parent_bytes if number <= 1 else number
    except (ValueError, IndexError):
        raise ConfigError(f"memory budget {b!r} is not a fraction (0.5, 50%) or a size (24GB, 512MiB)") from None
    if not math.isfinite(value) or not 0 < value <= parent_bytes:
        raise ConfigError(f"memory budget {b!r} = {value:,.0f} bytes must be in (0, {parent_bytes:,.0f}] "
                          "(the parent's memory)")
    return value


def _build_axis(config: ModelConfig, name: str, raw: list[Any] | None, heterogeneous: bool,
                align: int = 1) -> Axis | None:
    where = f"elastic.{name}"
    if name == "hidden":
        choices = raw if raw is not None else list(DEFAULT_WIDTH_FRACTIONS)
        multiple = width_multiple(config.hidden_size, align)
        values = _dedup([(_aligned_choice(v, config.hidden_size, where, multiple),) for v in choices])
        return Axis(name, (), values) if values != ((config.hidden_size,),) or raw is not None else None
    if name == "depth":
        L = config.num_layers
        choices = raw if raw is not None else list(DEFAULT_DEPTH_FRACTIONS)
        unit = config.depth_unit  # whole decoder layers in a transformer
        values = _dedup([(_resolve_choice(v, L, where, unit),) for v in choices])
        if any(v[0] % unit for v in values):
            raise ConfigError(f"{where}: a {config.family} model drops whole decoder layers ({unit} blocks each); "
                              f"give block counts that are multiples of {unit}")
        if any(v[0] < L for v in values) and config.depth_order is None:
            raise ConfigError("elastic.depth drops layers, but the parent has no depth order; run `elasticlm "
                              "importance` and `elasticlm reorder` first (or set elastic.depth = [1.0])")
        return Axis(name, (), values) if len(values) > 1 or raw is not None else None
    chars, fieldname = LAYER_AXES[name]
    layers = tuple(i for i, k in enumerate(config.pattern) if k in chars)
    if not layers:
        if raw is not None:
            raise ConfigError(f"{where} is set but the parent has no {' or '.join(map(repr, chars))} layers")
        return None
    fulls = [getattr(config.layer_widths(i), fieldname) for i in layers]
    default = DEFAULT_FFN_FRACTIONS if name == "ffn" else DEFAULT_WIDTH_FRACTIONS
    choices = raw if raw is not None else list(default)
    # e.g. an MoE router needs top_k experts to choose from
    low = max(kind_of(c).minimum(config, fieldname) for c in chars if c in config.pattern)
    aligned = name in WIDTH_AXES
    values = _dedup([tuple(max(low, _aligned_choice(v, full, where, width_multiple(full, align) if aligned else 1))
                           for full in fulls) for v in choices])
    if raw is None and len(values) == 1:
        return None
    return Axis(name, layers, values, heterogeneous)


def _dedup(values: list[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    """Distinct choices, largest first (choice 0 is the parent's width when it is offered)."""
    return tuple(sorted(set(values), key=lambda v: (-sum(v), v)))


__all__ = ["ALIGNED_STEPS", "AXES", "Axis", "DTYPE_BYTES", "ElasticConfig", "ElasticSpace", "expected_memory_bytes",
           "expected_parameter_count", "memory_bytes", "width_multiple"]
