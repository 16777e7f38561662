"""The one-time permutation of a parent's weights into importance order (DESIGN 2.3).

After :func:`reorder_`, every nested sub-model is a *prefix* of every axis (inside every group
for Mamba heads and query heads), so slicing keeps the most important units. The parent's
function is unchanged: each permutation is applied to both sides of the product it runs through
(rows of the producing projection, columns of the consuming one), and RMSNorm, the depthwise
conv, the per-head SSM parameters and the grouped gated norm are all equivariant under it.

Which rows and columns move with which unit is each layer kind's layout (:mod:`elasticlm.kinds`): the
hidden order permutes every hidden run, a kind's head order permutes its heads inside every group
(Mamba: ``z``, ``x``, ``dt``, the conv, the per-head parameters, the gated norm and ``out_proj``'s columns).

>>> grouped_order(torch.tensor([1., 3., 2., 0., 5., 4.]), groups=2).tolist()
[1, 2, 0, 4, 5, 3]
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kinds import LayerKind, Width, kind_of
from ..model.hybrid import HybridLM
from .importance import Importance


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices from the most to the least important (ties keep their original order)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def grouped_order(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """A permutation that sorts units by descending score *within* each of ``groups`` equal,
    contiguous groups (units never leave their group): see the module docstring."""
    per = scores.numel() // groups
    return torch.cat([descending(scores[g * per:(g + 1) * per]) + g * per for g in range(groups)])


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, index.to(t.device))


@torch.no_grad()
def _permute_(param: torch.nn.Parameter | torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    if param is not None:
        param.copy_(_take(param.data, dim, index))


def unit_orders(kind: LayerKind, config: ModelConfig, full: Width, scores: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Each width field's new order, most important first, from the layer's scores: units ranked inside
    their group (``[groups, per_group]``, local indices), the entries of a unit by one shared order.

    >>> from elasticlm.kinds import MLP_KIND, MlpWidth
    >>> unit_orders(MLP_KIND, None, MlpWidth(3), {"neuron": torch.tensor([0.1, 0.9, 0.5])})
    {'intermediate_size': tensor([[1, 2, 0]])}
    """
    inner = kind.inner(config, full)
    orders = {}
    if inner.unit is not None:
        g, per = inner.groups, inner.per_group
        order = grouped_order(scores[kind.scores[inner.unit]], g).view(g, per)
        orders[inner.unit] = order - torch.arange(g)[:, None] * per
    if inner.entry is not None:
        orders[inner.entry] = descending(scores[kind.scores[inner.entry]])
    return orders


@torch.no_grad()
def reorder_mixer_(mixer: torch.nn.Module, kind: LayerKind, config: ModelConfig, full: Width,
                   orders: dict[str, torch.Tensor]) -> None:
    """Permute every parameter (and laid-out buffer, e.g. an MoE router's bias) of one layer's mixer along every
    dimension its layout says moves."""
    params = {**dict(mixer.named_parameters()), **dict(mixer.named_buffers())}
    for name, dims in kind.layout(config, full, full, config.hidden_size).items():
        for axis, dim in enumerate(dims):
            index = dim.permutation(orders)
            if not torch.equal(index, torch.arange(index.numel())):
                _permute_(params[name], axis, index)


@torch.no_grad()
def reorder_(model: HybridLM, importance: Importance, depth_metric: str = "iterative_mse") -> HybridLM:
    """Permute ``model``'s weights into importance order, in place, and record the depth order
    (least important first) in ``model.config.depth_order``. Returns ``model``."""
    cfg = model.config
    importance.check(cfg)
    depth = importance.depth_order(depth_metric) if importance.depth else None
    hidden = descending(importance.hidden)
    _permute_(model.embeddings.weight, 1, hidden)
    if model.lm_head is not None:
        _permute_(model.lm_head.weight, 1, hidden)
    _permute_(model.norm_f.weight, 0, hidden)
    for i, block in enumerate(model.layers):
        _permute_(block.norm.weight, 0, hidden)
        kind, full = kind_of(cfg.pattern[i]), cfg.layer_widths(i)
        orders = {"hidden": hidden, **unit_orders(kind, cfg, full, importance.layers[i])}
        reorder_mixer_(block.mixer, kind, cfg, full, orders)
    cfg.depth_order = depth
    return model


__all__ = ["descending", "grouped_order", "reorder_", "reorder_mixer_", "unit_orders"]
