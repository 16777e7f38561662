"""Importance scores, the nested reordering and zero-shot pruning (DESIGN 2.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel, randomize_, tiny_config

import elasticlm
from elasticlm import ConfigError, HybridLM, Subnet, count_parameters, extract
from elasticlm.cli import main
from elasticlm.config import parse_budget
from elasticlm.elastic.importance import Importance, _Recorder, estimate, layer_mse, width_importance
from elasticlm.elastic.prune import candidates, search
from elasticlm.elastic.reorder import descending, grouped_order, reorder_
from elasticlm.kinds import MAMBA_KIND
from elasticlm.model.documents import document_ids_from_eos
from elasticlm.model.norm import rms_norm

EOS = 2


def batches(n: int = 2, b: int = 3, t: int = 24, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (b, t), generator=g)
        ids[:, t // 2] = EOS  # two documents per row
        out.append((ids, document_ids_from_eos(ids, EOS)))
    return out


def scores(model: HybridLM, metrics=("iterative_mse", "oneshot_mse", "cosine")) -> Importance:
    return estimate(model, iter(batches()), metrics=metrics, progress=False)


@pytest.mark.parametrize("groups,q_heads,kv_heads", [(1, 4, 1), (2, 8, 2), (4, 8, 4), (2, 6, 2)])
def test_reorder_leaves_the_parent_unchanged(groups, q_heads, kv_heads):
    model = randomize_(HybridLM(tiny_config("M-*M-M*", groups=groups, q_heads=q_heads, kv_heads=kv_heads))).eval()
    ids = torch.randint(0, 64, (2, 21))
    imp = scores(model)
    with torch.no_grad():
        before = model(ids)
        conv_bc = [b.mixer.conv1d.weight[-2 * groups * 16:].clone() for b in model.layers if b.kind == "M"]
        reorder_(model, imp)
        after = model(ids)
    assert max_rel(after, before) <= 1e-5
    assert model.config.depth_order == imp.depth["iterative_mse"]
    # B and C (and their conv channels) are never permuted
    for w, b in zip(conv_bc, [b for b in model.layers if b.kind == "M"], strict=True):
        assert torch.equal(b.mixer.conv1d.weight[-2 * groups * 16:], w)
    # after reordering, the scores of a fresh pass are sorted within every group
    again = scores(model, metrics=())
    assert torch.equal(descending(again.hidden), torch.arange(32))
    for i, layer in enumerate(again.layers):
        for name, s in layer.items():
            g = groups if (name == "head" and model.config.pattern[i] == "M") else \
                kv_heads if name == "head" else 1
            assert torch.equal(grouped_order(s, g), torch.arange(s.numel())), (i, name)


def test_reorder_makes_a_sub_model_keep_the_most_important_units():
    """Reordered-then-sliced == slicing the original at the top-scored indices, by hand (MLP)."""
    model = randomize_(HybridLM(tiny_config("-"))).eval()
    imp = scores(model, metrics=())
    keep = descending(imp.layers[0]["neuron"])[:20]
    x = torch.randn(2, 5, 32)
    mlp = model.layers[0].mixer
    expected = F.linear(F.relu(F.linear(x, mlp.up_proj.weight[keep])).square(), mlp.down_proj.weight[:, keep])
    reorder_(model, imp)
    hidden = descending(imp.hidden)
    got = mlp.forward(x[..., hidden], elasticlm.MlpWidth(20))
    assert max_rel(got, expected[..., hidden]) < 1e-5


def test_planted_zeros_rank_last():
    cfg = tiny_config("M-*M-", groups=2, heads=8)
    model = randomize_(HybridLM(cfg)).eval()
    with torch.no_grad():
        model.layers[1].mixer.up_proj.weight[7].zero_()  # FFN neuron 7 of layer 1
        mamba = model.layers[0].mixer
        hd, d_inner = mamba.head_dim, mamba.num_heads * mamba.head_dim
        mamba.in_proj.weight[d_inner + 5 * hd: d_inner + 6 * hd].zero_()  # x rows of Mamba head 5 (group 1)
        mamba.in_proj.weight[d_inner + 3: 2 * d_inner: hd].zero_()  # channel 3 of every head
        for norm in [b.norm for b in model.layers] + [model.norm_f]:
            norm.weight[11] = 0  # hidden channel 11 reads zero after every norm
    imp = scores(model)
    assert descending(imp.layers[1]["neuron"])[-1] == 7
    head_order = grouped_order(imp.layers[0]["head"], 2)
    assert head_order[-1] == 5  # last within its group (heads 4..7)
    assert descending(imp.layers[0]["channel"])[-1] == 3
    assert descending(imp.hidden)[-1] == 11


def test_planted_attention_head_ranks_last_within_its_kv_group():
    """V is shared by a KV group's query heads, so an o_proj input cannot be zeroed through the
    weights; plant it in the observed activation instead (the reduction and ranking are under test)."""
    cfg = tiny_config("*", q_heads=8, kv_heads=2)
    rec = _Recorder(cfg)
    act = torch.rand(3, 10, 8, 8) + 0.1
    act[:, :, 2] = 0  # head 2 (KV group 0)
    act[:, :, 6] *= 0.01  # head 6 (KV group 1)
    rec.observe(0, "o_in", act.flatten(2))
    head = rec.agg(0, "o_in").view(8, 8).norm(dim=1)
    order = grouped_order(head, 2)
    assert order[3] == 2 and order[7] == 6


@torch.no_grad()
def test_attention_head_scores_match_a_naive_reference():
    """Head score = L2 over samples of mean_t |o_proj input|, then L2 over the head's channels."""
    cfg = tiny_config("*", q_heads=4, kv_heads=2)
    model = randomize_(HybridLM(cfg)).eval()
    ids = torch.randint(3, 64, (3, 9))
    _, layers, _ = width_importance(model, [(ids, torch.zeros_like(ids))], progress=False)
    attn, dh = model.layers[0].mixer, cfg.attention_head_dim
    x = rms_norm(model.embeddings.weight[ids], model.layers[0].norm.weight, cfg.norm_eps)
    expected = torch.zeros(4)
    for h in range(4):
        kv = h // 2
        q = x @ attn.q_proj.weight[h * dh:(h + 1) * dh].T
        k = x @ attn.k_proj.weight[kv * dh:(kv + 1) * dh].T
        v = x @ attn.v_proj.weight[kv * dh:(kv + 1) * dh].T
        s = (q @ k.transpose(1, 2)) / dh**0.5 + torch.full((9, 9), float("-inf")).triu(1)
        o = s.softmax(-1) @ v  # [batch, t, dh]
        per_channel = o.abs().mean(dim=1).square().sum(dim=0).sqrt()
        expected[h] = per_channel.norm()
    assert max_rel(layers[0]["head"], expected) < 1e-5


