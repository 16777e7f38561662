"""Parity with transformers' NemotronHForCausalLM (the numeric oracle), import and export."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import hf_twin, randomize_, tiny_config  # noqa: E402

import elasticlm  # noqa: E402
from elasticlm.model.hf import from_transformers, to_transformers  # noqa: E402

CASES = [
    # pattern, n_groups, mamba heads, q heads, kv heads
    ("M-*M-M*", 2, 8, 4, 2),     # Nemotron-H style, GQA ratio 2
    ("MMM", 1, 4, 4, 2),         # only Mamba
    ("MMM", 4, 8, 4, 2),         # only Mamba, 4 groups
    ("*-M-*M", 4, 8, 4, 4),      # attention first, GQA ratio 1 (MHA)
    ("M*-", 1, 2, 6, 2),         # GQA ratio 3
    ("-*", 2, 8, 8, 1),          # no Mamba at all, MQA
]


@pytest.mark.parametrize("pattern,groups,heads,q,kv", CASES)
@pytest.mark.parametrize("seq", [5, 21])  # shorter than one chunk, and not a multiple of the chunk (8)
def test_logits_match_transformers_in_memory(pattern, groups, heads, q, kv, seq):
    cfg = tiny_config(pattern, groups=groups, heads=heads, q_heads=q, kv_heads=kv)
    hf = hf_twin(cfg)
    ours = from_transformers(hf)
    ids = torch.randint(0, cfg.vocab_size, (3, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids, use_cache=False).logits, ours(ids)
    assert ref.abs().max() > 1.0  # the random weights make every mixer matter
    assert (got - ref).abs().max().item() <= 1e-4


def test_long_sequence_many_chunks():
    cfg = tiny_config("M*M", groups=2, heads=4)
    hf = hf_twin(cfg, seed=3)
    ours = from_transformers(hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 203))
    with torch.no_grad():
        assert (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_import_from_saved_directory_sharded(tmp_path):
    cfg = tiny_config("M-*M")
    hf = hf_twin(cfg, seed=5)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = elasticlm.load(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        assert (model(ids) - hf(ids, use_cache=False).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_without_remote_code(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("M-*M-", tie_word_embeddings=tied)
    model = randomize_(elasticlm.HybridLM(cfg), seed=7).eval()
    elasticlm.save(model, tmp_path / "out", format="hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - model(ids)).abs().max().item() <= 1e-4
    # and back again
    again = elasticlm.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_in_memory_export_round_trip():
    cfg = tiny_config("*M-M", groups=4, heads=8)
    model = randomize_(elasticlm.HybridLM(cfg), seed=9).eval()
    hf = to_transformers(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - model(ids)).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers():
    cfg = tiny_config("M-*M")
    hf = hf_twin(cfg, seed=11)
    ours = from_transformers(hf)
    prompt = torch.randint(3, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=12)
    got = elasticlm.generate(ours, prompt, max_new_tokens=12)
    assert torch.equal(got, ref)
