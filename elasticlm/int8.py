"""Symmetric int8 weights with one scale per output channel, sliceable exactly like the float weight.

A weight ``W`` (``[out, in]``, or ``[experts, out, in]``) is stored as ``q = round(W / s)`` in int8 and
``s = max|W[row, :]| / 127``, one scale per row (the scale tensor has the weight's shape with the last,
reduction dimension 1). Every cut a budget makes keeps whole rows or a prefix of the reduction axis, so a
slice of ``(q, s)`` — rows of both, columns of ``q`` only — dequantizes to exactly the slice of the
dequantized weight:

    dequantize(slice(q), slice(s)) == slice(q · s)        (bit for bit: one multiply per entry either way)

Worked example — ``W = [[0.5, -1.0], [2.0, 0.25]]``: ``s = [[1/127], [2/127]]``, ``q = [[64, -127],
[127, 16]]``; the budget that keeps row 1 and column 0 keeps ``q = [[127]]``, ``s = [[2/127]]`` → ``2.0``.

Matrix products run in torch's own int8 weight-only kernel (``torch._weight_int8pack_mm``, CPU: int8 rows,
float activations, one scale per output row); it needs row-contiguous weights, which a column prefix is not,
so the activations are zero-padded to the stored row length instead (the extra products are exact zeros).
Elsewhere (other devices, other dtypes) the weight is dequantized for the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT8_SUFFIX, SCALE_SUFFIX = "_int8", "_scale"  # a quantized parameter P is stored as buffers P_int8 and P_scale
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` of ``w``: int8 values and fp32 scales per row (all leading dimensions), ``w ≈ q · s``.

    >>> q, s = quantize_tensor(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    >>> q.tolist(), (s * 127).flatten().tolist()
    ([[64, -127], [127, 16]], [1.0, 2.0])
    """
    w = w.detach().float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row (padding): q = 0
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass(frozen=True)
class Int8Weight:
    """A quantized weight (or a slice of one): ``q`` int8, ``scale`` float with ``q``'s shape but a last dim of 1."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight computes in (its scales')."""
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dim(self) -> int:
        return self.q.dim()

    def narrow(self, dim: int, start: int, length: int) -> Int8Weight:
        dim = dim % self.q.dim()
        last = dim == self.q.dim() - 1
        return Int8Weight(self.q.narrow(dim, start, length),
                          self.scale if last else self.scale.narrow(dim, start, length))

    def __getitem__(self, index: int) -> Int8Weight:
        """One expert of a ``[experts, out, in]`` weight."""
        return Int8Weight(self.q[index], self.scale[index])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scale.dtype
        return self.q.to(dtype) * self.scale.to(dtype)

    def contiguous(self) -> Int8Weight:
        return Int8Weight(self.q.contiguous(), self.scale.contiguous())

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


def full_rows(q: torch.Tensor) -> torch.Tensor:
    """``q`` (``[rows, k]``) as row-contiguous rows of its stored length ``K >= k``, over the same memory.

    A column prefix ``W[:, :k]`` of a contiguous ``[rows, K]`` matrix has strides ``(K, 1)``; its rows are the
    first ``k`` entries of ``K``-long stored rows, so the ``[rows, K]`` view of them exists without a copy.
    Anything else is copied.
    """
    if q.is_contiguous():
        return q
    rows, k = q.shape
    stride = q.stride(0)
    if q.stride(1) == 1 and stride > k and q.storage_offset() + rows * stride <= q.untyped_storage().nbytes():
        return q.as_strided((rows, stride), (stride, 1))
    return q.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for float and int8 weights alike."""
    if not isinstance(w, Int8Weight):
        return F.linear(x, w, bias)
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.requires_grad:
        return F.linear(x, w.dequantize(x.dtype), bias)
    rows, k = w.q.shape
    q = full_rows(w.q)
    x2 = x.reshape(-1, k)
    if q.shape[1] != k:
        x2 = F.pad(x2, (0, q.shape[1] - k))
    y = torch._weight_int8pack_mm(x2.contiguous(), q, w.scale.reshape(rows).to(x.dtype))
    y = y.view(*x.shape[:-1], rows)
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``F.embedding`` for float and int8 tables alike (an int8 row times its scale)."""
    if not isinstance(w, Int8Weight):
        return F.embedding(ids, w)
    return w.q[ids].to(w.scale.dtype) * w.scale[ids]


def fold(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | Int8Weight]:
    """State-dict entries ``P_int8`` + ``P_scale`` as one ``P: Int8Weight``; other entries as they are."""
    out: dict[str, torch.Tensor | Int8Weight] = {}
    for name, t in tensors.items():
        if name.endswith(INT8_SUFFIX):
            base = name[: -len(INT8_SUFFIX)]
            out[base] = Int8Weight(t, tensors[base + SCALE_SUFFIX])
        elif not (name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] + INT8_SUFFIX in tensors):
            out[name] = t
    return out


def unfold(tensors: dict[str, torch.Tensor | Int8Weight]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fold`: every ``Int8Weight`` back as its two state-dict entries."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, Int8Weight):
            out[name + INT8_SUFFIX], out[name + SCALE_SUFFIX] = t.q, t.scale
        else:
            out[name] = t
    return out


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor | Int8Weight]:
    """A module's parameters and buffers by state-dict name, each int8 pair as one ``Int8Weight``."""
    return fold({**dict(module.named_parameters()), **dict(module.named_buffers())})


def weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | Int8Weight:
    """``module.<name>``, float or int8."""
    p = module._parameters.get(name)
    if p is not None:
        return p
    return Int8Weight(module._buffers[name + INT8_SUFFIX], module._buffers[name + SCALE_SUFFIX])


__all__ = ["Int8Weight", "embedding", "fold", "full_rows", "linear", "quantize_tensor", "tensors", "unfold", "weight"]
