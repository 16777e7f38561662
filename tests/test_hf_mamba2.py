"""Pure Mamba-2 parents: transformers' Mamba2ForCausalLM as the oracle — import, export, generation, and the
elastic invariants (reorder, nested == extracted with the cache, exact counts)."""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import max_rel, random_subnet, randomize_  # noqa: E402

import elasticlm  # noqa: E402
from elasticlm import MambaWidth, Subnet, count_parameters, extract  # noqa: E402
from elasticlm.elastic.importance import estimate  # noqa: E402
from elasticlm.elastic.reorder import reorder_  # noqa: E402
from elasticlm.model.documents import document_ids_from_eos  # noqa: E402
from elasticlm.model.hf import from_transformers, hf_incompatibility, to_transformers  # noqa: E402

CASES = {  # n_groups, heads, head_dim, tied
    "g1": (1, 4, 16, False),
    "g2-tied": (2, 8, 8, True),
    "g4": (4, 8, 16, False),
}


def hf_model(name: str, seed: int = 0):
    groups, heads, head_dim, tied = CASES[name]
    hidden = 32
    config = transformers.Mamba2Config(vocab_size=80, hidden_size=hidden, num_heads=heads, head_dim=head_dim,
                                       expand=heads * head_dim // hidden, n_groups=groups, state_size=8,
                                       num_hidden_layers=3, chunk_size=8, tie_word_embeddings=tied,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = randomize_(transformers.Mamba2ForCausalLM(config), seed)
    if tied:
        model.tie_weights()
    return model.eval()


def ids_for(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 80, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_gives_transformers_logits_and_greedy_tokens(name):
    hf = hf_model(name)
    ours = from_transformers(hf)
    assert ours.config.family == "mamba2" and ours.config.pattern == "MMM"
    ids = ids_for(2, 21)  # not a multiple of the chunk (8)
    with torch.no_grad():
        ref, got = hf(ids, use_cache=False).logits, ours(ids)
    assert ref.abs().max() > 1.0
    assert (got - ref).abs().max().item() <= 1e-4
    prompt = ids[:1, :6]
    want = hf.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    assert torch.equal(elasticlm.generate(ours, prompt, max_new_tokens=10), want)
    assert count_parameters(ours.config) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", sorted(CASES))
def test_directory_round_trip_back_to_mamba2(tmp_path, name):
    hf = hf_model(name, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    model = elasticlm.load(tmp_path / "hf")
    ids = ids_for(2, 13)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert (model(ids) - ref).abs().max().item() <= 1e-4
    elasticlm.save(model, tmp_path / "out", format="hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Mamba2ForCausalLM"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == "Mamba2ForCausalLM"
    with torch.no_grad():
        assert (again(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4
        assert (to_transformers(model)(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_reorder_and_nested_equals_extracted(name):
    model = from_transformers(hf_model(name, seed=4))

    def batches():
        for i in range(2):
            ids = ids_for(2, 24, seed=10 + i)
            ids[:, 11] = 2
            yield ids, document_ids_from_eos(ids, 2)

    ids = ids_for(2, 19)
    with torch.no_grad():
        before = model(ids)
    reorder_(model, estimate(model, batches(), progress=False))
    with torch.no_grad():
        assert max_rel(model(ids), before) <= 1e-5
    rng = random.Random(len(name))
    for _ in range(4):
        subnet = random_subnet(model.config, rng)
        small = extract(model, subnet)
        assert sum(p.numel() for p in small.parameters()) == count_parameters(model.config, subnet)
        with torch.no_grad():
            assert max_rel(model(ids, subnet=subnet), small(ids)) <= 1e-5
            cache_n, cache_a = model.new_cache(subnet), small.new_cache()
            a = [model(ids[:, :5], subnet=subnet, cache=cache_n)] + [
                model(ids[:, t:t + 1], subnet=subnet, cache=cache_n) for t in range(5, 19)]
            b = [small(ids[:, :5], cache=cache_a)] + [small(ids[:, t:t + 1], cache=cache_a) for t in range(5, 19)]
            assert max_rel(torch.cat(a, 1), torch.cat(b, 1)) <= 1e-5


def test_sub_model_export_needs_an_integer_expand(tmp_path):
    model = from_transformers(hf_model("g2-tied", seed=6))  # hidden 32, 8 heads × 8
    fits = Subnet(32, tuple(MambaWidth(2, 8) for _ in range(3)))  # 2 groups × 2 heads × 8 = 32 = 1 × hidden
    small = extract(model, fits)
    elasticlm.save(small, tmp_path / "small", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    ids = ids_for(2, 11)
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - model(ids, subnet=fits)).abs().max().item() <= 1e-4
    odd = Subnet(24, tuple(MambaWidth(2, 8) for _ in range(3)))  # 32 channels over hidden 24
    reason = hf_incompatibility(extract(model, odd).config)
    assert reason is not None and "expand" in reason
