"""Cost model as pure functions: exact and expected parameter counts, and deployment memory.

The parameter count of a Subnet is *multilinear* in its widths (:func:`elasticlm.config.block_parameters`):
every term is a product in which each axis (hidden size, Mamba heads per group, Mamba head channels,
query heads per KV group, FFN width, "layer kept") appears at most once. So when a router picks every
axis independently, the expected count is the same formula evaluated at each axis' expected value —
exact, and differentiable through the router's probabilities.

Worked example (one MLP layer, hidden 64, FFN 128, no bias): ``2·64·128 + 64 = 16,448`` parameters;
keeping FFN 128 or 64 with probability ½ each gives ``block_parameters(cfg, "-", 64, ffn=96) = 12,352``.
"""

from __future__ import annotations

from typing import Any

from ..config import (
    AttentionWidth,
    MambaWidth,
    ModelConfig,
    Subnet,
    block_parameters,
    count_parameters,
    outer_parameters,
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def expected_parameter_count(config: ModelConfig, hidden: Any, layers: list[dict[str, Any]],
                             kept: list[Any] | None = None) -> Any:
    """E[parameter count] when every axis is chosen independently: ``hidden`` and the entries of
    ``layers[i]`` (the :func:`~elasticlm.config.block_parameters` keywords of layer ``i``) are expected
    widths, ``kept[i]`` the probability that layer ``i`` runs. Differentiable when they are tensors."""
    if len(layers) != config.num_layers or (kept is not None and len(kept) != config.num_layers):
        raise ValueError(f"give one entry per layer ({config.num_layers})")
    total = outer_parameters(config, hidden)
    for i, widths in enumerate(layers):
        p = 1 if kept is None else kept[i]
        total = total + p * block_parameters(config, config.pattern[i], hidden, **widths)
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
    g, n = config.mamba_n_groups, config.ssm_state_size
    kv = state = 0
    for width in subnet.layers:
        if isinstance(width, AttentionWidth):
            kv += 2 * batch * context * config.num_key_value_heads * config.attention_head_dim * w
        elif isinstance(width, MambaWidth):
            d_inner = g * width.heads_per_group * width.head_dim
            state += batch * (d_inner + 2 * g * n) * (config.conv_kernel - 1) * w
            state += batch * d_inner * n * s
    weights = count_parameters(config, subnet) * w
    return {"weights": weights, "kv_cache": kv, "mamba_state": state, "total": weights + kv + state}


__all__ = ["DTYPE_BYTES", "expected_parameter_count", "memory_bytes"]
