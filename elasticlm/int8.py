"""Symmetric int8 weights with one scale per output channel, sliceable exactly like the float weight.

A weight ``W`` (``[out, in]``, or ``[experts, out, in]``) is stored as ``q = round(W / s)`` in int8 and
``s = max|W[row, :]| / 127``, one scale per row (the scale tensor has the weight's shape with the last,
reduction dimension 1). Every cut a budget makes keeps whole rows or a prefix of the reduction axis, so a
slice of ``(q, s)`` — rows of both, columns of ``q`` only — dequantizes to exactly the slice of the
dequantized weight:

    dequantize(slice(q), slice(s)) == slice(q · s)        (bit for bit: one multiply per entry either way)

Worked example — ``W = [[0.5, -1.0], [2.0, 0.25]]``: ``s = [[1/127], [2/127]]``, ``q = [[64, -127],
[127, 16]]``; the budget that keeps row 1 and column 0 keeps ``q = [[127]]``, ``s = [[2/127]]`` → ``2.0``.

Decoding (up to 64 rows of activations) runs in torch's own int8 weight-only kernel (``torch._weight_int8pack_mm``
on CPU: int8 rows, one scale per output row), which streams a quarter of the fp32 bytes. Its vectorised path takes
bf16 activations (with fp32 ones it runs a scalar loop, ~10x slower than an fp32 matmul, on AVX2 and AVX-512
dispatch alike; measured in bench/bench_quantized.py), so activations enter it as bf16 and the result comes back
in the caller's dtype. It needs row-contiguous weights, which a column prefix is not, so the activations are
zero-padded to the stored row length instead (the extra products are exact zeros). Many rows at once (prefill,
scoring, evaluation: compute-bound, the weight read is shared by every row) and other devices dequantize the
weight for the call and multiply in the activations' own dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT8_SUFFIX, SCALE_SUFFIX = "_int8", "_scale"  # a quantized parameter P is stored as buffers P_int8 and P_scale
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to this many activation rows (decoding, short prompts) the int8 kernel; more: dequantize and multiply. The
# kernel's cost grows with the rows, the dequantization's does not: on a 2-core AVX-512 box they cross near 64 rows
# for SmolLM2's matrices (576 x 1536: 1.17 vs 1.13 ms at 64 rows; 49152 x 576: 58 vs 115 ms).
KERNEL_ROWS = 64
# The kernel's vector loop reads 16 values at a time with aligned loads (activation rows on 32 bytes, weight rows on
# 16): stored rows must be a multiple of 16 long and start 16-byte aligned, or it reads past rows (wrong numbers) or
# faults. Weights are laid out so (kernel_layout), and a slice that is not is copied so for the call.
KERNEL_BLOCK = 16


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
        return self.q.to(dtype).mul_(self.scale.to(dtype))

    def compact(self) -> Int8Weight:
        """A copy in its own memory, laid out for the kernel (see :func:`kernel_layout`)."""
        return Int8Weight(kernel_layout(self.q.contiguous()), self.scale.contiguous())

    @functools.cached_property
    def kernel_rows(self) -> torch.Tensor:
        """``q`` as the kernel reads it (see :func:`full_rows`); kept while this slice lives (a decode's memo)."""
        return full_rows(self.q)

    @functools.cached_property
    def kernel_scale(self) -> torch.Tensor:
        return self.scale.reshape(self.q.shape[0]).to(torch.bfloat16).contiguous()

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


def kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """``q`` (same shape and values) as a view of a fresh allocation whose rows are zero-padded to a multiple of
    :data:`KERNEL_BLOCK` — what the kernel reads (:func:`full_rows`) — unless ``q`` already is one.

    Worked example — ``q`` of shape ``[3, 20]``: stored as ``[3, 32]`` (12 zeros after every row), returned as the
    ``[3, 20]`` view with strides ``(32, 1)``; ``state_dict`` and saving see the ``[3, 20]`` values only.
    """
    k = q.shape[-1]
    stored = -(-k // KERNEL_BLOCK) * KERNEL_BLOCK
    if q.is_contiguous() and k == stored and q.data_ptr() % 16 == 0:
        return q
    buffer = torch.zeros(*q.shape[:-1], stored, dtype=q.dtype, device=q.device)  # CPU allocations: 64-byte aligned
    buffer[..., :k] = q
    return buffer[..., :k]


def full_rows(q: torch.Tensor) -> torch.Tensor:
    """``q`` (``[rows, k]``) as the kernel reads it: row-contiguous rows of a stored length ``K >= k`` that is a
    multiple of :data:`KERNEL_BLOCK`, starting 16-byte aligned — over the same memory when ``q`` already lies so,
    else in a copy laid out by :func:`kernel_layout`.

    A column prefix ``W[:, :k]`` of a ``[rows, K]`` matrix (a cut hidden size) has strides ``(K, 1)``: its rows are
    the first ``k`` entries of ``K``-long stored rows, so the ``[rows, K]`` view of them exists without a copy; the
    caller pads the activations with ``K - k`` zeros.
    """
    rows, k = q.shape
    stride = q.stride(0)
    if (q.stride(1) == 1 and stride >= k and stride % KERNEL_BLOCK == 0 and q.data_ptr() % 16 == 0
            and q.storage_offset() + rows * stride <= q.untyped_storage().nbytes()):
        return q if stride == k and q.is_contiguous() else q.as_strided((rows, stride), (stride, 1))
    return full_rows(kernel_layout(q.contiguous()))


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for float and int8 weights alike."""
    if not isinstance(w, Int8Weight):
        return F.linear(x, w, bias)
    rows, k = w.q.shape
    if (x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.requires_grad
            or x.numel() > KERNEL_ROWS * k):
        return F.linear(x, w.dequantize(x.dtype), bias)
    q = w.kernel_rows
    x2 = x.reshape(-1, k).to(torch.bfloat16)
    if q.shape[1] != k:
        x2 = F.pad(x2, (0, q.shape[1] - k))
    x2 = x2.contiguous()
    if x2.data_ptr() % 32:  # a view into a larger tensor: a fresh (aligned) copy
        x2 = x2.clone()
    y = torch._weight_int8pack_mm(x2, q, w.kernel_scale).to(x.dtype)
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


__all__ = ["Int8Weight", "embedding", "fold", "full_rows", "kernel_layout", "linear", "quantize_tensor", "tensors",
           "unfold", "weight"]
