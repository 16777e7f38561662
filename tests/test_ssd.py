"""The chunked SSD scan against a slow, obviously-correct sequential recurrence."""

from __future__ import annotations

import pytest
import torch

from elasticlm.model.mamba2 import ssd_chunked


def naive_scan(x, dt, A, B, C, state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ ;  y_t = h_t C_t  — one head at a time."""
    b, t, heads, p = x.shape
    g, n = B.shape[2], B.shape[3]
    h = torch.zeros(b, heads, p, n, dtype=torch.float64) if state is None else state.double().clone()
    ys = torch.zeros(b, t, heads, p, dtype=torch.float64)
    for s in range(t):
        for hd in range(heads):
            grp = hd // (heads // g)
            decay = torch.exp(dt[:, s, hd].double() * A[hd].double())
            inp = dt[:, s, hd, None, None].double() * x[:, s, hd, :, None].double() * B[:, s, grp, None, :].double()
            h[:, hd] = decay[:, None, None] * h[:, hd] + inp
            ys[:, s, hd] = torch.einsum("bpn,bn->bp", h[:, hd], C[:, s, grp].double())
    return ys, h


def random_inputs(b, t, heads, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, heads, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, t, heads, generator=gen) - 1)
    A = -torch.exp(torch.randn(heads, generator=gen))
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    return x, dt, A, B, C


@pytest.mark.parametrize("t,chunk", [(1, 4), (7, 4), (8, 4), (13, 5), (30, 64)])
@pytest.mark.parametrize("heads,g", [(4, 1), (4, 2), (8, 4)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_naive(t, chunk, heads, g, with_state):
    x, dt, A, B, C = random_inputs(2, t, heads, 3, g, 5)
    state = torch.randn(2, heads, 3, 5) if with_state else None
    y, final = ssd_chunked(x, dt, A, B, C, chunk, state)
    y_ref, final_ref = naive_scan(x, dt, A, B, C, state)
    assert torch.allclose(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(final.double(), final_ref, atol=1e-4, rtol=1e-4)
