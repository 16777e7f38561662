"""The cost model: expected parameter counts under independent choices, and deployment memory."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import random_subnet, tiny_config

from elasticlm import HybridLM, Subnet, count_parameters, extract
from elasticlm.elastic.space import expected_parameter_count, memory_bytes
from elasticlm.kinds import width_fields
from elasticlm.model.cache import KVState, MambaState


def test_expected_count_at_point_masses_is_the_exact_count():
    cfg = tiny_config("M-*M-M*")
    rng = random.Random(0)
    for _ in range(20):
        s = random_subnet(cfg, rng)
        widths = [width_fields(w if w is not None else cfg.layer_widths(i)) for i, w in enumerate(s.layers)]
        kept = [0 if w is None else 1 for w in s.layers]
        n = expected_parameter_count(cfg, s.hidden_size, widths, kept)
        assert n == count_parameters(cfg, s) == extract(HybridLM(cfg), s).num_parameters()


def test_expected_count_equals_enumerated_expectation():
    """Every axis chosen independently from two options; the reference enumerates all Subnets."""
    cfg = tiny_config("M-*M", heads=8, groups=2)
    axes = {"hidden": ([32, 16], [0.3, 0.7]), "hpg": ([4, 2], [0.6, 0.4]), "hd": ([8, 4], [0.5, 0.5]),
            "r": ([2, 1], [0.2, 0.8]), "ffn": ([48, 24], [0.9, 0.1]), "keep1": ([1, 0], [0.25, 0.75])}
    exact = 0.0
    for combo in itertools.product(*[range(2) for _ in axes]):
        p, v = 1.0, {}
        for (name, (vals, probs)), c in zip(axes.items(), combo, strict=True):
            p *= probs[c]
            v[name] = vals[c]
        s = Subnet.uniform(cfg, hidden_size=v["hidden"], mamba_heads_per_group=v["hpg"], mamba_head_dim=v["hd"],
                           attention_heads_per_kv_group=v["r"], intermediate_size=v["ffn"],
                           drop_layers=() if v["keep1"] else (1,))
        exact += p * count_parameters(cfg, s)
    probs = {name: torch.tensor(pr, dtype=torch.float64, requires_grad=True) for name, (_, pr) in axes.items()}
    e = {name: (torch.tensor(vals, dtype=torch.float64) * probs[name]).sum() for name, (vals, _) in axes.items()}
    mamba = {"heads_per_group": e["hpg"], "head_dim": e["hd"]}
    layers = [mamba, {"intermediate_size": e["ffn"]}, {"heads_per_kv_group": e["r"]}, mamba]
    got = expected_parameter_count(cfg, e["hidden"], layers, [1, e["keep1"], 1, 1])
    assert got.item() == pytest.approx(exact, rel=1e-12)
    got.backward()
    assert probs["ffn"].grad[0] > probs["ffn"].grad[1]  # more FFN, more parameters
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in probs.values())


@torch.no_grad()
def test_memory_matches_the_decode_cache():
    cfg = tiny_config("M-*M*")
    model = HybridLM(cfg).eval()
    rng = random.Random(2)
    for subnet in (None, random_subnet(cfg, rng)):
        cache = model.new_cache(subnet)
        model(torch.randint(0, 64, (3, 37)), subnet, cache=cache)
        kv = state = 0
        for layer in cache.layers:
            if isinstance(layer, KVState):
                kv += 2 * layer.k[:, :, : layer.length].numel() * 4
            elif isinstance(layer, MambaState):
                state += (layer.conv.numel() + layer.ssm.numel()) * 4
        mem = memory_bytes(cfg, subnet, context=37, batch=3, dtype="float32", state_dtype="float32")
        assert mem["kv_cache"] == kv and mem["mamba_state"] == state
        assert mem["weights"] == 4 * count_parameters(cfg, subnet)
        assert mem["total"] == kv + state + mem["weights"]
