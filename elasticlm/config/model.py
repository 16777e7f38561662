"""ModelConfig: the architecture of a hybrid model — its layer pattern and widths (per layer where they
differ), the transformer variants, validation with one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..kinds import KINDS, LayerKind, Width, kind_of
from ..kinds.base import check_values
from ..kinds.base import per_layer as _per_layer

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_NAMES = {k.char: k.name for k in KINDS.values()}
SECTION_KINDS = {k.name: k for k in KINDS.values() if k.section is not None}  # kinds with a config section

IntOrList = int | list[int]
# one layer's kept widths, as a Subnet holds them: the kind's width dataclass (None in a Subnet: layer skipped)
LayerWidth = Width
MLP_TYPES = ("relu2", "swiglu")


@dataclass(frozen=True)
class Family:
    """A Hugging Face family (``model_type``) a model comes from and exports to."""

    adapter: str  # the module under elasticlm.model whose ``ADAPTER`` reads and writes it (model/hf_adapter.py)
    decoder_layers: bool  # a decoder layer is an attention block and an MLP block, dropped together (depth_unit 2)


# The families, one line each: a new family is its adapter module and its line here (model/hf.py builds its
# registry from this table); the GGUF writers (model/gguf.py) are keyed by the same names.
FAMILIES: dict[str, Family] = {
    "nemotron_h": Family("hf_nemotron_h", decoder_layers=False),
    "mamba2": Family("hf_mamba2", decoder_layers=False),
    "llama": Family("hf_llama", decoder_layers=True),
    "qwen2": Family("hf_llama", decoder_layers=True),
    "qwen3": Family("hf_llama", decoder_layers=True),
    "qwen3_moe": Family("hf_llama", decoder_layers=True),
    "mistral": Family("hf_mistral", decoder_layers=True),
}
# rope_type → the keys it needs besides rope_theta (transformers' names)
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope(rope: Any, head_dim: int) -> None:
    """Raise ConfigError unless ``rope`` is None or rope parameters this library computes exactly.

    >>> check_rope({"rope_type": "default", "rope_theta": 10000.0}, 16)
    >>> check_rope({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, 16)
    Traceback (most recent call last):
    ...
    elasticlm.errors.ConfigError: rope_type 'yarn' is not supported; use one of ['default', 'linear', 'llama3']
    """
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be a mapping or null, got {rope!r}")
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_type {kind!r} is not supported; use one of {sorted(ROPE_TYPES)}")
    for key in ("rope_theta", *ROPE_TYPES[kind]):
        v = rope.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"rope_parameters[{key!r}] must be a positive number for rope_type {kind!r}, got {v!r}")
    if kind == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
        raise ConfigError("rope_parameters: llama3 needs high_freq_factor > low_freq_factor")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("rope_parameters: partial_rotary_factor other than 1 is not supported")
    if head_dim % 2:
        raise ConfigError(f"rotary attention needs an even attention_head_dim, got {head_dim}")


def check_fields(cls: type, data: Any, where: str) -> None:
    """Raise ConfigError unless ``data`` is a mapping whose keys are fields of dataclass ``cls``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {where}; known fields: {sorted(known)}")


def _collapse(values: list[int], default: int) -> IntOrList:
    """One int when all layers agree (or there are none), else the per-layer list."""
    if not values:
        return default
    return values[0] if all(v == values[0] for v in values) else list(values)


def nested_table(data: Any) -> dict[str, Any]:
    """A model table with the flat keys older configs wrote for a kind's settings moved into the kind's section
    (``ssm_state_size`` → ``mamba.state_size``, ``moe_top_k`` → ``moe.top_k``); a copy, sections copied too.

    >>> nested_table({"pattern": "M", "ssm_state_size": 8, "mamba": {"head_dim": 4}})
    {'pattern': 'M', 'mamba': {'state_size': 8, 'head_dim': 4}}
    """
    if not isinstance(data, dict):
        raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
    data = {k: dict(v) if k in SECTION_KINDS and isinstance(v, dict) else v for k, v in data.items()}
    for name, kind in SECTION_KINDS.items():
        flat = {k: data.pop(k) for k in list(data) if kind.legacy_field(k) is not None}
        if not flat:
            continue
        given = data.get(name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[model.{name}] must be a mapping, got {given!r}")
        known = {f.name for f in dataclasses.fields(kind.section)}
        unknown = sorted(k for k in flat if kind.legacy_field(k) not in known)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in model config; {name} settings are "
                              f"{sorted(known)} under [model.{name}]")
        twice = sorted(k for k in flat if kind.legacy_field(k) in given)
        if twice:
            raise ConfigError(f"model config sets {twice} both flat and in [model.{name}]; keep the "
                              f"[model.{name}] entry")
        data[name] = {**{kind.legacy_field(k): v for k, v in flat.items()}, **given}
    return data


def overlay_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Model table ``over`` on top of ``base`` (a preset, say): a kind's section is updated field by field, and a
    flat key older configs wrote overrides the section field it names.

    >>> overlay_tables({"pattern": "M", "mamba": {"num_heads": 8, "chunk_size": 32}}, {"chunk_size": 16})
    {'pattern': 'M', 'mamba': {'num_heads': 8, 'chunk_size': 16}}
    """
    base, over = nested_table(base), nested_table(over)
    out = {**base, **over}
    for name in SECTION_KINDS:
        if isinstance(base.get(name), dict) and isinstance(over.get(name), dict):
            out[name] = {**base[name], **over[name]}
    return out


@dataclass
class ModelConfig:
    """Architecture of a hybrid Mamba-2 / attention / MLP language model (Nemotron-H layout)."""

    pattern: str
    vocab_size: int
    hidden_size: int
    # attention
    num_attention_heads: IntOrList = 4
    num_key_value_heads: int = 2
    attention_head_dim: int = 16
    # rotary position embeddings (None: no positional encoding, as Nemotron-H): transformers' rope_parameters,
    # {"rope_type": "default" | "linear" | "llama3", "rope_theta": ..., and the scaling type's own keys}
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False  # q/k/v projections (Qwen2; Llama's attention_bias also sets attention_out_bias)
    attention_out_bias: bool = False  # o_proj
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before the rotation (Qwen3)
    max_position_embeddings: int = 4096  # carried to exported configs; positions are not limited by it
    # MLP
    intermediate_size: IntOrList = 256
    mlp_type: str = "relu2"  # "relu2": down(relu(up x)²) (Nemotron-H); "swiglu": down(silu(gate x) · up x)
    # misc
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # The family: the Hugging Face model_type the model comes from and exports to (a key of FAMILIES above, and of
    # the GGUF writers). The word means only this in elasticlm (a demo's architecture choice is its --parent;
    # synthetic data has *task* families).
    family: str = "nemotron_h"
    # Filled in by importance reordering (later issues): layer indices, least important first.
    depth_order: list[int] | None = field(default=None)
    # The settings of kinds that keep their own (LayerKind.section), by kind name; written as top-level keys
    # (``"<kind>": {...}`` in JSON, ``[model.<kind>]`` in TOML). A missing section takes the section's defaults.
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """A kind's section by the kind's name: ``config.mamba.state_size``, ``config.moe.top_k``."""
        kind = SECTION_KINDS.get(name)
        if kind is None or "sections" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.section(kind)

    def section(self, kind: LayerKind) -> Any:
        """The typed section of ``kind`` (its defaults when the config gives none)."""
        assert kind.section is not None, f"the {kind.name} kind has no config section"
        found = self.sections.get(kind.name)
        return found if found is not None else kind.section()

    def with_section(self, kind: LayerKind, **changes: Any) -> ModelConfig:
        """A copy whose ``kind`` section has ``changes`` (the dataclasses.replace of a section)."""
        section = dataclasses.replace(self.section(kind), **changes)
        return dataclasses.replace(self, sections={**self.sections, kind.name: section})

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        kinds = ", ".join(f"{c!r} ({name})" for c, name in LAYER_NAMES.items())
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"pattern must be a non-empty string of {kinds}")
        unknown = sorted(set(self.pattern) - set(LAYER_NAMES))
        if unknown:
            raise ConfigError(f"pattern {self.pattern!r} has unknown layer character(s) {unknown}; use {kinds}")
        check_values(self, positive=("vocab_size", "hidden_size", "num_key_value_heads", "attention_head_dim"),
                     finite=("norm_eps", "initializer_range"))
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        for i, h in enumerate(self.attention_heads_list()):
            if h % self.num_key_value_heads:
                raise ConfigError(
                    f"num_attention_heads={h} (attention layer {i}) is not a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads}"
                )
        self.intermediate_sizes_list()
        if self.mlp_type not in MLP_TYPES:
            raise ConfigError(f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {tuple(FAMILIES)}, got {self.family!r}")
        check_values(self, flags=("attention_bias", "attention_out_bias", "qk_norm", "tie_word_embeddings"))
        check_rope(self.rope_parameters, self.attention_head_dim)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise ConfigError(f"{name}={v!r} is outside the vocabulary [0, {self.vocab_size})")
        if self.depth_order is not None and sorted(self.depth_order) != list(range(self.num_layers)):
            raise ConfigError(f"depth_order must be a permutation of range({self.num_layers})")
        self._check_sections()  # last: a kind's checks read the shared fields validated above

    def _check_sections(self) -> None:
        if not isinstance(self.sections, dict):
            raise ConfigError(f"sections must be a mapping of kind name to settings, got {self.sections!r}")
        self.sections = dict(self.sections)  # converted below; the caller's mapping stays as given
        for name, value in list(self.sections.items()):
            kind = SECTION_KINDS.get(name)
            if kind is None:
                raise ConfigError(f"model config has a section {name!r}, but no layer kind of that name has "
                                  f"settings; known: {sorted(SECTION_KINDS)}")
            if isinstance(value, dict):
                check_fields(kind.section, value, f"[model.{name}]")
                self.sections[name] = kind.section(**value)
            elif not isinstance(value, kind.section):
                raise ConfigError(f"[model.{name}] must be a mapping, got {value!r}")
        # a section per kind of the pattern, written out explicitly (not left to defaults); none for absent kinds
        # (older files wrote every moe_* field, MoE layers or not)
        self.sections = {name: self.section(kind) for name, kind in SECTION_KINDS.items() if kind.char in self.pattern}
        for name, kind in SECTION_KINDS.items():
            if kind.char in self.pattern:
                kind.check_section(self, self.sections[name])

    def drop_order(self, keep_attention: bool = True) -> list[int] | None:
        """The order in which layers are dropped: ``depth_order`` (least important first), with the most
        important attention layer moved last when ``keep_attention`` — so a sub-model keeps an attention layer
        as long as it keeps any layer after it. Inference engines need one: transformers' and vLLM's hybrid
        caches fail on an attention-free NemotronH.

        >>> ModelConfig(pattern="M*M*", vocab_size=8, hidden_size=8, depth_order=[1, 3, 0, 2]).drop_order()
        [1, 0, 2, 3]

        A transformer (:attr:`depth_unit` 2) drops whole decoder layers, attention and MLP together, least
        important first by the mean rank of their two blocks (every layer has attention):

        >>> ModelConfig(pattern="*-*-", vocab_size=8, hidden_size=8, family="llama", depth_order=[2, 3, 1, 0],
        ...             rope_parameters={"rope_theta": 1e4}).drop_order()
        [2, 3, 0, 1]
        """
        order = self.depth_order
        if order is not None and self.depth_unit == 2:
            rank = {block: k for k, block in enumerate(order)}
            layers = sorted(range(self.num_layers // 2), key=lambda j: (rank[2 * j] + rank[2 * j + 1], j))
            return [block for j in layers for block in (2 * j, 2 * j + 1)]
        if order is None or not keep_attention or ATTENTION not in self.pattern:
            return None if order is None else list(order)
        keep = [i for i in order if self.pattern[i] == ATTENTION][-1]
        return [i for i in order if i != keep] + [keep]

    # -- per-layer views --------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def depth_unit(self) -> int:
        """Blocks that are dropped together: 2 for a transformer family (a decoder layer is an attention and an MLP
        block, and its Hugging Face class cannot hold half of one), else 1."""
        pairs = self.num_layers // 2
        layered = self.num_layers == 2 * pairs and all(kind_of(self.pattern[2 * j]).attends and
                                                       not kind_of(self.pattern[2 * j + 1]).mixes_tokens
                                                       for j in range(pairs))
        return 2 if FAMILIES[self.family].decoder_layers and layered and pairs else 1

    def count(self, kind: str) -> int:
        return self.pattern.count(kind)

    def attention_heads_list(self) -> list[int]:
        return _per_layer(self.num_attention_heads, self.count(ATTENTION), "num_attention_heads")

    def intermediate_sizes_list(self) -> list[int]:
        return _per_layer(self.intermediate_size, self.count(MLP), "intermediate_size")

    def kind_index(self, layer: int) -> int:
        """Position of ``layer`` among the layers of its own kind (``"M-M*"``: layer 2 → 1)."""
        return self.pattern[:layer].count(self.pattern[layer])

    def layer_widths(self, layer: int) -> LayerWidth:
        """The full (parent) width of one layer, as a Subnet entry."""
        return kind_of(self.pattern[layer]).full_width(self, self.kind_index(layer))

    @property
    def is_homogeneous(self) -> bool:
        """True when every layer of a kind has the same widths (expressible as a NemotronH config)."""
        return all(len({self.layer_widths(i) for i, c in enumerate(self.pattern) if c == char}) <= 1
                   for char in set(self.pattern))

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(out.pop("sections"))  # a kind's section under its name, beside the other fields
        return out

    def flat_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`to_dict` in the flat form configs had before kinds kept sections — every field of a kind with
        older names under that name (``moe_top_k``, ``ssm_state_size``), at its default where the pattern has no
        such layer, as those files held it — and the default of every key. Training runs record the architecture
        this way, so that runs started before the sections resume."""
        out = self.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for name, kind in SECTION_KINDS.items():
            if kind.legacy_prefix or kind.legacy_keys:
                out.pop(name, None)
                out.update({kind.legacy_name(k): v for k, v in dataclasses.asdict(self.section(kind)).items()})
                defaults.update({kind.legacy_name(f.name): f.default for f in dataclasses.fields(kind.section)})
        return out, defaults

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A config from its JSON / TOML mapping: kinds' sections under their names, and the flat keys older
        configs wrote for them (``moe_top_k``, ``ssm_state_size``) still read."""
        data = nested_table(data)
        sections = {name: data.pop(name) for name in SECTION_KINDS if name in data}
        known = {f.name for f in dataclasses.fields(cls)} - {"sections"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in model config; known fields: {sorted(known)}, and the "
                              f"sections {sorted(SECTION_KINDS)} ([model.<kind>])")
        missing = [n for n in ("pattern", "vocab_size", "hidden_size") if n not in data]
        if missing:
            raise ConfigError(f"model config is missing required field(s) {missing}")
        return cls(**data, sections=sections)
