"""Mixture-of-experts layers (Nemotron-H ``E``): transformers' NemotronHForCausalLM as the oracle, and the
elastic invariants — nested == extracted, exact total and active parameter counts, reorder, kept indices."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_twin, max_rel, random_subnet, randomize_, tiny_config

import elasticlm
from elasticlm import MoeWidth, Subnet, count_parameters, extract
from elasticlm.config import count_active_parameters
from elasticlm.elastic.importance import estimate
from elasticlm.elastic.reorder import reorder_
from elasticlm.elastic.space import ElasticConfig, ElasticSpace
from elasticlm.kinds import MOE_KIND, kept_indices
from elasticlm.model.call import MixerCall
from elasticlm.model.documents import document_ids_from_eos

CASES = {
    # pattern, routed experts, top_k, routing groups, groups kept, normalised weights, scaling
    "hybrid-4x2": dict(pattern="ME*E", moe_num_experts=4, moe_top_k=2),
    "grouped-8-g2": dict(pattern="M*E-E", moe_num_experts=8, moe_top_k=2, moe_n_group=2, moe_topk_group=1),
    "6-unnormalised-tied": dict(pattern="E*E", moe_num_experts=6, moe_top_k=2, moe_norm_topk_prob=False,
                                moe_routed_scaling_factor=2.5, tie_word_embeddings=True),
}


def config_for(name: str):
    return tiny_config(**{"moe_intermediate_size": 20, "moe_shared_intermediate_size": 12, **CASES[name]})


@torch.no_grad()
def random_bias_(model: torch.nn.Module, seed: int) -> None:
    """The routers' score correction biases are buffers (randomize_ leaves them at 0): make them matter."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.3 * torch.randn(buf.shape, generator=g))


