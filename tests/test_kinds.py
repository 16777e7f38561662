"""The per-kind layouts (elasticlm.kinds) against naive index lists written out here, independently.

Every parameter of every kind, over several shapes (Mamba groups 1/2/4, GQA ratios, odd head counts, biases
on and off) and random widths: the kept indices of the layout equal a hand-written loop over the layer's
structure, the mixer's sliced tensors equal the full tensors indexed by those lists, the soft-mask staircase
at a one-hot choice is the kept set, and reordering moves exactly the entries the naive layout says.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import randomize_, tiny_config

from elasticlm import HybridLM
from elasticlm.kinds import KINDS, kept_indices, kind_of, layout_size

SHAPES = [  # (pattern, groups, mamba heads, head dim, q heads, kv heads, extra config)
    ("M*-", 1, 3, 4, 3, 1, {}),
    ("M*-", 2, 8, 8, 4, 2, {"use_bias": True, "mlp_bias": True}),
    ("-M*", 4, 8, 6, 6, 3, {"use_conv_bias": False}),
    ("*M-", 2, 6, 5, 9, 3, {}),
    # a transformer's variants: q/k/v and o biases, per-head q/k norm, gated SiLU MLP with biases, rotary
    ("*-*-", 1, 4, 4, 6, 2, {"attention_bias": True, "attention_out_bias": True, "qk_norm": True,
                             "mlp_type": "swiglu", "mlp_bias": True, "rope_parameters": {"rope_theta": 1e4}}),
    # mixture of experts: 6 experts in 2 routing groups, and 5 in one group, with a shared expert
    ("ME*E", 2, 4, 4, 4, 2, {"moe_num_experts": 6, "moe_n_group": 2, "moe_intermediate_size": 10,
                             "moe_shared_intermediate_size": 7}),
    ("E-", 1, 4, 4, 4, 2, {"moe_num_experts": 5, "moe_top_k": 1, "moe_intermediate_size": 6,
                           "moe_shared_intermediate_size": 3, "mlp_bias": True}),
    # sliding-window attention beside full attention, its own head count per layer, biases and q/k norm
    ("W*-W", 1, 4, 4, 6, 2, {"sections": {"sliding_attention": {"window": 3, "num_heads": [6, 4]}},
                             "attention_bias": True, "attention_out_bias": True, "qk_norm": True}),
]


def naive(cfg, kind: str, full, w, hidden: int) -> dict[str, list[list[int]]]:
    """Kept indices per parameter and dimension, written from the layer's definition by plain loops."""
    hid = list(range(hidden))
    if kind == "M":
        g, hg, p, n = cfg.mamba.n_groups, full.heads_per_group, full.head_dim, cfg.mamba.state_size
        di, nh = g * hg * p, g * hg
        ch = [(gi * hg + h) * p + c for gi in range(g) for h in range(w.heads_per_group) for c in range(w.head_dim)]
        heads = [gi * hg + h for gi in range(g) for h in range(w.heads_per_group)]
        bc = list(range(2 * g * n))
        in_rows = ch + [di + i for i in ch] + [2 * di + i for i in bc] + [2 * di + 2 * g * n + h for h in heads]
        conv_rows = ch + [di + i for i in bc]
        out = {"in_proj.weight": [in_rows, hid], "conv1d.weight": [conv_rows, [0], list(range(cfg.mamba.conv_kernel))],
               "dt_bias": [heads], "A_log": [heads], "D": [heads], "norm.weight": [ch], "out_proj.weight": [hid, ch]}
        assert len(in_rows) == len(set(in_rows)) and max(in_rows) < 2 * di + 2 * g * n + nh
        if cfg.mamba.use_bias:
            out.update({"in_proj.bias": [in_rows], "out_proj.bias": [hid]})
        if cfg.mamba.use_conv_bias:
            out["conv1d.bias"] = [conv_rows]
        return out
    if kind in "*W":  # full and sliding-window attention: the same parameters
        kv, dh, per = cfg.num_key_value_heads, cfg.attention_head_dim, full.heads_per_kv_group
        # query head j of KV group k sits at row block k·per + j (transformers' repeat_kv order)
        q = [(k * per + j) * dh + c for k in range(kv) for j in range(w.heads_per_kv_group) for c in range(dh)]
        kvr = list(range(kv * dh))
        out = {"q_proj.weight": [q, hid], "k_proj.weight": [kvr, hid], "v_proj.weight": [kvr, hid],
               "o_proj.weight": [hid, q]}
        if cfg.attention_bias:
            out.update({"q_proj.bias": [q], "k_proj.bias": [kvr], "v_proj.bias": [kvr]})
        if cfg.attention_out_bias:
            out["o_proj.bias"] = [hid]
        if cfg.qk_norm:  # one weight of head_dim shared by every head: never cut
            out.update({"q_norm.weight": [list(range(dh))], "k_norm.weight": [list(range(dh))]})
        return out
    if kind == "E":
        groups, per = cfg.section(KINDS["E"]).n_group, full.experts_per_group
        experts = [gi * per + e for gi in range(groups) for e in range(w.experts_per_group)]
        f = list(range(w.expert_intermediate_size))
        shared = list(range(cfg.section(KINDS["E"]).shared_intermediate_size))
        out = {"gate.weight": [experts, hid], "gate.e_score_correction_bias": [experts],
               "experts.up_proj": [experts, f, hid], "experts.down_proj": [experts, hid, f],
               "shared_experts.up_proj.weight": [shared, hid], "shared_experts.down_proj.weight": [hid, shared]}
        if cfg.mlp_bias:
            out.update({"shared_experts.up_proj.bias": [shared], "shared_experts.down_proj.bias": [hid]})
        return out
    f = list(range(w.intermediate_size))
    out = {"up_proj.weight": [f, hid], "down_proj.weight": [hid, f]}
    if cfg.mlp_type == "swiglu":  # the gate rows of a neuron go with its up row
        out["gate_proj.weight"] = [f, hid]
    if cfg.mlp_bias:
        out.update({"up_proj.bias": [f], "down_proj.bias": [hid]})
        if cfg.mlp_type == "swiglu":
            out["gate_proj.bias"] = [f]
    return out


