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


def test_width_choices_are_multiples_of_the_alignment():
    """elastic.align: hidden, FFN and Mamba head-channel choices are aligned where the axis holds ALIGNED_STEPS
    multiples (the parent's own width always stays a choice); head counts keep their per-group choices."""
    from elasticlm import ConfigError, ModelConfig
    from elasticlm.demo import FULL
    from elasticlm.elastic.space import WIDTH_AXES, ElasticConfig, ElasticSpace, width_multiple

    cfg = ModelConfig(pattern="M-*-", vocab_size=64, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                      attention_head_dim=32, intermediate_size=1000,  # an FFN that is no multiple of 16
                      depth_order=[0, 1, 2, 3],
                      sections={"mamba": {"num_heads": 8, "head_dim": 64, "n_groups": 2, "state_size": 16}})
    for align in (8, 16, 64):
        space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.6], align=align))
        for axis in space.axes:
            fulls = axis.values[0]
            for values in axis.values:
                for v, full in zip(values, fulls, strict=True):
                    multiple = width_multiple(full, align) if axis.name in WIDTH_AXES else 1
                    assert v % multiple == 0 or v == full, (align, axis.name, v)
        ffn = space.axis("ffn").values
        assert ffn[0] == (1000, 1000) and len(ffn) > 3 and all(x % align == 0 for v in ffn[1:] for x in v)
        assert space.axis("attention_heads").values == ((4,), (3,), (2,))  # per KV group, unaligned
        assert space.axis("hidden").values[-1] == (128,)
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0], ffn=[1000, 500]))
    with pytest.raises(ConfigError, match="elastic.align"):
        ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0], align=0))
    # the demo keeps its unaligned, recorded choice sets (FFN 576 · k/32, e.g. 558)
    demo = ModelConfig.from_dict({**FULL.parent["model"], "depth_order": list(range(9))})
    demo_space = ElasticSpace.build(demo, ElasticConfig(**FULL.elastic["elastic"]))
    assert (558,) * 3 in demo_space.axis("ffn").values and FULL.elastic["elastic"]["align"] == 1