def check_transformers_parity(hf, ours, ids: torch.Tensor, tmp_path, cls: str) -> None:
    """Logits and greedy tokens equal transformers', parameter counts too; export reloads as ``cls``, same logits."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert ref.abs().max() > 1.0
        assert (ours(ids) - ref).abs().max().item() <= 1e-4
    prompt = ids[:1, :5]
    # The reference recomputes the whole sequence per token, with no cache: transformers >= 5.25 cannot generate
    # with a cache when layer 0 holds none (``E*E``), but our export of the same model can (the cache anchor).
    want = greedy_without_cache(hf, prompt, 10)
    assert torch.equal(elasticlm.generate(ours, prompt, max_new_tokens=10), want)
    assert count_parameters(ours.config) == sum(p.numel() for p in hf.parameters())
    elasticlm.save(ours, tmp_path / "out", format="hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == cls
    with torch.no_grad():
        assert (again(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4
    assert torch.equal(again.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                      eos_token_id=None, pad_token_id=0), want)


@torch.no_grad()
def greedy_without_cache(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by full recomputation: every step runs the whole sequence without a cache."""
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, hf(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def check_nested(model: elasticlm.HybridLM, ids: torch.Tensor, rng: random.Random, subnets: int) -> None:
    """For random Subnets: nested == extracted (with the cache too), the total count and the active count equal
    counts taken from the extracted tensors (everything but ``experts - top_k`` routed experts per MoE layer)."""
    cfg, t = model.config, ids.shape[1]
    for _ in range(subnets):
        subnet = random_subnet(cfg, rng)
        small = extract(model, subnet)
        total = sum(p.numel() for p in small.parameters())
        assert count_parameters(cfg, subnet) == total
        direct = total
        for mixer in (b.mixer for b in small.layers if b.kind == "E"):
            per_expert = sum(p[0].numel() for p in mixer.experts.parameters())
            direct -= (mixer.experts.down_proj.shape[0] - cfg.section(MOE_KIND).top_k) * per_expert
        assert count_active_parameters(cfg, subnet) == direct
        with torch.no_grad():
            assert max_rel(model(ids, subnet=subnet), small(ids)) <= 1e-5
            cache_n, cache_a = model.new_cache(subnet), small.new_cache()
            a = [model(ids[:, :4], subnet=subnet, cache=cache_n)] + [
                model(ids[:, j:j + 1], subnet=subnet, cache=cache_n) for j in range(4, t)]
            b = [small(ids[:, :4], cache=cache_a)] + [small(ids[:, j:j + 1], cache=cache_a) for j in range(4, t)]
            assert max_rel(torch.cat(a, 1), torch.cat(b, 1)) <= 1e-5


def model_for(name: str, seed: int = 0) -> elasticlm.HybridLM:
    model = randomize_(elasticlm.HybridLM(config_for(name)), seed).eval()
    random_bias_(model, seed)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers_nemotron_h_moe(tmp_path, name):
    pytest.importorskip("transformers")
    from elasticlm.model.hf import from_transformers

    cfg = config_for(name)
    hf = hf_twin(cfg, seed=3)
    random_bias_(hf, 3)
    ours = from_transformers(hf)
    assert ours.config.pattern == cfg.pattern and MOE_KIND.experts(ours.config) == MOE_KIND.experts(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    check_transformers_parity(hf, ours, ids, tmp_path, "NemotronHForCausalLM")


@pytest.mark.parametrize("name", sorted(CASES))
def test_nested_equals_extracted_and_counts_are_exact(name):
    model = model_for(name, seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(2))
    check_nested(model, ids, random.Random(sorted(CASES).index(name)), 5)


def test_a_soft_mask_of_one_hot_choices_is_the_sliced_moe():
    """The router's masks zero an expert's activations and take it out of the routing: exact for 0/1 masks."""
    model = model_for("grouped-8-g2", seed=7)
    cfg = model.config
    layer = cfg.pattern.index("E")
    mixer = model.layers[layer].mixer
    full = cfg.layer_widths(layer)
    width = MoeWidth(2, 9)
    mask = MOE_KIND.inner(cfg, full, width).mask(
        (torch.arange(full.experts_per_group) < width.experts_per_group).float(),
        (torch.arange(full.expert_intermediate_size) < width.expert_intermediate_size).float())
    x = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked, sliced = mixer(x, full, MixerCall(inner=mask)), mixer(x, width)
    assert (masked - sliced).abs().max().item() <= 1e-6


def calibration(vocab: int, seed: int):
    """Two batches of two rows with two documents each (end-of-sequence id 2), for importance estimation."""
    for i in range(2):
        ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(seed + i))
        ids[:, 12] = 2
        yield ids, document_ids_from_eos(ids, 2)


def test_reorder_leaves_logits_unchanged_and_ranks_experts():
    model = model_for("hybrid-4x2", seed=9)

    ids = torch.randint(3, 64, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)
    importance = estimate(model, calibration(64, 20), progress=False)
    layer = model.config.pattern.index("E")
    assert set(importance.layers[layer]) == {"expert", "expert_neuron"}
    reorder_(model, importance)
    with torch.no_grad():
        assert max_rel(model(ids), before) <= 1e-5
    # after the reorder the experts' scores are descending: the prefix a sub-model keeps is the most important
    again = estimate(model, calibration(64, 20), progress=False).layers[layer]["expert"]
    assert torch.all(again[:-1] >= again[1:] - 1e-6), again


def test_kept_indices_of_every_moe_parameter_against_loops():
    cfg = config_for("grouped-8-g2")  # 2 routing groups × 4 experts, expert FFN 20, shared 12, hidden 32
    full = cfg.layer_widths(cfg.pattern.index("E"))
    layout = MOE_KIND.layout(cfg, full, MoeWidth(3, 7), 24)
    experts = [g * 4 + e for g in range(2) for e in range(3)]
    want = {
        "gate.weight": [experts, list(range(24))],
        "gate.e_score_correction_bias": [experts],
        "experts.up_proj": [experts, list(range(7)), list(range(24))],
        "experts.down_proj": [experts, list(range(24)), list(range(7))],
        "shared_experts.up_proj.weight": [list(range(12)), list(range(24))],
        "shared_experts.down_proj.weight": [list(range(24)), list(range(12))],
    }
    assert kept_indices(layout) == want
    # the counts skip the bias buffer: 6 gate rows × 24 + 2 × 6 × 7 × 24 + 2 × 12 × 24 + the block's norm 24
    assert MOE_KIND.parameters(cfg, full, MoeWidth(3, 7), 24) == 6 * 24 + 2 * 6 * 7 * 24 + 2 * 12 * 24 + 24


def test_active_parameter_budgets_and_bad_widths():
    cfg = config_for("hybrid-4x2")
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.6], target="active", depth=[1.0]))
    assert min(v[0] for v in space.axis("moe_experts").values) == 2  # never fewer than top_k experts
    parent_active = count_active_parameters(cfg)
    assert parent_active < count_parameters(cfg) and space.targets == (parent_active, round(0.6 * parent_active))
    full = Subnet.full(cfg)
    assert space.cost_of(full) == parent_active
    with pytest.raises(elasticlm.ConfigError, match=r"experts_per_group=1 must be in \[2, 4\]"):
        Subnet.uniform(cfg, moe_experts_per_group=1).validate(cfg)  # top_k 2 needs two experts
    with pytest.raises(elasticlm.ConfigError, match="num_experts=6"):
        tiny_config(pattern="E", moe_num_experts=6, moe_n_group=4)


