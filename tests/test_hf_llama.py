"""Transformer parents: Llama, Qwen2 and Qwen3 against transformers' own classes (the numeric oracle) —
import, export, generation, rotary positions, and the elastic invariants (reorder, nested == extracted, counts)."""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import max_rel, random_subnet, randomize_  # noqa: E402

import elasticlm  # noqa: E402
from elasticlm import Subnet, count_parameters, extract  # noqa: E402
from elasticlm.checkpoint import CheckpointError  # noqa: E402
from elasticlm.config import AttentionWidth, MlpWidth  # noqa: E402
from elasticlm.elastic.importance import estimate  # noqa: E402
from elasticlm.elastic.reorder import reorder_  # noqa: E402
from elasticlm.model.documents import document_ids_from_eos  # noqa: E402
from elasticlm.model.hf import from_transformers, hf_incompatibility, to_transformers  # noqa: E402
from elasticlm.model.rope import inverse_frequencies  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    # family, query heads, kv heads, head_dim (None: hidden / heads), tied, biases, rope
    "llama-gqa3": ("llama", 6, 2, None, False, False, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama-mha5-tied-bias-llama3": ("llama", 5, 5, 8, True, True, LLAMA3),
    "llama-mqa-linear": ("llama", 10, 1, None, False, False, {"rope_type": "linear", "rope_theta": 1000.0,
                                                            "factor": 2.0}),
    "qwen2-gqa2-tied": ("qwen2", 6, 3, None, True, True, {"rope_type": "default", "rope_theta": 1e6}),
    "qwen3-gqa3-headdim16": ("qwen3", 3, 1, 16, False, False, {"rope_type": "default", "rope_theta": 1e6}),
}


