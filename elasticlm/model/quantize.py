"""Which weights of a HybridLM are stored in int8 (:mod:`elasticlm.int8`), and the conversion in place.

Quantized: every matrix a token's compute streams — the projections of every layer kind (``nn.Linear``),
the routed experts' ``[experts, out, in]`` tensors, the embedding table and the output head. Kept in the
model's float dtype: norms, biases, the Mamba convolution and SSM parameters and the MoE router (small,
and the router's ranking is sensitive to rounding).

A quantized module keeps parameter ``P`` as buffers ``P_int8`` and ``P_scale`` (so ``state_dict`` saves and
loads them like any tensor); :func:`elasticlm.int8.tensors` hands the model code ``P`` as one
:class:`~elasticlm.int8.Int8Weight`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..int8 import INT8_SUFFIX, SCALE_SUFFIX, Int8Weight, kernel_layout, quantize_tensor
from .moe import Experts

QUANTIZABLE = (nn.Linear, nn.Embedding, Experts)
METHOD = "int8"  # config.json's "quantization" entry: {"method": "int8", "scales": "per output channel"}
QUANTIZATION = {"method": METHOD, "scales": "per output channel", "kernel": "torch._weight_int8pack_mm"}


def quantizable(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """``(module, parameter name)`` of every weight that is stored in int8."""
    for module in model.modules():
        if isinstance(module, QUANTIZABLE):
            for name, p in list(module._parameters.items()):
                if p is not None and p.dim() >= 2:
                    yield module, name


def is_quantized(model: nn.Module) -> bool:
    return any(name.endswith(INT8_SUFFIX) for name, _ in model.named_buffers())


@torch.no_grad()
def quantize_(model: nn.Module) -> nn.Module:
    """Store every quantizable weight of ``model`` in int8 (in place; on the meta device: the structure only,
    for loading a quantized state dict)."""
    for module, name in list(quantizable(model)):
        w = module._parameters.pop(name)
        if w.device.type == "meta":
            q = torch.empty(w.shape, dtype=torch.int8, device="meta")
            s = torch.empty(*w.shape[:-1], 1, dtype=torch.float32, device="meta")
        else:
            q, s = quantize_tensor(w)
            s = s.to(w.dtype)
        module.register_buffer(name + INT8_SUFFIX, q if q.device.type == "meta" else kernel_layout(q))
        module.register_buffer(name + SCALE_SUFFIX, s)
    return model


@torch.no_grad()
def dequantize_(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every int8 weight of ``model`` back as a float parameter (in place): the exact values ``q · s``."""
    for module in model.modules():
        for name in [n for n in module._buffers if n.endswith(INT8_SUFFIX)]:
            base = name[: -len(INT8_SUFFIX)]
            w = Int8Weight(module._buffers.pop(name), module._buffers.pop(base + SCALE_SUFFIX))
            module.register_parameter(base, nn.Parameter(w.dequantize(dtype), requires_grad=False))
    return model


@torch.no_grad()
def align_(model: nn.Module) -> nn.Module:
    """Lay every int8 tensor out for the kernel (:func:`~elasticlm.int8.kernel_layout`: rows zero-padded to a
    multiple of 16, starting 16-byte aligned; a tensor read from a safetensors file starts wherever it was put).
    Values, shapes and what is saved do not change."""
    for module in model.modules():
        for name, t in module._buffers.items():
            if t is not None and name.endswith(INT8_SUFFIX) and t.device.type != "meta":
                module._buffers[name] = kernel_layout(t)
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, int8 counted as one byte)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


__all__ = ["QUANTIZATION", "align_", "dequantize_", "is_quantized", "quantizable", "quantize_", "state_bytes"]
