"""Slice a Subnet out of a parent as a standalone, physically smaller HybridLM."""

from __future__ import annotations

import torch

from ..config import Subnet, subnet_config
from ..model.hybrid import HybridLM


@torch.no_grad()
def extract(model: HybridLM, subnet: Subnet) -> HybridLM:
    """A new model holding copies of the sub-model's weights; it runs exactly as
    ``model(ids, subnet=subnet)`` and has ``model.num_parameters(subnet)`` parameters."""
    config = subnet_config(model.config, subnet)
    weights = model.sliced_state_dict(subnet)
    ref = next(iter(weights.values()))
    small = HybridLM(config, device="meta")
    small.to_empty(device=ref.device)
    small.to(ref.dtype)
    small.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return small
