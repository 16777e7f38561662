"""Slice a Subnet out of a parent as a standalone, physically smaller HybridLM."""

from __future__ import annotations

import torch

from ..config import Subnet, subnet_config
from ..int8 import unfold
from ..model.hybrid import HybridLM
from ..model.quantize import align_, is_quantized, quantize_


@torch.no_grad()
def extract(model: HybridLM, subnet: Subnet) -> HybridLM:
    """A new model holding copies of the sub-model's weights; it runs exactly as
    ``model(ids, subnet=subnet)`` and has ``model.num_parameters(subnet)`` parameters. The slices of an int8
    model stay int8 (the rows' scales go with them)."""
    config = subnet_config(model.config, subnet)
    weights = unfold(model.sliced_state_dict(subnet))  # an int8 model's slices: int8 values and their row scales
    small = HybridLM(config, device="meta")
    if is_quantized(model):
        quantize_(small)
    small.to_empty(device=model.device)
    small.to(model.dtype)
    small.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return align_(small)