def random_width(full, rng: random.Random):
    return dataclasses.replace(full, **{f: rng.randint(1, v) for f, v in dataclasses.asdict(full).items()})


def config_of(shape):
    pattern, groups, heads, head_dim, q, kv, extra = shape
    return tiny_config(pattern, groups=groups, heads=heads, head_dim=head_dim, q_heads=q, kv_heads=kv, hidden=24,
                       **extra)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-g{s[1]}-q{s[4]}kv{s[5]}")
@torch.no_grad()
def test_kept_indices_and_slices_match_a_naive_reference(shape):
    cfg = config_of(shape)
    model = randomize_(HybridLM(cfg))
    rng = random.Random(str(shape))
    for _ in range(12):
        for i, block in enumerate(model.layers):
            full = cfg.layer_widths(i)
            width, hidden = random_width(full, rng), rng.randint(1, cfg.hidden_size)
            layout = kind_of(cfg.pattern[i]).layout(cfg, full, width, hidden)
            want = naive(cfg, cfg.pattern[i], full, width, hidden)
            assert kept_indices(layout) == want
            params = {**dict(block.mixer.named_parameters()), **dict(block.mixer.named_buffers())}
            assert set(params) == set(want)  # the layout names every parameter of the module, nothing else
            sliced = block.mixer.sliced(hidden, width)
            assert set(sliced) == set(want)
            for name, index in want.items():
                reference = params[name][torch.meshgrid(*[torch.tensor(ix) for ix in index], indexing="ij")]
                assert torch.equal(sliced[name], reference), (i, name)
            assert layout_size(layout) == sum(torch.Size([len(ix) for ix in index]).numel() for index in want.values())
            # the block's parameter count: every laid-out parameter (not the MoE router's bias buffer) + the norm
            counted = sum(torch.Size([len(ix) for ix in index]).numel() for name, index in want.items()
                          if name != "gate.e_score_correction_bias") + hidden
            assert kind_of(cfg.pattern[i]).parameters(cfg, full, width, hidden) == counted


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4], SHAPES[5], SHAPES[7]],
                         ids=["hybrid", "transformer", "moe", "sliding"])