def hf_model(name: str, seed: int = 0, layers: int = 2):
    family, heads, kv, head_dim, tied, bias, rope = CASES[name]
    kw = dict(vocab_size=96, hidden_size=60, intermediate_size=56, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, tie_word_embeddings=tied, rope_parameters=dict(rope), rms_norm_eps=1e-6,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if head_dim:
        kw["head_dim"] = head_dim
    if family == "llama":
        kw.update(attention_bias=bias, mlp_bias=bias)
    if family == "qwen3":
        kw["attention_bias"] = bias
    config = transformers.AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    if tied:  # randomize_ gave the tied head its own values in some versions: tie again
        model.tie_weights()
    return model.eval()


def ids_for(vocab: int, b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_gives_transformers_logits_and_greedy_tokens(name):
    hf = hf_model(name)
    ours = from_transformers(hf)
    assert ours.config.family == CASES[name][0]
    # 40 tokens: past llama3's original context (16), so its frequency scaling matters
    ids = ids_for(96, 2, 40)
    with torch.no_grad():
        ref, got = hf(ids, use_cache=False).logits, ours(ids)
    assert ref.abs().max() > 1.0
    assert (got - ref).abs().max().item() <= 1e-4
    prompt = ids[:1, :7]
    want = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    assert torch.equal(elasticlm.generate(ours, prompt, max_new_tokens=12), want)


@pytest.mark.parametrize("name", ["llama-mha5-tied-bias-llama3", "qwen2-gqa2-tied", "qwen3-gqa3-headdim16"])
def test_directory_import_and_export_back_to_the_same_class(tmp_path, name):
    from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer

    hf = hf_model(name, seed=3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded + index
    save_tokenizer(byte_level_tokenizer(), tmp_path / "hf")
    deployed = elasticlm.Deployment.load(tmp_path / "hf")
    model = deployed.model
    ids = ids_for(96, 2, 23)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert (model(ids) - ref).abs().max().item() <= 1e-4
    deployed.save(tmp_path / "out", format="hf")  # with the tokenizer it was loaded with
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        assert (again(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert (to_transformers(model)(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_reorder_leaves_logits_unchanged(name):
    model = from_transformers(hf_model(name, seed=5))
    eos = model.config.eos_token_id

    def batches():
        for i in range(2):
            ids = ids_for(96, 2, 24, seed=10 + i)
            ids[:, 11] = eos
            yield ids, document_ids_from_eos(ids, eos)

    ids = ids_for(96, 2, 19)
    with torch.no_grad():
        before = model(ids)
    reorder_(model, estimate(model, batches(), progress=False))
    with torch.no_grad():
        after = model(ids)
    assert max_rel(after, before) <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_nested_equals_extracted_with_exact_counts(name):
    model = from_transformers(hf_model(name, seed=7))
    rng = random.Random(sorted(CASES).index(name))
    ids = ids_for(96, 2, 21)
    for _ in range(4):
        subnet = random_subnet(model.config, rng)
        small = extract(model, subnet)
        assert sum(p.numel() for p in small.parameters()) == count_parameters(model.config, subnet)
        with torch.no_grad():
            nested, alone = model(ids, subnet=subnet), small(ids)
            assert max_rel(nested, alone) <= 1e-5
            cache_n, cache_a = model.new_cache(subnet), small.new_cache()
            steps_n = [model(ids[:, :6], subnet=subnet, cache=cache_n)]
            steps_a = [small(ids[:, :6], cache=cache_a)]
            for t in range(6, ids.shape[1]):
                steps_n.append(model(ids[:, t:t + 1], subnet=subnet, cache=cache_n))
                steps_a.append(small(ids[:, t:t + 1], cache=cache_a))
            cached_n, cached_a = torch.cat(steps_n, 1), torch.cat(steps_a, 1)
            assert max_rel(cached_n, cached_a) <= 1e-5
            assert (cached_a - alone).abs().max().item() <= 1e-4  # the cache continues positions correctly


def test_parameter_count_equals_transformers():
    for name in CASES:
        hf = hf_model(name)
        n_hf = sum(p.numel() for p in hf.parameters())  # tied weights are counted once
        assert count_parameters(from_transformers(hf).config) == n_hf, name


def test_homogeneous_sub_model_exports_to_the_family_class(tmp_path):
    model = from_transformers(hf_model("qwen2-gqa2-tied", seed=9))
    subnet = Subnet(32, tuple(AttentionWidth(1) if i % 2 == 0 else MlpWidth(24) for i in range(4)))
    small = extract(model, subnet)
    elasticlm.save(small, tmp_path / "small", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.config.num_attention_heads == 3
    ids = ids_for(96, 2, 15)
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - model(ids, subnet=subnet)).abs().max().item() <= 1e-4
    # half a decoder layer dropped: not a Qwen2 model, and the reason says so
    half = Subnet(60, (AttentionWidth(2), None, AttentionWidth(2), MlpWidth(56)))
    reason = hf_incompatibility(extract(model, half).config)
    assert reason is not None and "attention + MLP pairs" in reason


@pytest.mark.parametrize("attention_path", ["dense", "buckets"])
def test_positions_restart_at_every_packed_document(monkeypatch, attention_path):
    from elasticlm.model import documents

    if attention_path == "buckets":
        monkeypatch.setattr(documents, "DENSE_MASK_MAX_LEN", 0)
    model = from_transformers(hf_model("llama-gqa3", seed=11))
    ids = ids_for(96, 2, 30)
    ids[0, 9], ids[0, 20], ids[1, 14] = 2, 2, 2
    doc = document_ids_from_eos(ids, 2)
    with torch.no_grad():
        packed = model(ids, document_ids=doc)
        for r in range(2):
            for d in doc[r].unique():
                cols = (doc[r] == d).nonzero().flatten()
                alone = model(ids[r:r + 1, cols])
                assert (packed[r, cols] - alone[0]).abs().max().item() <= 1e-4


def test_ragged_batch_positions_count_from_each_rows_first_token():
    from elasticlm.generate import generate_ragged

    model = from_transformers(hf_model("qwen3-gqa3-headdim16", seed=13))
    prompts = [[5, 9, 3], list(range(4, 15)), [7]]
    got = generate_ragged(model, prompts, max_new_tokens=8)
    want = [elasticlm.generate(model, torch.tensor([p]), max_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    assert got == want


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0}, LLAMA3,
                                  {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}])
def test_inverse_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(rope))
    kind = rope["rope_type"]
    if kind == "default":
        want = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    else:
        want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    assert torch.allclose(inverse_frequencies(rope, 16), want, rtol=1e-6, atol=0)


def test_unsupported_variants_are_refused_with_one_line(tmp_path):
    hf = hf_model("llama-gqa3")
    hf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, message in ((dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
                             "rope_type 'yarn' is not supported"),
                            (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=message):
            elasticlm.load(tmp_path / "m")


def test_position_ids_restart_per_document_and_skip_left_padding():
    """Rotary attention is shift-invariant, so the two tests above cannot see an offset in the positions; the
    position ids themselves are checked here, against a loop (what transformers' position_ids would be)."""
    from elasticlm.model.documents import DocumentMask

    model = from_transformers(hf_model("llama-gqa3"))
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    want = []
    for row in doc.tolist():
        pos, out = 0, []
        for j, d in enumerate(row):
            pos = 0 if j and d != row[j - 1] else (pos + 1 if j else 0)
            out.append(pos)
        want.append(out)
    got = model.positions(doc, None, DocumentMask.from_ids(doc, model.config.mamba.conv_kernel))
    assert got.tolist() == want
    cache = model.new_cache()
    cache.pad, cache.seq_len = torch.tensor([0, 3]), 5
    assert model.positions(torch.zeros(2, 2, dtype=torch.long), cache, None).tolist() == [[5, 6], [2, 3]]


def test_a_transformer_drops_whole_decoder_layers():
    """Depth choices, the drop order and the prune grid of a Llama parent remove attention + MLP pairs, so every
    sub-model with homogeneous widths is still a LlamaForCausalLM."""
    from elasticlm.elastic.prune import candidates
    from elasticlm.elastic.space import ElasticConfig, ElasticSpace
    from elasticlm.errors import ConfigError

    model = from_transformers(hf_model("llama-gqa3", layers=4))
    config = model.config
    config.depth_order = [5, 0, 6, 2, 7, 1, 3, 4]  # block 5 least important, ...
    order = config.drop_order()
    assert sorted(order) == list(range(8))
    assert all(order[k] % 2 == 0 and order[k + 1] == order[k] + 1 for k in range(0, 8, 2))
    # mean ranks: layer 0 (blocks 0, 1) 1 + 5 = 6, layer 1: 3 + 6 = 9, layer 2: 7 + 0 = 7, layer 3: 2 + 4 = 6
    assert order == [0, 1, 6, 7, 4, 5, 2, 3]
    space = ElasticSpace.build(config, ElasticConfig(budgets=[1.0, 0.5], depth=[1.0, 0.75, 0.5, 0.3]))
    assert all(v[0] % 2 == 0 for v in space.axis("depth").values)
    with pytest.raises(ConfigError, match="whole decoder layers"):
        ElasticSpace.build(config, ElasticConfig(budgets=[1.0, 0.5], depth=[8, 7]))
    found = candidates(config, count_parameters(config) // 2)
    assert found and any(c.subnet.layers.count(None) for c in found)
    for c in found:
        dropped = [i for i, w in enumerate(c.subnet.layers) if w is None]
        assert all(i % 2 == 0 and i + 1 in dropped for i in dropped[::2]), dropped
        reason = hf_incompatibility(extract(model, c.subnet).config)  # LlamaConfig may still refuse the hidden size
        assert reason is None or "pairs" not in reason and "hidden_size" in reason, reason
