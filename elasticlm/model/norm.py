"""RMS norms whose statistics are taken over the *active* channels only.

Slicing the weight and the input to a prefix gives exactly the norm of the smaller model,
which is why a Subnet run of the parent equals the extracted model (DESIGN 4.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight[: x.shape[-1]], self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, width: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm in fp32 (statistics and weight multiply), cast back to the input dtype.

    ``width`` (soft nested masks): the number of active channels, the mask's sum. ``x`` is already masked, so
    the mean square is ``sum(x²) / width``: with a 0/1 mask of ``k`` ones this is the norm of the first ``k``
    channels, exactly what the sliced model computes (the masked channels stay 0).
    """
    if width is not None:
        xf = x.float()
        ms = xf.pow(2).sum(-1, keepdim=True) / width.float()
        return (xf * torch.rsqrt(ms + eps) * weight.float()).to(x.dtype)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def gated_group_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int,
                         eps: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mamba-2's gated norm: ``norm(y * silu(z))`` with statistics per group of channels.

    The gate is applied before the norm; ``weight`` multiplies after the cast back to the
    input dtype (both as transformers' NemotronH does). ``mask`` (soft nested masks, one value per
    channel) multiplies before the statistics, which are then taken over the mask's sum in each group:
    with a 0/1 mask this is the sliced model's norm over its kept heads and head dims.
    """
    h = y.float() * F.silu(z.float())
    shape = h.shape
    if mask is not None:
        h = (h * mask.float()).reshape(*shape[:-1], groups, shape[-1] // groups)
        active = mask.float().reshape(groups, shape[-1] // groups).sum(-1, keepdim=True)
        h = (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / active + eps)).reshape(shape)
        return weight * h.to(y.dtype)
    h = h.reshape(*shape[:-1], groups, shape[-1] // groups)
    h = F.rms_norm(h, (h.shape[-1],), None, eps).reshape(shape)
    return weight * h.to(y.dtype)
