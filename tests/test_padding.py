"""Per-layer widths padded to one width per kind: the same function, written as a stock Hugging Face model that
transformers loads and generates with, and read back to the real architecture bit for bit."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import max_rel, randomize_, tiny_config

import elasticlm
from elasticlm import ConfigError
from elasticlm.config import Subnet, count_parameters
from elasticlm.elastic.extract import extract
from elasticlm.kinds import MOE_KIND, AttentionWidth, MambaWidth, MlpWidth, MoeWidth
from elasticlm.model import padding
from elasticlm.model.hybrid import HybridLM


def hetero_model(pattern: str = "M*-E*-M-E", seed: int = 0, **kw) -> HybridLM:
    """A random model whose attention, MLP and MoE layers each have their own widths (Mamba layers uniform)."""
    cfg = tiny_config(pattern, q_heads=6, kv_heads=2, moe_num_experts=8, moe_n_group=2, moe_topk_group=2,
                      moe_top_k=2, moe_intermediate_size=24, moe_shared_intermediate_size=16, **kw)
    torch.manual_seed(seed)
    parent = randomize_(HybridLM(cfg), seed).eval()
    with torch.no_grad():
        for block in parent.layers:
            if hasattr(block.mixer, "gate") and hasattr(block.mixer.gate, "e_score_correction_bias"):
                block.mixer.gate.e_score_correction_bias.normal_()
    rng = random.Random(seed)
    layers = []
    for i, kind in enumerate(cfg.pattern):
        full = cfg.layer_widths(i)
        layers.append({"-": lambda: MlpWidth(rng.randint(1, 48)),
                       "*": lambda: AttentionWidth(rng.randint(1, 3)),
                       "E": lambda: MoeWidth(rng.randint(2, 4), rng.randint(1, 24))}.get(kind, lambda f=full: f)())
    # make sure every paddable kind really differs between its layers
    layers[2], layers[7] = MlpWidth(13), MlpWidth(40)
    layers[1], layers[4] = AttentionWidth(1), AttentionWidth(3)
    layers[3], layers[8] = MoeWidth(2, 9), MoeWidth(4, 20)
    return extract(parent, Subnet(cfg.hidden_size, tuple(layers))).eval()


def test_padding_computes_the_same_function_and_slices_back_bit_for_bit():
    small = hetero_model()
    assert set(padding.real_widths(small.config)) == {"num_attention_heads", "intermediate_size", "moe_num_experts",
                                                      "moe_intermediate_size"}
    padded = padding.pad(small)
    assert padded.config.is_homogeneous
    assert padded.config.intermediate_size == 40 and padded.config.num_attention_heads == 6
    assert padded.config.section(MOE_KIND).num_experts == 8 and padded.config.section(MOE_KIND).intermediate_size == 20
    # stored = exact count of the padded architecture; the extra entries are all zero (biases: never routed)
    extra = count_parameters(padded.config) - count_parameters(small.config)
    zeros = sum(int((p == 0).sum()) for p in padded.parameters()) - sum(int((p == 0).sum()) for p in small.parameters())
    assert extra > 0 and zeros == extra
    ids = torch.randint(0, 64, (3, 23))
    with torch.no_grad():
        assert max_rel(padded(ids), small(ids)) < 1e-5
    assert torch.equal(elasticlm.generate(padded, ids[:1, :6], max_new_tokens=12),
                       elasticlm.generate(small, ids[:1, :6], max_new_tokens=12))
    back = padding.unpad(padded, small.config)
    assert back.config == small.config
    ours, theirs = small.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_padded_expert_is_never_routed_to():
    small = hetero_model()
    padded = padding.pad(small)
    layer = next(i for i, k in enumerate(small.config.pattern) if k == "E" and small.config.layer_widths(i)
                 != padded.config.layer_widths(i))
    bias = padded.layers[layer].mixer.gate.e_score_correction_bias
    kept = small.config.layer_widths(layer).experts_per_group
    per = MOE_KIND.experts(padded.config)[0] // padded.config.section(MOE_KIND).n_group
    # real experts first in every routing group, then the padding
    for g in range(padded.config.section(MOE_KIND).n_group):
        assert (bias[g * per + kept:(g + 1) * per] == padding.NEVER_ROUTED).all()
        assert (bias[g * per:g * per + kept] > padding.NEVER_ROUTED).all()


def test_per_layer_mamba_widths_are_refused_in_one_line(tmp_path):
    cfg = tiny_config("M*-M")
    model = HybridLM(cfg)
    layers = list(Subnet.full(cfg).layers)
    layers[3] = MambaWidth(heads_per_group=2, head_dim=8)
    small = extract(model, Subnet(cfg.hidden_size, tuple(layers)))
    reason = padding.incompatibility(small.config)
    assert reason and "Mamba head counts" in reason and "\n" not in reason
    with pytest.raises(ConfigError, match="Mamba head counts"):
        elasticlm.save(small, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    assert padding.padding_note(small.config) == ""


def test_padded_export_loads_in_transformers_and_generates_token_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    small = hetero_model()
    elasticlm.save(small, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config[padding.PADDING_KEY]["intermediate_size"] == small.config.intermediate_size
    assert config["intermediate_size"] == max(small.config.intermediate_size)
    assert config["experts_implementation"] == "eager"  # expert FFN 20: not a multiple of 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        assert (hf(ids).logits - small(ids)).abs().max().item() <= 1e-4
    for row in range(2):
        mine = elasticlm.generate(small, ids[row:row + 1, :8], max_new_tokens=12)
        theirs = hf.generate(ids[row:row + 1, :8], max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert mine.tolist() == theirs.tolist()
    # and back: the real architecture and the real tensors
    back = elasticlm.load(tmp_path / "hf")
    assert back.config == small.config
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), back.state_dict().values(),
                                                 strict=True))


def test_llama_family_per_layer_widths_pad_exactly_in_transformers():
    pytest.importorskip("transformers")
    from elasticlm.model.hf import from_transformers, to_transformers

    cfg = tiny_config("*-*-*-", q_heads=4, kv_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                      mlp_type="swiglu", family="llama")
    torch.manual_seed(3)
    parent = randomize_(HybridLM(cfg), 3).eval()
    layers = (AttentionWidth(1), MlpWidth(20), AttentionWidth(2), MlpWidth(48), AttentionWidth(1), MlpWidth(7))
    small = extract(parent, Subnet(cfg.hidden_size, layers)).eval()
    hf = to_transformers(small)
    assert hf.config.intermediate_size == 48 and hf.config.num_attention_heads == 4
    ids = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        assert (hf(ids).logits - small(ids)).abs().max().item() <= 1e-4
    back = from_transformers(hf)
    assert (back.config.intermediate_size, back.config.num_attention_heads) == ([20, 48, 7], [2, 4, 2])
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), back.state_dict().values(),
                                                 strict=True))


def test_a_padding_record_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    small = hetero_model()
    elasticlm.save(small, tmp_path / "hf", "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[padding.PADDING_KEY]["intermediate_size"] = [999, 1, 1]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    from elasticlm.cli import main

    assert main(["info", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "elasticlm_padding.intermediate_size" in err and len(err.strip().splitlines()) == 1


def test_the_shard_by_shard_reader_refuses_a_padded_export_in_one_line(tmp_path):
    from elasticlm.checkpoint import CheckpointError
    from elasticlm.train.sharded import fill_shards

    small = hetero_model()
    elasticlm.save(small, tmp_path / "hf", "hf")
    target = HybridLM(small.config)
    with pytest.raises(CheckpointError, match="convert --to native") as err:
        fill_shards(target, tmp_path / "hf")
    assert "\n" not in str(err.value)
    elasticlm.save(elasticlm.load(tmp_path / "hf"), tmp_path / "native", "native")  # what the message says to do
    fill_shards(target, tmp_path / "native")
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), target.state_dict().values(),
                                                 strict=True))