def moe_parent_config():
    cfg = config_for("grouped-8-g2")  # M*E-E
    cfg.depth_order = [3, 1, 4, 0, 2]
    return cfg


@pytest.mark.parametrize("target", ["params", "active"])
def test_expected_cost_is_exact_for_one_hot_choices_on_an_moe_parent(target):
    from test_elastic import one_hot_probs, random_choices

    cfg = moe_parent_config()
    space = ElasticSpace.build(cfg, ElasticConfig(target=target, heterogeneous=["moe_experts", "moe_ffn"]))
    assert {"moe_experts", "moe_ffn"} <= {a.name for a in space.axes}
    model = elasticlm.HybridLM(cfg)
    rng = random.Random(3)
    for _ in range(10):
        choices = random_choices(space, rng)
        subnet = space.subnet(choices)
        small = extract(model, subnet)
        n = sum(p.numel() for p in small.parameters())
        exact = n if target == "params" else count_active_parameters(cfg, subnet)
        assert space.cost_of(subnet) == exact
        assert float(space.expected_cost(one_hot_probs(space, choices))) == pytest.approx(exact, rel=1e-12)


def test_router_masks_with_one_hot_choices_equal_slicing_on_an_moe_parent():
    from test_elastic import one_hot_probs

    from elasticlm.elastic.router import Router

    cfg = moe_parent_config()
    model = model_for("grouped-8-g2", seed=11)
    model.config.depth_order = cfg.depth_order
    ec = ElasticConfig(hidden=[1.0, 0.75], moe_experts=[1.0, 0.75, 0.5], moe_ffn=[1.0, 0.5, 0.25],
                       depth=[1.0, 0.8], heterogeneous=["moe_experts", "moe_ffn"], router_mode="st", budgets=[1.0])
    space = ElasticSpace.build(model.config, ec)
    router = Router(space, mode="st")
    rng = random.Random(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    for _ in range(6):
        choices = {a.name: [rng.randrange(a.n_choices) for _ in range(a.n_slots)] for a in space.axes}
        soft = {k: v.float() for k, v in one_hot_probs(space, choices).items()}
        with torch.no_grad():
            masked = model(ids, modulation=router._staircase(soft))
            sliced = model(ids, space.subnet(choices))
        assert max_rel(masked, sliced) < 1e-5, choices


@pytest.mark.parametrize("mode", ["hard", "st"])
def test_elastic_training_of_an_moe_parent_on_active_parameters(tmp_path, mode):
    from test_elastic import tables

    from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer
    from elasticlm.train.config import elastic_run_config_from_tables
    from elasticlm.train.elastic import train_elastic

    cfg = tiny_config(pattern="M*E-E", vocab_size=260, hidden=48, moe_num_experts=8, moe_intermediate_size=20,
                      moe_shared_intermediate_size=12)
    cfg.depth_order = [3, 1, 4, 0, 2]
    parent = randomize_(elasticlm.HybridLM(cfg), seed=3)
    save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    elasticlm.save(parent, tmp_path / "parent", tokenizer_dir=tmp_path / "tok")
    tabs = tables(tmp_path / "parent", tmp_path / "run")
    tabs["elastic"].update(target="active", router_mode=mode, heterogeneous=["moe_experts"], router_init_steps=300)
    train_elastic(elastic_run_config_from_tables(tabs), progress=False)
    deployed = elasticlm.Deployment.load(tmp_path / "run" / "final")
    elastic = deployed.model
    assert set(deployed.budgets) == {"1.0", "0.6"}
    small = deployed.budgets["0.6"]
    active = count_active_parameters(cfg, small)
    assert abs(active / (0.6 * count_active_parameters(cfg)) - 1) <= 0.05
    ids = torch.randint(3, 260, (1, 9))
    with torch.no_grad():
        assert max_rel(elastic(ids, subnet=small), extract(elastic, small)(ids)) <= 1e-5


QWEN_CASES = {  # experts, top_k, normalised, dense layers (mlp_only_layers), tied
    "qwen3moe-4x2": (4, 2, True, [], False),
    "qwen3moe-6x2-unnormalised-dense0-tied": (6, 2, False, [0], True),
}


def qwen3_moe(name: str, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    experts, top_k, norm, dense, tied = QWEN_CASES[name]
    config = transformers.Qwen3MoeConfig(
        vocab_size=80, hidden_size=48, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=norm, mlp_only_layers=dense, decoder_sparse_step=1, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = randomize_(transformers.Qwen3MoeForCausalLM(config), seed)
    if tied:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("name", sorted(QWEN_CASES))
def test_qwen3_moe_matches_transformers_and_nests(tmp_path, name):
    from elasticlm.model.hf import from_transformers

    hf = qwen3_moe(name, seed=2)
    ours = from_transformers(hf)
    _, _, _, dense, _ = QWEN_CASES[name]
    assert ours.config.family == "qwen3_moe"
    assert ours.config.pattern == "".join("*" + ("-" if i in dense else "E") for i in range(3))
    ids = torch.randint(3, 80, (2, 14), generator=torch.Generator().manual_seed(1))
    check_transformers_parity(hf, ours, ids, tmp_path, "Qwen3MoeForCausalLM")
    check_nested(ours, ids, random.Random(len(name)), 4)


def test_qwen3_moe_reorder_leaves_logits_unchanged():
    from elasticlm.model.hf import from_transformers

    model = from_transformers(qwen3_moe("qwen3moe-4x2", seed=4))

    ids = torch.randint(3, 80, (2, 15), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids)
    reorder_(model, estimate(model, calibration(80, 30), progress=False))
    with torch.no_grad():
        assert max_rel(model(ids), before) <= 1e-5


@pytest.mark.parametrize("drop,first", [((), "M"), ((0,), "-"), ((0, 1), "E")])
def test_exported_budget_generates_in_transformers_whatever_its_first_layer(tmp_path, drop, first):
    """A budget whose first kept layer is an MLP or MoE layer holds no cache there; transformers >= 5.25 asks layer 0
    of its cache for the length, so the export starts with a no-op attention layer. Cached generation in
    transformers equals elasticlm's, token for token, and re-importing drops the extra layer again."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(pattern="M-E*M-", moe_num_experts=4, moe_top_k=2, moe_intermediate_size=20,
                      moe_shared_intermediate_size=12)
    model = randomize_(elasticlm.HybridLM(cfg), 11).eval()
    random_bias_(model, 11)
    budget = extract(model, Subnet.uniform(cfg, hidden_size=cfg.hidden_size - 8, drop_layers=drop)).eval()
    assert budget.config.pattern[0] == first
    elasticlm.save(budget, tmp_path / "hf", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    want = elasticlm.generate(budget, prompt, max_new_tokens=12)
    got = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    assert torch.equal(got, want)
    assert torch.equal(greedy_without_cache(hf, prompt, 12), want)
    back = elasticlm.load(tmp_path / "hf")
    assert back.config.pattern == budget.config.pattern
    assert count_parameters(back.config) == count_parameters(budget.config)
    with torch.no_grad():
        assert max_rel(back(prompt), budget(prompt)) <= 1e-6
