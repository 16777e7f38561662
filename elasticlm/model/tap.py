"""A point inside a mixer that forward hooks can watch.

A mixer computes its sliced matmuls functionally (no submodule call), so a hook on its projections would never
fire. Each mixer instead passes the activation its output projection reads — the *inner* activation its kind's
``inner`` layout describes — through its ``tap``; importance scoring registers a forward hook there
(:func:`elasticlm.elastic.importance.estimate`), as anyone may. An unwatched tap is not called at all: decoding
pays nothing for it.
"""

from __future__ import annotations

import torch
from torch import nn


class Tap(nn.Module):
    """The identity, called only while a forward hook watches it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def watched(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)
