"""Memory layout of the weights for decoding (serving), for nested budgets and plain models alike.

Decoding one token multiplies a vector by every weight matrix once, so its speed is how fast the
weights stream from memory. Two measured facts on CPU (``bench/bench_deploy.py``, docs/deployment.md):

* A matrix with more outputs than inputs (MLP up-projection, Mamba in-projection, output head)
  streams 12–27 % faster stored column-major (``W.t().contiguous().t()``: same shape and values,
  transposed strides) than row-major; one with fewer outputs than inputs is faster row-major.
* A nested budget's slice ``W[:rows, :cols]`` of a column-major ``W`` is ``cols`` runs of ``rows``
  values — long runs — and decodes within a few percent of a compact copy, whereas the same slice of
  a row-major ``W`` is ``rows`` short runs of ``cols`` values with a gap after each (up to 20 % slower).

So :func:`decode_layout` picks, per matrix, the layout whose contiguous runs are the long axis. The
tensor stays a normal strided view of one copy of the weights: slicing, ``state_dict``, saving
(which writes contiguous tensors) and even training keep working.
"""

from __future__ import annotations

import torch


def decode_layout(w: torch.Tensor) -> torch.Tensor:
    """``w`` (``[out, in]``) in the layout that decodes fastest: column-major when ``out > in``.

    Worked example — ``w`` is 6 × 2 (out > in), row-major strides (2, 1):

        decode_layout(w).stride() == (1, 6)      # each input column is one run of 6 values
        decode_layout(w)[:4, :2]                 # a nested slice: 2 runs of 4 values

    A 2 × 6 matrix comes back row-major (strides (6, 1)). Values and shape never change; a tensor
    already in that layout is returned as is (no copy).
    """
    if w.dim() != 2:
        return w
    if w.shape[0] > w.shape[1]:
        return w if w.stride() == (1, w.shape[0]) else w.t().contiguous().t()
    return w.contiguous()
