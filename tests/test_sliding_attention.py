"""Sliding-window attention (``W`` layers): against a naive windowed loop and transformers' Qwen3 sliding layers,
decoding with a bounded state (ragged and merged batches: tests/test_ragged.py), packed documents, nested ==
extracted, exact counts and memory, the config section, and the elastic space's shared head axis."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from conftest import random_subnet, randomize_, tiny_config

from elasticlm import ConfigError, ModelConfig, Subnet, count_parameters
from elasticlm.config import subnet_config
from elasticlm.elastic.importance import estimate
from elasticlm.elastic.reorder import reorder_
from elasticlm.elastic.space import ElasticConfig, ElasticSpace, memory_bytes
from elasticlm.generate import generate
from elasticlm.kinds import KINDS, kind_of
from elasticlm.model import documents as documents_module
from elasticlm.model.documents import document_ids_from_eos
from elasticlm.model.hybrid import HybridLM
from elasticlm.model.sliding_attention import SlidingAttention, WindowKVState

ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def sliding_config(pattern: str = "MW-*W-", window: int = 4, **kw) -> ModelConfig:
    return tiny_config(pattern, sections={"sliding_attention": {"window": window}}, **kw)


def model_for(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return randomize_(HybridLM(cfg), seed).eval()


def naive_window_attention(mixer: SlidingAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """The layer by definition, one query and one key at a time (no rotary: the hybrid has no positions)."""
    b, t, _ = x.shape
    hd, kv = mixer.head_dim, mixer.num_kv_heads
    q = (x @ mixer.q_proj.weight.T).view(b, t, -1, hd)
    k = (x @ mixer.k_proj.weight.T).view(b, t, kv, hd)
    v = (x @ mixer.v_proj.weight.T).view(b, t, kv, hd)
    heads = q.shape[2]
    out = torch.zeros(b, t, heads, hd, dtype=torch.float64)
    for r in range(b):
        for h in range(heads):
            g = h // (heads // kv)
            for i in range(t):
                keys = range(max(0, i - window + 1), i + 1)
                scores = [float(q[r, i, h] @ k[r, j, g]) / math.sqrt(hd) for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, keys, strict=True):
                    out[r, i, h] += (w / total) * v[r, j, g].double()
    return out.view(b, t, -1).float() @ mixer.o_proj.weight.T


@torch.no_grad()
def test_layer_equals_a_naive_windowed_loop():
    cfg = sliding_config("W", window=3, hidden=16)
    mixer = model_for(cfg).layers[0].mixer
    assert isinstance(mixer, SlidingAttention)
    x = torch.randn(2, 9, 16)
    got = mixer(x, cfg.layer_widths(0))
    assert torch.allclose(got, naive_window_attention(mixer, x, 3), atol=1e-5)
    full = mixer.compute(x, cfg.layer_widths(0), None)
    # and the window matters here: full attention over the same weights differs
    mixer.window = 100
    assert (mixer(x, cfg.layer_widths(0)) - full).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("window", [1, 3, 8])
def test_decoding_with_a_bounded_state_equals_the_full_forward(window):
    model = model_for(sliding_config(window=window))
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = model(ids)
    for chunks in ([7] + [1] * 16, [3, 5, 1, 9, 2, 3], [23]):  # prefill, then steps / chunks longer than the window
        cache, start, outs = model.new_cache(), 0, []
        for n in chunks:
            outs.append(model(ids[:, start:start + n], cache=cache))
            start += n
            for i, c in enumerate(model.config.pattern):
                if c == "W":
                    state = cache.layers[i]
                    assert isinstance(state, WindowKVState)
                    assert state.length == min(start, window - 1) and state.start == start - state.length
        assert torch.allclose(torch.cat(outs, 1), ref, atol=2e-5), chunks


@torch.no_grad()
@pytest.mark.parametrize("dense", [True, False], ids=["dense-mask", "buckets"])
def test_packed_documents_attend_within_their_own_window(dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(documents_module, "DENSE_MASK_MAX_LEN", 0)
    model = model_for(sliding_config("W-W", window=3))
    docs = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 2, 9)]
    row = torch.cat(docs)[None]
    ids = torch.cat([torch.full((n,), j) for j, n in enumerate(len(d) for d in docs)])[None]
    got = model(row, document_ids=ids)
    want = torch.cat([model(d[None]) for d in docs], 1)
    assert torch.allclose(got, want, atol=2e-5)


@torch.no_grad()
def test_nested_subnet_equals_its_extracted_model_and_counts_are_exact():
    cfg = sliding_config("MW-*W-", window=5, q_heads=6, kv_heads=2)
    model = model_for(cfg)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    rng = random.Random(4)
    seen_w = 0
    for _ in range(6):
        subnet = random_subnet(cfg, rng)
        sub_cfg = subnet_config(cfg, subnet)
        seen_w += sub_cfg.count("W")
        small = HybridLM(sub_cfg).eval()
        small.load_state_dict(model.sliced_state_dict(subnet))
        assert torch.allclose(model(ids, subnet), small(ids), atol=1e-5)
        assert count_parameters(cfg, subnet) == sum(p.numel() for p in small.parameters())
        assert ModelConfig.from_dict(json.loads(json.dumps(sub_cfg.to_dict()))) == sub_cfg
    assert seen_w
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_importance_scores_sliding_heads_and_reordering_keeps_the_function():
    model = model_for(sliding_config("MW-*W-", window=3, q_heads=6, kv_heads=2))

    def batches():
        for i in range(2):
            ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(10 + i))
            ids[:, 7] = 2
            yield ids, document_ids_from_eos(ids, 2)

    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids)
    scores = estimate(model, batches(), progress=False)
    assert set(scores.layers[1]) == {"head"} and scores.layers[1]["head"].shape == (6,)
    reorder_(model, scores)
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=1e-5)
    again = estimate(model, batches(), progress=False).layers[1]["head"].view(2, 3)  # per KV group
    assert (again[:, :-1] >= again[:, 1:] - 1e-6).all()  # the most important heads now come first
    assert not (scores.layers[1]["head"].view(2, 3).diff(dim=1) <= 1e-6).all()  # they did not before


@torch.no_grad()
def test_memory_counts_the_keys_the_state_holds():
    cfg = sliding_config("MW*W-", window=6)
    model = model_for(cfg)
    for subnet in (None, Subnet.uniform(cfg, attention_heads_per_kv_group=1)):
        for context in (4, 37):
            cache = model.new_cache(subnet)
            model(torch.randint(0, 64, (3, context)), subnet, cache=cache)
            kv = sum(2 * s.k[:, :, : s.length].numel() * 4 for s in cache.layers if hasattr(s, "k"))
            mem = memory_bytes(cfg, subnet, context=context, batch=3, dtype="float32", state_dtype="float32")
            assert mem["kv_cache"] == kv


def test_config_section_round_trip_and_errors(tmp_path):
    cfg = sliding_config("W-*-", window=7)
    d = cfg.to_dict()
    assert d["sliding_attention"] == {"window": 7, "num_heads": None} and "sections" not in d
    assert ModelConfig.from_dict(d) == cfg
    assert "sliding_attention" not in tiny_config("M*-").to_dict()  # configs without the kind are as before
    per_layer = ModelConfig.from_dict({**d, "pattern": "W-W-", "sliding_attention": {"window": 2, "num_heads": [4, 2]}})
    assert [per_layer.layer_widths(i).heads_per_kv_group for i in (0, 2)] == [2, 1]
    bad = [({"window": 0}, "window must be a positive int"),
           ({"window": 4, "heads": 2}, "unknown field"),
           ({"window": 4, "num_heads": 3}, "not a multiple of num_key_value_heads"),
           ({"window": 4, "num_heads": [4, 4, 4]}, "entries but the pattern has 1")]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict({**d, "sliding_attention": section})
    with pytest.raises(ConfigError, match="no layer kind of that name has settings"):
        ModelConfig(pattern="W", vocab_size=8, hidden_size=8, sections={"ssm": {}})
    # the run-config TOML: the kind's settings are a [model.sliding_attention] table
    from elasticlm.train.config import load_run_config

    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npattern = "W-"\nvocab_size = 64\nhidden_size = 32\nnum_attention_heads = 4\n'
                    'num_key_value_heads = 2\nattention_head_dim = 8\n[model.sliding_attention]\nwindow = 16\n'
                    '[data]\nsource = "synthetic"\n')
    assert load_run_config(toml).model.section(KINDS["W"]).window == 16


def test_the_elastic_space_cuts_full_and_sliding_heads_on_one_axis():
    cfg = sliding_config("MW-*W-", window=4, q_heads=4, kv_heads=2)
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.7], depth=[1.0], heterogeneous=["attention_heads"]))
    axis = next(a for a in space.axes if a.name == "attention_heads")
    assert axis.layers == (1, 3, 4)
    subnet = space.subnet({"attention_heads": [1, 0, 1]})
    assert [subnet.layers[i].heads_per_kv_group for i in axis.layers] == [1, 2, 1]
    assert kind_of("W").name == "sliding_attention" and type(subnet.layers[1]).__name__ == "SlidingAttentionWidth"
    probs = {a.name: torch.nn.functional.one_hot(torch.tensor([0] * a.n_slots), a.n_choices).double()
             for a in space.axes}
    probs["attention_heads"] = torch.nn.functional.one_hot(torch.tensor([1, 0, 1]), 2).double()
    assert space.expected_cost(probs).item() == pytest.approx(space.cost_of(subnet), rel=1e-12)


def test_exports_refuse_formats_without_sliding_layers():
    from elasticlm.model.gguf import gguf_incompatibility
    from elasticlm.model.hf import hf_incompatibility

    hybrid = sliding_config("MW*-")
    assert "NemotronH has no sliding_attention layers" in hf_incompatibility(hybrid)
    llama = dataclasses.replace(sliding_config("W-*-"), family="llama", rope_parameters=ROPE, mlp_type="swiglu")
    assert "llama has only full-attention layers" in hf_incompatibility(llama)
    qwen3 = dataclasses.replace(llama, family="qwen3", qk_norm=True)
    assert hf_incompatibility(qwen3) is None
    assert "sliding_attention layers are not written to GGUF" in gguf_incompatibility(qwen3)


transformers = pytest.importorskip("transformers")


@torch.no_grad()
def test_transformers_qwen3_sliding_layers_give_the_same_logits_both_ways():
    """Import a transformers Qwen3 whose layers alternate sliding and full attention, and export ours back: the
    logits agree past the window (the window is what the mask changes)."""
    hc = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                                  sliding_window=5, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"],
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                  max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    hf = randomize_(transformers.Qwen3ForCausalLM(hc), 2).eval()
    from elasticlm.model.hf import from_transformers, to_transformers

    ours = from_transformers(hf)
    assert ours.config.pattern == "W-*-W-" and ours.config.section(KINDS["W"]).window == 5
    ids = torch.randint(3, 96, (2, 21), generator=torch.Generator().manual_seed(1))
    ref = hf(ids, use_cache=False).logits
    assert (ours(ids) - ref).abs().max().item() < 1e-4
    back = to_transformers(ours).eval()
    assert back.config.layer_types == hc.layer_types and back.config.sliding_window == 5
    assert (back(ids, use_cache=False).logits - ref).abs().max().item() < 1e-4
    windowless = dataclasses.replace(ours.config, sections={"sliding_attention": {"window": 64}})
    wide = HybridLM(windowless).eval()
    wide.load_state_dict(ours.state_dict())
    assert (wide(ids) - ref).abs().max().item() > 1e-2  # a mask that ignored the window would not match
    # decoding: transformers' own cache and generate against ours
    want = hf.generate(ids[:1, :4], max_new_tokens=14, min_new_tokens=14, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    assert torch.equal(generate(ours, ids[:1, :4], max_new_tokens=14), want)


def test_reading_transformers_window_rules():
    """transformers' rules for which Qwen2/Qwen3 layers slide: explicit layer_types, the older max_window_layers rule
    (sliding from that layer on), and no window at all without use_sliding_window; a Llama with sliding layers is
    refused in one line."""
    from elasticlm.model.hf import config_from_hf

    base = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8}
    legacy = config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 1})
    assert legacy.pattern == "*-W-W-" and legacy.section(KINDS["W"]).window == 8
    typed = config_from_hf({**base, "use_sliding_window": True,
                            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})
    assert typed.pattern == "W-*-W-"
    off = config_from_hf({**base, "layer_types": ["sliding_attention"] * 3})  # transformers drops the window
    assert off.pattern == "*-*-*-"
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_hf({**base, "model_type": "llama", "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ConfigError, match="not supported"):
        config_from_hf({**base, "use_sliding_window": True, "layer_types": ["chunked_attention"] * 3})


def test_cli_sets_a_field_of_a_kinds_section(tmp_path):
    """`init --set SECTION.FIELD=…` and a run config's `--set model.SECTION.FIELD=…` reach the kind's section."""
    from elasticlm.cli import main
    from elasticlm.train.config import apply_overrides

    assert main(["init", str(tmp_path / "m"), "--preset", "tiny", "--set", 'pattern="MW-*"',
                 "--set", "sliding_attention.window=8"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["sliding_attention"]["window"] == 8
    assert main(["init", str(tmp_path / "n"), "--preset", "tiny", "--set", "pattern.x=1"]) == 2
    tables = apply_overrides({"model": {"pattern": "W-"}}, ["model.sliding_attention.window=16"])
    assert tables["model"] == {"pattern": "W-", "sliding_attention": {"window": 16}}
