"""A Subnet names a nested sub-model inside a parent; the sub-model's own config and exact parameter counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..kinds import KINDS, kind_of, kind_of_width, width_fields
from .model import LAYER_NAMES, LayerWidth, ModelConfig, _collapse

# -- Subnet ---------------------------------------------------------------------------------



@dataclass(frozen=True)
class Subnet:
    """A nested sub-model of a parent: active hidden size, and per layer its kept widths
    (``None`` = the layer is skipped, i.e. the identity through its residual)."""

    hidden_size: int
    layers: tuple[LayerWidth | None, ...]

    @classmethod
    def full(cls, config: ModelConfig) -> Subnet:
        """The parent itself."""
        return cls(config.hidden_size, tuple(config.layer_widths(i) for i in range(config.num_layers)))

    @classmethod
    def uniform(
        cls,
        config: ModelConfig,
        *,
        hidden_size: int | None = None,
        mamba_heads_per_group: int | None = None,
        mamba_head_dim: int | None = None,
        attention_heads_per_kv_group: int | None = None,
        intermediate_size: int | None = None,
        moe_experts_per_group: int | None = None,
        moe_intermediate_size: int | None = None,
        drop_layers: tuple[int, ...] | list[int] = (),
    ) -> Subnet:
        """A homogeneous Subnet: the same kept width for every layer of a kind (None = full)."""
        given = {"mamba_heads_per_group": mamba_heads_per_group, "mamba_head_dim": mamba_head_dim,
                 "attention_heads_per_kv_group": attention_heads_per_kv_group, "intermediate_size": intermediate_size,
                 "moe_experts_per_group": moe_experts_per_group, "moe_intermediate_size": moe_intermediate_size}
        layers: list[LayerWidth | None] = []
        for i in range(config.num_layers):
            if i in set(drop_layers):
                layers.append(None)
                continue
            kind, full = kind_of(config.pattern[i]), config.layer_widths(i)
            layers.append(dataclasses.replace(full, **{field: given[kw] for kw, field in kind.uniform_keywords.items()
                                                       if given.get(kw)}))
        return cls(hidden_size or config.hidden_size, tuple(layers))

    @property
    def kept_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.layers) if w is not None]

    def validate(self, config: ModelConfig) -> None:
        """Raise ConfigError naming the field if this Subnet does not fit inside ``config``."""
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int):
            raise ConfigError(f"subnet hidden_size must be an int, got {self.hidden_size!r}")
        if not 0 < self.hidden_size <= config.hidden_size:
            raise ConfigError(f"subnet hidden_size={self.hidden_size} must be in [1, {config.hidden_size}]")
        if len(self.layers) != config.num_layers:
            raise ConfigError(f"subnet has {len(self.layers)} layer entries but the model has {config.num_layers}")
        for i, width in enumerate(self.layers):
            if width is None:
                continue
            kind = kind_of(config.pattern[i])
            if not isinstance(width, kind.width):
                raise ConfigError(f"subnet layer {i} is a {kind.name} layer but was given {width!r}")
            full = config.layer_widths(i)
            for name in dataclasses.fields(width):
                v, limit = getattr(width, name.name), getattr(full, name.name)
                low = kind.minimum(config, name.name)
                if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= limit:
                    raise ConfigError(
                        f"subnet layer {i} ({kind.name}) {name.name}={v!r} must be in [{low}, {limit}]")

    def to_dict(self) -> dict[str, Any]:
        def entry(w: LayerWidth | None) -> dict[str, Any] | None:
            if w is None:
                return None
            return {"kind": kind_of_width(w).name, **dataclasses.asdict(w)}

        return {"hidden_size": self.hidden_size, "layers": [entry(w) for w in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Subnet:
        try:
            layers: list[LayerWidth | None] = []
            for i, e in enumerate(data["layers"]):
                if e is None:
                    layers.append(None)
                    continue
                e = dict(e)
                kind = next((k for k in KINDS.values() if k.name == e.get("kind")), None)
                if kind is None:
                    raise ConfigError(f"subnet layer {i}: 'kind' must be one of {sorted(LAYER_NAMES.values())}")
                e.pop("kind")
                layers.append(kind.width(**e))
            hidden = data["hidden_size"]
            if isinstance(hidden, bool) or not isinstance(hidden, int):
                raise ConfigError(f"subnet hidden_size must be an int, got {hidden!r}")
            return cls(hidden, tuple(layers))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed subnet description: {exc}") from None


# -- sub-model config and exact parameter counts -------------------------------------------


def subnet_config(config: ModelConfig, subnet: Subnet) -> ModelConfig:
    """The config of the standalone model that ``subnet`` describes (skipped layers removed)."""
    subnet.validate(config)
    kept = subnet.kept_layers
    if not kept:
        # A model with no blocks is embeddings → norm → head; keep it expressible.
        raise ConfigError("subnet keeps no layers; keep at least one")
    fields: dict[str, Any] = {}
    sections = dict(config.sections)
    for char, kind in KINDS.items():
        widths = [subnet.layers[i] for i in kept if config.pattern[i] == char]
        # A kind with no kept layer keeps the parent's values: never used, but valid.
        fields.update({name: _collapse(v, v[0]) for name, v in kind.config_fields(config, widths).items()})
        if kind.section is not None and widths:
            sections[kind.name] = kind.sub_section(config, widths)
    return dataclasses.replace(
        config,
        pattern="".join(config.pattern[i] for i in kept),
        hidden_size=subnet.hidden_size,
        **fields,
        depth_order=None,
        sections=sections,
    )


def block_parameters(config: ModelConfig, kind: str, hidden: Any, **widths: Any) -> Any:
    """Parameters of one block (pre-norm + mixer) at the given widths (the kind's width fields as keywords:
    ``heads_per_group``, ``head_dim``, ``heads_per_kv_group``, ``intermediate_size``).

    Multilinear in the widths (each appears at most once per term), so it also gives the exact
    *expected* count when the widths are expectations of independent choices (ints, floats or tensors).
    The layer's parent width only fixes the layout's shape; any layer of the kind gives the same count.
    """
    spec = kind_of(kind)
    return spec.parameters(config, spec.full_width(config, 0), widths, hidden)


def outer_parameters(config: ModelConfig, hidden: Any) -> Any:
    """Embeddings, head (unless tied) and final norm at hidden size ``hidden`` (linear in it)."""
    return config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden


def layer_parameters(config: ModelConfig, kind: str, width: LayerWidth, hidden: int) -> int:
    """Exact parameter count of one block (pre-norm + mixer) at the given widths."""
    spec = kind_of(kind)
    assert isinstance(width, spec.width)
    return int(block_parameters(config, kind, hidden, **width_fields(width)))


def count_parameters(config: ModelConfig, subnet: Subnet | None = None, active: bool = False) -> int:
    """Exact parameter count of the model, or of the sub-model ``subnet`` names.

    Equals ``sum(p.numel() for p in extract(model, subnet).parameters())``. ``active``: the parameters one token
    uses — all of them, except that a mixture-of-experts layer counts ``top_k`` of its routed experts (its
    router and shared expert always).
    """
    subnet = subnet or Subnet.full(config)
    subnet.validate(config)
    d = subnet.hidden_size
    total = outer_parameters(config, d)
    for i, width in enumerate(subnet.layers):
        if width is not None:
            kind = kind_of(config.pattern[i])
            count = kind.active_parameters if active else kind.parameters
            total += int(count(config, config.layer_widths(i), width_fields(width), d))
    return total


def count_active_parameters(config: ModelConfig, subnet: Subnet | None = None) -> int:
    """:func:`count_parameters` with ``active=True``."""
    return count_parameters(config, subnet, active=True)
