"""Nested execution: parent-with-Subnet == extracted model; cached decoding == recomputation;
parameter counts are exact; execution slices (same FLOPs as the small model)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import max_rel, random_subnet, randomize_, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from elasticlm import HybridLM, Subnet, count_parameters, extract

CONFIGS = {
    "hybrid-g2-gqa2": dict(pattern="M-*M-M*", groups=2, heads=8, q_heads=4, kv_heads=2),
    "hybrid-g4-mha": dict(pattern="*M-M*-", groups=4, heads=8, q_heads=4, kv_heads=4),
    "mamba-g1": dict(pattern="MMM", groups=1, heads=4),
    "tied-bias": dict(pattern="M-*", groups=2, heads=4, tie_word_embeddings=True, use_bias=True, mlp_bias=True),
}


def model_for(name: str, seed: int = 0) -> HybridLM:
    return randomize_(HybridLM(tiny_config(**CONFIGS[name])), seed).eval()


def decode_all(model: HybridLM, ids: torch.Tensor, subnet: Subnet | None, prefill: int) -> torch.Tensor:
    cache = model.new_cache(subnet)
    out = [model(ids[:, :prefill], subnet=subnet, cache=cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], subnet=subnet, cache=cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nested_equals_extracted_for_random_subnets(name):
    model = model_for(name)
    rng = random.Random(sorted(CONFIGS).index(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        subnet = random_subnet(model.config, rng)
        small = extract(model, subnet)
        assert sum(p.numel() for p in small.parameters()) == model.num_parameters(subnet)
        assert small.num_parameters() == model.num_parameters(subnet)
        with torch.no_grad():
            nested, alone = model(ids, subnet=subnet), small(ids)
        assert max_rel(nested, alone) <= 1e-5, subnet
        # with the decode cache too, on both sides
        with torch.no_grad():
            nested_cached, alone_cached = decode_all(model, ids, subnet, 5), decode_all(small, ids, None, 5)
        assert max_rel(nested_cached, alone_cached) <= 1e-5
        # the recurrent step and the chunked scan round differently: fp32 noise, not a mismatch
        assert (alone_cached - alone).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_recomputation(name):
    model = model_for(name, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (3, 23), generator=torch.Generator().manual_seed(1))
    rng = random.Random(7)
    for subnet in [None] + [random_subnet(model.config, rng) for _ in range(3)]:
        with torch.no_grad():
            full = model(ids, subnet=subnet)
            assert (decode_all(model, ids, subnet, 1) - full).abs().max().item() <= 1e-4
            # prefill in uneven chunks (continued prefill across chunk boundaries)
            cache = model.new_cache(subnet)
            parts = [model(ids[:, a:b], subnet=subnet, cache=cache) for a, b in ((0, 6), (6, 17), (17, 23))]
            assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


def test_full_subnet_is_the_parent():
    """The full Subnet through the sliced path against transformers' NemotronH holding the same weights."""
    pytest.importorskip("transformers")
    from elasticlm.model.hf import to_transformers

    model = model_for("hybrid-g2-gqa2")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ours = model(ids, subnet=Subnet.full(model.config))
        theirs = to_transformers(model)(ids, use_cache=False).logits
    assert max_rel(ours, theirs) < 1e-4


def test_parameter_count_of_parent_is_exact():
    for name in CONFIGS:
        model = model_for(name)
        assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_every_group_keeps_equal_heads_when_extracted():
    model = model_for("hybrid-g2-gqa2")
    subnet = Subnet.uniform(model.config, mamba_heads_per_group=3, attention_heads_per_kv_group=1)
    small = extract(model, subnet)
    assert small.config.mamba.num_heads == 6 and small.config.mamba.n_groups == 2
    mixer, parent = small.layers[0].mixer, model.layers[0].mixer
    # kept heads are the first 3 of each group of 4: parent heads 0,1,2 and 4,5,6
    assert torch.equal(mixer.A_log, parent.A_log[[0, 1, 2, 4, 5, 6]])
    # B and C conv channels are untouched
    bc = 2 * model.config.mamba.n_groups * model.config.mamba.state_size
    assert torch.equal(mixer.conv1d.weight[-bc:], parent.conv1d.weight[-bc:])


def flops(model: HybridLM, ids: torch.Tensor, subnet: Subnet | None = None) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, subnet=subnet)
    return counter.get_total_flops()


def test_subnet_execution_slices_rather_than_masks():
    model = model_for("hybrid-g2-gqa2")
    ids = torch.randint(0, 64, (2, 16))
    subnet = Subnet.uniform(model.config, hidden_size=16, mamba_heads_per_group=2, mamba_head_dim=4,
                            attention_heads_per_kv_group=1, intermediate_size=12, drop_layers=[1])
    small = extract(model, subnet)
    assert flops(model, ids, subnet) == flops(small, ids)
    assert flops(model, ids, subnet) < 0.5 * flops(model, ids)


def test_gradients_reach_only_the_kept_prefix():
    model = model_for("hybrid-g2-gqa2").train()
    subnet = Subnet.uniform(model.config, hidden_size=24, intermediate_size=20)
    model(torch.randint(0, 64, (2, 8)), subnet=subnet).square().mean().backward()
    up = model.layers[1].mixer.up_proj.weight.grad
    assert up[:20, :24].abs().sum() > 0
    assert up[20:].abs().sum() == 0 and up[:, 24:].abs().sum() == 0
    assert model.embeddings.weight.grad[:, 24:].abs().sum() == 0


def test_count_parameters_is_a_pure_function_of_config():
    cfg = tiny_config("M-*M")
    subnet = Subnet.uniform(cfg, hidden_size=16, mamba_heads_per_group=1, drop_layers=[2])
    assert count_parameters(cfg, subnet) == sum(p.numel() for p in extract(HybridLM(cfg), subnet).parameters())


def test_subnet_dict_round_trip(rng):
    cfg = tiny_config()
    for _ in range(5):
        s = random_subnet(cfg, rng)
        assert Subnet.from_dict(s.to_dict()) == s


def test_bf16_forward_runs_and_is_close():
    model = model_for("hybrid-g2-gqa2")
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert max_rel(low.float(), ref) < 0.1
