"""Model configuration, the Subnet that names a nested sub-model, and exact parameter counts.

By responsibility: ``model.py`` (ModelConfig and its validation), ``subnet.py`` (Subnet, the sub-model's config,
exact parameter counts), ``budgets.py`` (budgets as users write them), ``files.py`` (presets, TOML / JSON files);
everything is importable from ``elasticlm.config``.

A model is a string pattern of blocks (DESIGN 2.1):

    ``M`` Mamba-2 mixer · ``*`` GQA attention · ``W`` sliding-window GQA attention · ``-`` MLP ·
    ``E`` mixture of experts (Nemotron-H MoE)

A kind with settings of its own keeps them in a section (``[model.sliding_attention] window = 4096``).

Nemotron-H's attention has no positional encoding and its MLP is squared-ReLU; transformer parents
(Llama, Qwen2, Qwen3) are the pattern ``"*-" * layers`` with rotary attention (``rope_parameters``) and a
gated SiLU MLP (``mlp_type = "swiglu"``); ``family`` names the Hugging Face class a model exports to.

Widths may differ per layer (an extracted heterogeneous sub-model): ``mamba_num_heads``,
``mamba_head_dim``, ``num_attention_heads`` and ``intermediate_size`` are either one int for
every layer of that kind, or a list with one entry per layer of that kind, in layer order.

A :class:`Subnet` picks, inside a parent, the active hidden size, which layers run, and for each
running layer the kept prefix of its widths. Example on a parent ``"M-*"`` with hidden 64,
2 Mamba groups × 4 heads × 16 channels, 4 query heads over 2 KV heads and FFN 128::

    Subnet(hidden_size=48,
           layers=(MambaWidth(heads_per_group=2, head_dim=8),   # 2 groups × 2 heads × 8
                   None,                                        # MLP layer skipped
                   AttentionWidth(heads_per_kv_group=1)))       # 2 query heads, 2 KV heads
"""

from __future__ import annotations

from ..kinds import AttentionWidth, MambaWidth, MlpWidth, MoeWidth  # the width types a Subnet holds
from .budgets import find_budget, parse_budget
from .files import PRESETS, parse_value, preset, read_config_file
from .model import (
    ATTENTION,
    FAMILIES,
    LAYER_NAMES,
    MAMBA,
    MLP,
    MLP_TYPES,
    MOE,
    ROPE_TYPES,
    IntOrList,
    LayerWidth,
    ModelConfig,
    check_fields,
    check_rope,
    nested_table,
    overlay_tables,
)
from .subnet import (
    Subnet,
    block_parameters,
    count_active_parameters,
    count_parameters,
    layer_parameters,
    outer_parameters,
    subnet_config,
)

__all__ = ["ATTENTION", "AttentionWidth", "FAMILIES", "IntOrList", "LAYER_NAMES", "LayerWidth", "MAMBA", "MLP",
           "MLP_TYPES", "MOE", "MambaWidth", "MlpWidth", "ModelConfig", "MoeWidth", "PRESETS", "ROPE_TYPES", "Subnet",
           "block_parameters", "check_fields", "check_rope", "count_active_parameters",
           "count_parameters", "find_budget", "layer_parameters", "nested_table", "outer_parameters",
           "overlay_tables", "parse_budget", "parse_value", "preset", "read_config_file", "subnet_config"]
