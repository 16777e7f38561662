"""What a block hands its mixer besides the input and the width: one object, each kind reading what it needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import HybridCache
    from .documents import DocumentMask


@dataclass
class MixerCall:
    """The model's context of one forward pass — the decode ``cache`` and this layer's index in it, packed
    ``documents``, the ``rotary`` tables of the call's positions — and the block's own: a soft mask on the inner
    activation (``inner``, see :class:`~elasticlm.model.hybrid.Modulation`) and the sub-model's parameters sliced
    in advance (``params``; None: the mixer slices them). Token mixers read the first three; the MLP and the
    mixture of experts only the last two."""

    cache: HybridCache | None = None
    layer: int = 0
    documents: DocumentMask | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    inner: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None


PLAIN = MixerCall()  # a mixer called on its own: no cache, no documents, no mask, parameters sliced as needed

__all__ = ["PLAIN", "MixerCall"]