def test_a_layer_with_zeroed_output_ranks_least_important_in_depth():
    model = randomize_(HybridLM(tiny_config("M-*M-M*"))).eval()
    with torch.no_grad():
        model.layers[3].mixer.out_proj.weight.zero_()
    imp = scores(model)
    for metric in ("iterative_mse", "oneshot_mse", "cosine"):
        assert imp.depth[metric][0] == 3, metric
    assert imp.depth_scores["oneshot_mse"][3] == 0.0


def test_importance_round_trip_and_mismatch(tmp_path):
    model = randomize_(HybridLM(tiny_config("M-*"))).eval()
    imp = scores(model)
    imp.save(tmp_path / "imp")
    again = Importance.load(tmp_path / "imp")
    assert torch.equal(again.hidden, imp.hidden) and again.depth == imp.depth
    for a, b in zip(again.layers, imp.layers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = HybridLM(tiny_config("M-*", hidden=48))
    with pytest.raises(ConfigError, match="do not match"):
        reorder_(other, again)


def test_prune_candidates_meet_the_budget_and_keep_groups_equal():
    cfg = tiny_config("M-*M-M*", groups=2, heads=8)
    model = randomize_(HybridLM(cfg)).eval()
    reorder_(model, scores(model))
    parent = model.num_parameters()
    for fraction in (0.75, 0.5):
        budget = round(fraction * parent)
        cands = candidates(cfg, budget)
        assert cands
        for c in cands:
            assert abs(c.parameters - budget) <= 0.01 * budget
            assert c.parameters == count_parameters(cfg, c.subnet)
        val = [(ids, doc, torch.ones_like(ids)) for ids, doc in batches(1, seed=5)]
        best, scored = search(model, budget, val, max_candidates=6, progress=False)
        small = extract(model, best.subnet)
        assert small.num_parameters() == best.parameters == sum(p.numel() for p in small.parameters())
        for h in MAMBA_KIND.heads(small.config):
            assert h % cfg.mamba.n_groups == 0
        for b_small, i in zip(small.layers, best.subnet.kept_layers, strict=True):
            if b_small.kind == "M":  # the B/C conv channels are the parent's, untouched
                n = 2 * cfg.mamba.n_groups * cfg.mamba.state_size
                assert torch.equal(b_small.mixer.conv1d.weight[-n:], model.layers[i].mixer.conv1d.weight[-n:])
        assert best.loss == min(c.loss for c in scored)


def test_parse_budget():
    assert parse_budget("0.5", 1000) == 500
    assert parse_budget("75%", 1000) == 750
    assert parse_budget("300M", 10**9) == 300_000_000
    assert parse_budget("6B", 12 * 10**9) == 6 * 10**9
    assert parse_budget("1.2e3", 2000) == 1200
    for bad in ("half", "0", "2.5B", "-1"):
        with pytest.raises(ConfigError):
            parse_budget(bad, 10**9)


def test_cli_importance_reorder_prune_generate(tmp_path, capsys):
    model = randomize_(HybridLM(tiny_config("M-*M-", vocab_size=320)), seed=1).eval()
    from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer

    save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    elasticlm.save(model, tmp_path / "parent", tokenizer_dir=tmp_path / "tok")

    def cli(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    cli("importance", "--model", tmp_path / "parent", "--samples", 6, "--seq-len", 64, "--batch-size", 4,
        "--depth-samples", 2, "--out", tmp_path / "imp", "--no-progress")
    cli("reorder", "--model", tmp_path / "parent", "--importance", tmp_path / "imp", "--out", tmp_path / "ordered")
    out = cli("prune", "--model", tmp_path / "ordered", "--budget", "0.6", "--val-samples", 2, "--seq-len", 32,
              "--max-candidates", 4, "--out", tmp_path / "small", "--no-progress")
    small = elasticlm.load(tmp_path / "small")
    budget = 0.6 * model.num_parameters()
    assert abs(small.num_parameters() - budget) <= 0.01 * budget
    assert f"{small.num_parameters():,} parameters" in out
    ordered = elasticlm.load(tmp_path / "ordered")
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        assert max_rel(ordered(ids), model(ids)) <= 1e-5
    gen = cli("generate", "--model", tmp_path / "small", "--prompt", "Q: 1+2", "--max-new-tokens", 5)
    assert isinstance(gen, str)


def test_cli_prune_errors(tmp_path, capsys):
    model = HybridLM(tiny_config("M-*"))
    elasticlm.save(model, tmp_path / "parent")
    code = main(["prune", "--model", str(tmp_path / "parent"), "--budget", "0.5", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "not importance-ordered" in err and err.count("\n") == 1
    model.config.depth_order = [0, 1, 2]
    elasticlm.save(model, tmp_path / "p2")
    code = main(["prune", "--model", str(tmp_path / "p2"), "--budget", "lots", "--out", str(tmp_path / "x")])
    assert code == 2 and "budget" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert Subnet.full(model.config)  # the parent itself is untouched


def test_cli_prune_refuses_an_existing_output_before_searching(tmp_path, capsys, monkeypatch):
    model = HybridLM(tiny_config("M-*"))
    model.config.depth_order = [0, 1, 2]
    elasticlm.save(model, tmp_path / "p")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    monkeypatch.setattr("elasticlm.elastic.prune.search", lambda *a, **k: pytest.fail("searched"))
    code = main(["prune", "--model", str(tmp_path / "p"), "--budget", "0.5", "--out", str(tmp_path / "out")])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def llama_config(layers: int = 4, **kw) -> elasticlm.ModelConfig:
    """A tiny Llama-shaped parent (rotary attention + gated MLP pairs), built without transformers."""
    return elasticlm.ModelConfig(pattern="*-" * layers, vocab_size=64, hidden_size=32, num_attention_heads=4,
                                 num_key_value_heads=2, attention_head_dim=8, intermediate_size=48,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, mlp_type="swiglu",
                                 family="llama", eos_token_id=EOS, **kw)


@pytest.mark.parametrize("config,unit", [(tiny_config("M-*M-M*-"), 1), (llama_config(3), 1), (llama_config(4), 2)],
                         ids=["hybrid", "llama-blocks", "llama-decoder-layers"])
def test_fast_iterative_depth_order_equals_the_whole_model_reference(config, unit):
    """The sweep over cached hidden states (stacked candidates, candidates in groups, the head's Gram matrix)
    gives the order and scores of one whole-model forward per candidate and round, with packed documents —
    removing single blocks, or a transformer's whole decoder layers."""
    from elasticlm.elastic.importance import _iterative_reference, depth_evaluations, depth_mse_rounds

    model = randomize_(HybridLM(config), seed=3).eval()
    data = batches(2, b=2, t=16, seed=4)
    want_order, want_scores = _iterative_reference(model, data, unit)
    n, count = config.num_layers, config.num_layers // unit
    for stack_rows, state_bytes in ((64, 2**30), (2, 2 * 16 * 32 * 4 * 3)):  # everything stacked / 3 per group
        dropped, history = depth_mse_rounds(model, data, count - 1, unit=unit, stack_rows=stack_rows,
                                            state_bytes=state_bytes)
        assert [i for u in dropped for i in range(u * unit, (u + 1) * unit)] == want_order[:-unit]
        got = [history[dropped.index(u)][u] if u in dropped else None for u in range(count)]
        assert got[want_order[-1] // unit] is None
        for g, w in zip(got, want_scores[::unit], strict=True):
            assert g == w or g == pytest.approx(w, rel=1e-4, abs=1e-9)
    assert depth_evaluations(n, count - 1, unit=unit) == n + unit * sum(m - 1 + m * (m - 1) // 2
                                                                        for m in range(2, count + 1))
    # the whole pipeline: the one-shot order is the first round's, a few rounds fill the rest from the last round
    imp = estimate(model, iter(data), depth_batches=2, progress=False, depth_rounds=2, depth_unit=unit)
    assert imp.depth["iterative_mse"][:2 * unit] == want_order[:2 * unit]
    assert sorted(imp.depth["iterative_mse"]) == list(range(n))
    assert imp.meta["iterative_mse_rounds"] == 2 and "round 2" in imp.meta["iterative_mse_note"]
    if unit == 1:
        oneshot = layer_mse(model, data)
        assert imp.depth["oneshot_mse"] == sorted(oneshot, key=lambda j: (oneshot[j], j))


def test_depth_mse_under_bf16_autocast_is_near_the_fp32_scores():
    """``importance --dtype bfloat16`` (and ``auto`` where bf16 pays): the depth MSE forwards run under autocast;
    every one-shot score stays within a few percent of the fp32 whole-model reference (an independent loop of
    fp32 forwards), and the metadata says which precision scored the layers."""
    model = randomize_(HybridLM(llama_config(4)), seed=3).eval()
    data = batches(2, b=2, t=16, seed=4)
    reference = layer_mse(model, data)  # fp32, one whole-model forward per removed block
    imp = estimate(model, iter(data), depth_batches=2, progress=False, depth_rounds=1, depth_dtype=torch.bfloat16)
    assert imp.meta["depth_dtype"] == "bfloat16"
    got = imp.depth_scores["oneshot_mse"]
    spread = max(reference.values()) - min(reference.values())
    for j, want in reference.items():
        assert abs(got[j] - want) <= 0.05 * want + 0.01 * spread, (j, got[j], want)
    assert estimate(model, iter(data), depth_batches=2, progress=False, depth_rounds=1).meta["depth_dtype"] == \
        "float32"


def test_depth_rounds_default_covers_the_depth_choices():
    from elasticlm.elastic.importance import auto_depth_rounds

    assert auto_depth_rounds(tiny_config("M-*M-M*-")) == 3  # 25 % of 8 layers = 2, +1 (attention moved last)
    assert auto_depth_rounds(tiny_config("M-M-M-M-")) == 2
    # elastic depth 0.75 of SmolLM2's 60 blocks keeps 44: 8 decoder layers dropped; 16 blocks (+1) one by one
    assert auto_depth_rounds(llama_config(30)) == 8 and auto_depth_rounds(llama_config(30), unit=1) == 17
    assert auto_depth_rounds(tiny_config("M-")) == 1
    model = randomize_(HybridLM(tiny_config("M-*"))).eval()
    with pytest.raises(ConfigError, match="depth rounds must be in"):
        estimate(model, iter(batches()), progress=False, depth_rounds=3)


@pytest.mark.parametrize("align", [8, 64])
def test_prune_candidates_are_aligned_on_budget_and_exportable(align):
    """Every candidate's hidden, FFN widths are multiples of the alignment (FFN: or the parent's), its count is
    within the tolerance of the budget, and its family's Hugging Face config can hold it — unless any architecture
    is asked for (native output), which here does propose some that LlamaConfig refuses (hidden % heads)."""
    from elasticlm.config import subnet_config
    from elasticlm.elastic.prune import TOLERANCE
    from elasticlm.model.hf import hf_incompatibility

    cfg = elasticlm.ModelConfig(  # SmolLM2-135M's widths, 6 decoder layers (counts only: no weights are made)
        pattern="*-" * 6, vocab_size=1000, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        attention_head_dim=64, intermediate_size=1536, mlp_type="swiglu", family="llama", eos_token_id=EOS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, depth_order=list(range(12)))
    budget = round(0.6 * count_parameters(cfg))
    found = candidates(cfg, budget, align=align)
    assert found
    for c in found:
        assert c.subnet.hidden_size % align == 0
        ffn = {w.intermediate_size for w in c.subnet.layers if w is not None and hasattr(w, "intermediate_size")}
        assert all(f % align == 0 or f == 1536 for f in ffn), ffn
        assert abs(c.parameters - budget) <= TOLERANCE * budget
        assert hf_incompatibility(subnet_config(cfg, c.subnet)) is None
    anything = candidates(cfg, budget, align=align, exportable=False)
    refused = [c for c in anything if hf_incompatibility(subnet_config(cfg, c.subnet)) is not None]
    assert len(anything) == len(found) + len(refused)
    assert bool(refused) == (align == 64)  # 576 · 7/8 = 504 is a multiple of 9 heads, 512 is not


def test_mamba2_prune_candidates_keep_the_inner_width_a_multiple_of_hidden():
    from elasticlm.config import subnet_config
    from elasticlm.model.hf import hf_incompatibility

    cfg = elasticlm.ModelConfig(pattern="MMMMMMMM", vocab_size=512, hidden_size=256, family="mamba2",
                                eos_token_id=EOS, depth_order=list(range(8)),
                                sections={"mamba": {"num_heads": 16, "head_dim": 64, "n_groups": 1, "state_size": 16}})
    budget = round(0.5 * count_parameters(cfg))
    anything = candidates(cfg, budget, exportable=False)
    assert any(hf_incompatibility(subnet_config(cfg, c.subnet)) for c in anything)  # the grid does reach them
    found = candidates(cfg, budget)
    assert found
    for c in found:
        assert hf_incompatibility(subnet_config(cfg, c.subnet)) is None and c.subnet.hidden_size % 8 == 0