@torch.no_grad()
def test_one_hot_staircase_is_the_kept_set(shape):
    """The router's soft mask for a one-hot choice marks exactly the naive kept entries of the inner activation."""
    cfg = config_of(shape)
    rng = random.Random(1)
    for i in range(cfg.num_layers):
        kind, full = kind_of(cfg.pattern[i]), cfg.layer_widths(i)
        for _ in range(5):
            width = random_width(full, rng)
            run = kind.inner(cfg, full)
            fields = {f: getattr(width, f) for f in kind.fields}
            units = (torch.arange(run.per_group) < fields[run.unit]).float() if run.unit else None
            entries = (torch.arange(run.inner) < fields[run.entry]).float() if run.entry else None
            mask = run.mask(units, entries)
            # the inner activation is what the output projection reads: its kept columns, from the naive lists
            if cfg.pattern[i] == "E":  # [experts · ffn]: every kept neuron of every kept expert
                experts, _, ffn = naive(cfg, "E", full, width, cfg.hidden_size)["experts.down_proj"]
                kept = [e * full.expert_intermediate_size + c for e in experts for c in ffn]
            else:
                out_name = {"M": "out_proj.weight", "*": "o_proj.weight", "W": "o_proj.weight",
                            "-": "down_proj.weight"}[cfg.pattern[i]]
                kept = naive(cfg, cfg.pattern[i], full, width, cfg.hidden_size)[out_name][1]
            assert torch.nonzero(mask).flatten().tolist() == kept


def test_permutation_moves_units_with_their_entries():
    """Reordering a Mamba layer's heads (per group) and channels (shared) moves every row of that head in every
    run of in_proj, and nothing of B/C — checked against the naive layout of the full width."""
    cfg = config_of(SHAPES[1])
    full = cfg.layer_widths(0)
    g, hg, p = cfg.mamba.n_groups, full.heads_per_group, full.head_dim
    heads = torch.stack([torch.randperm(hg, generator=torch.Generator().manual_seed(s)) for s in range(g)])
    chans = torch.randperm(p, generator=torch.Generator().manual_seed(9))
    dims = KINDS["M"].layout(cfg, full, full, cfg.hidden_size)["in_proj.weight"]
    index = dims[0].permutation({"heads_per_group": heads, "head_dim": chans}).tolist()
    di, bc = g * hg * p, 2 * g * cfg.mamba.state_size
    expect = []
    for base in (0, di):  # z, x
        expect += [base + (gi * hg + int(heads[gi, h])) * p + int(chans[c])
                   for gi in range(g) for h in range(hg) for c in range(p)]
    expect += [2 * di + i for i in range(bc)]
    expect += [2 * di + bc + gi * hg + int(heads[gi, h]) for gi in range(g) for h in range(hg)]
    assert index == expect
    assert dims[1].permutation({}).tolist() == list(range(cfg.hidden_size))  # no hidden order given: unchanged


def test_every_kind_is_registered_once():
    assert sorted(KINDS) == ["*", "-", "E", "M", "W"]
    assert len({k.width for k in KINDS.values()}) == len(KINDS)
    assert len({k.name for k in KINDS.values()}) == len(KINDS)
    # an axis shared by several kinds sets the same width field in each (query heads per KV group)
    setters = {}
    for k in KINDS.values():
        for fieldname, axis in k.fields.items():
            setters.setdefault(axis, set()).add(fieldname)
    assert all(len(f) == 1 for f in setters.values())
