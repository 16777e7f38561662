"""Rotary position embeddings (Llama / Qwen), in transformers' half-split layout.

Channel ``i`` of a head pairs with channel ``i + head_dim / 2``; pair ``i`` turns by ``position · inv_freq[i]``.
Head pruning never cuts the head dimension, so every sub-model rotates exactly as its parent does.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``inv_freq`` [head_dim / 2] (fp32) for ``rope_type`` default, linear or llama3.

    default: ``theta ** (-2i / head_dim)``; linear: that divided by ``factor`` (positions interpolated);
    llama3: long wavelengths (beyond ``original_max_position_embeddings / low_freq_factor``) divided by
    ``factor``, short ones (below ``… / high_freq_factor``) kept, a linear blend in between.

    >>> inverse_frequencies({"rope_theta": 100.0}, 4).tolist()
    [1.0, 0.10000000149011612]
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / (float(rope["rope_theta"]) ** exponents)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return inv / float(rope["factor"])
    if kind == "llama3":
        factor, context = float(rope["factor"]), float(rope["original_max_position_embeddings"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        wavelength = 2 * math.pi / inv
        blend = (context / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
        blended = (1 - blend) * inv / factor + blend * inv
        long_wave, short_wave = wavelength > context / low, wavelength < context / high
        return torch.where(long_wave, inv / factor, torch.where(short_wave, inv, blended))
    return inv


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """cos and sin ``[batch, 1, seq, head_dim]`` for ``positions`` [batch, seq] (computed in fp32)."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation to ``x`` [batch, heads, seq, head_dim] (in its dtype: under autocast the tables are
    fp32 and the projections bf16)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin
