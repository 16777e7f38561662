"""The one-time permutation of a parent's weights into importance order (DESIGN 2.3).

After :func:`reorder_`, every nested sub-model is a *prefix* of every axis (inside every group
for Mamba heads and query heads), so slicing keeps the most important units. The parent's
function is unchanged: each permutation is applied to both sides of the product it runs through
(rows of the producing projection, columns of the consuming one), and RMSNorm, the depthwise
conv, the per-head SSM parameters and the grouped gated norm are all equivariant under it.

Index helpers, with worked examples:

>>> grouped_order(torch.tensor([1., 3., 2., 0., 5., 4.]), groups=2).tolist()
[1, 2, 0, 4, 5, 3]
>>> channel_rows(torch.tensor([1, 0]), torch.tensor([2, 0, 1]), 3).tolist()
[5, 3, 4, 2, 0, 1]
"""

from __future__ import annotations

import torch

from ..config import ATTENTION, MAMBA
from ..model.attention import Attention
from ..model.hybrid import HybridLM
from ..model.mamba2 import Mamba2Mixer
from ..model.mlp import MLP
from .importance import Importance


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices from the most to the least important (ties keep their original order)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def grouped_order(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """A permutation that sorts units by descending score *within* each of ``groups`` equal,
    contiguous groups (units never leave their group): see the module docstring."""
    per = scores.numel() // groups
    return torch.cat([descending(scores[g * per:(g + 1) * per]) + g * per for g in range(groups)])


def channel_rows(head_order: torch.Tensor, channel_order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a ``[heads · head_dim]`` axis when heads are reordered by ``head_order`` and the
    channels inside every head by the shared ``channel_order`` (see the module docstring)."""
    return (head_order[:, None] * head_dim + channel_order[None, :]).flatten()


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, index.to(t.device))


@torch.no_grad()
def _permute_(param: torch.nn.Parameter | torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    if param is not None:
        param.copy_(_take(param.data, dim, index))


@torch.no_grad()
def _reorder_mamba_(m: Mamba2Mixer, hidden: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
    heads, hd = m.num_heads, m.head_dim
    d_inner, bc = heads * hd, 2 * m.n_groups * m.state_size
    head = grouped_order(scores["head"], m.n_groups)
    rows = channel_rows(head, descending(scores["channel"]), hd)
    keep_bc = torch.arange(bc) + 2 * d_inner
    in_rows = torch.cat([rows, rows + d_inner, keep_bc, head + 2 * d_inner + bc])
    _permute_(m.in_proj.weight, 0, in_rows)
    _permute_(m.in_proj.weight, 1, hidden)
    _permute_(m.in_proj.bias, 0, in_rows)
    conv_rows = torch.cat([rows, torch.arange(bc) + d_inner])
    _permute_(m.conv1d.weight, 0, conv_rows)
    _permute_(m.conv1d.bias, 0, conv_rows)
    for p in (m.dt_bias, m.A_log, m.D):
        _permute_(p, 0, head)
    _permute_(m.norm.weight, 0, rows)
    _permute_(m.out_proj.weight, 1, rows)
    _permute_(m.out_proj.weight, 0, hidden)
    _permute_(m.out_proj.bias, 0, hidden)


@torch.no_grad()
def _reorder_attention_(a: Attention, hidden: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
    rows = channel_rows(grouped_order(scores["head"], a.num_kv_heads), torch.arange(a.head_dim), a.head_dim)
    _permute_(a.q_proj.weight, 0, rows)
    for lin in (a.q_proj, a.k_proj, a.v_proj):
        _permute_(lin.weight, 1, hidden)
    _permute_(a.o_proj.weight, 1, rows)
    _permute_(a.o_proj.weight, 0, hidden)


@torch.no_grad()
def _reorder_mlp_(m: MLP, hidden: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
    neurons = descending(scores["neuron"])
    _permute_(m.up_proj.weight, 0, neurons)
    _permute_(m.up_proj.bias, 0, neurons)
    _permute_(m.up_proj.weight, 1, hidden)
    _permute_(m.down_proj.weight, 1, neurons)
    _permute_(m.down_proj.weight, 0, hidden)
    _permute_(m.down_proj.bias, 0, hidden)


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
        if cfg.pattern[i] == MAMBA:
            _reorder_mamba_(block.mixer, hidden, importance.layers[i])
        elif cfg.pattern[i] == ATTENTION:
            _reorder_attention_(block.mixer, hidden, importance.layers[i])
        else:
            _reorder_mlp_(block.mixer, hidden, importance.layers[i])
    cfg.depth_order = depth
    return model


__all__ = ["channel_rows", "descending", "grouped_order", "reorder_"]
