"""Shipping an elastic checkpoint: extract every budget, nested serving equals extracted models,
Hugging Face export of a budget, info per budget, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import max_rel, randomize_, tiny_config

import elasticlm
from elasticlm import ConfigError
from elasticlm.cli import main
from elasticlm.config import Subnet, count_parameters
from elasticlm.elastic.router import Router
from elasticlm.elastic.space import ElasticConfig, ElasticSpace
from elasticlm.model.hybrid import HybridLM
from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer
from elasticlm.train.elastic import ElasticStudent, save_elastic_checkpoint

_BUILT: dict[tuple, Path] = {}


def elastic_checkpoint(tmp_path, heterogeneous=(), name="elastic"):
    """A real elastic checkpoint (as `elasticlm train` writes it) of a random tiny model whose router
    was fitted to budgets 1.0 / 0.7 / 0.45. Built once per test session (fitting the router takes a while)
    and copied to ``tmp_path / name``."""
    key = tuple(heterogeneous)
    if key not in _BUILT or not _BUILT[key].exists():
        _BUILT[key] = _build_elastic_checkpoint(Path(tempfile.mkdtemp(prefix="elastic-ckpt-")), heterogeneous)
    shutil.copytree(_BUILT[key], tmp_path / name)
    if not (tmp_path / "tok").exists():
        shutil.copytree(_BUILT[key].parent / "tok", tmp_path / "tok")
    return tmp_path / name


def _build_elastic_checkpoint(tmp_path, heterogeneous=(), name="elastic"):
    cfg = tiny_config("M*-M-*-M", hidden=48, vocab_size=260)
    cfg.depth_order = [4, 2, 6, 0, 7, 1, 3, 5]
    torch.manual_seed(0)
    model = randomize_(HybridLM(cfg), seed=2)
    extra = {"depth": [1.0]} if heterogeneous else {}  # keep every layer, so per-layer widths show
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.7, 0.45], heterogeneous=list(heterogeneous),
                                                  **extra))
    router = Router(space, hidden=32)
    if heterogeneous:  # per-layer choices that differ, so the sub-models are really heterogeneous
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0, 1.0)
    else:
        router.fit_budgets(150, lr=1e-2)
    save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    save_elastic_checkpoint(tmp_path / name, ElasticStudent(model, router), space, tmp_path / "tok")
    return tmp_path / name


def test_every_budget_extracted_equals_nested_logits_and_greedy_generation(tmp_path):
    path = elastic_checkpoint(tmp_path)
    deployed = elasticlm.Deployment.load(path)
    nested = deployed.model
    assert list(deployed.budgets) == ["1.0", "0.7", "0.45"]
    assert main(["extract", "--checkpoint", str(path), "--budget", "all", "--out", str(tmp_path / "out"),
                 "--format", "native"]) == 0
    ids = torch.randint(3, 260, (2, 21))
    for label, subnet in deployed.budgets.items():
        small = elasticlm.load(tmp_path / "out" / f"budget-{label}")
        assert small.num_parameters() == count_parameters(nested.config, subnet)
        with torch.no_grad():
            assert max_rel(nested(ids, subnet), small(ids)) < 1e-5
        a = deployed.generate(ids[:1, :7], budget=label, max_new_tokens=12)
        b = elasticlm.generate(small, ids[:1, :7], max_new_tokens=12)
        assert torch.equal(a, b)
        assert (tmp_path / "out" / f"budget-{label}" / "README.md").read_text().count("| mamba |") == 3
    # the budgets are different models, and the nested one switches per call without a copy
    sizes = [count_parameters(nested.config, s) for s in deployed.budgets.values()]
    assert sizes[0] > sizes[1] > sizes[2]
    ptr = nested.embeddings.weight.data_ptr()
    deployed.generate(ids[:1, :5], budget="0.45", max_new_tokens=3)
    assert nested.embeddings.weight.data_ptr() == ptr


def test_memoised_slices_are_dropped_when_weights_change(tmp_path):
    deployed = elasticlm.Deployment.load(elastic_checkpoint(tmp_path))
    nested = deployed.model
    ids = torch.randint(3, 260, (1, 9))
    subnet = deployed.budgets["0.45"]
    with torch.inference_mode():
        before = nested(ids, subnet, memo=deployed.memo)
    assert deployed.memo.entries
    with torch.no_grad():
        for p in nested.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        after = nested(ids, subnet, memo=deployed.memo)
    with torch.no_grad():
        reference = elasticlm.extract(nested, subnet)(ids)
    assert max_rel(after, reference) < 1e-5 and max_rel(before, reference) > 1e-3


def test_hf_extraction_reloads_in_transformers_with_the_same_logits_and_generations(tmp_path):
    """Every budget `extract --budget all` writes: transformers loads it, its logits equal the nested
    budget's and its greedy generate() (with transformers' own cache) is token-identical."""
    transformers = pytest.importorskip("transformers")
    path = elastic_checkpoint(tmp_path)
    deployed = elasticlm.Deployment.load(path)
    nested = deployed.model
    assert main(["extract", "--checkpoint", str(path), "--budget", "all", "--out", str(tmp_path / "hf")]) == 0
    ids = torch.randint(3, 260, (2, 17))
    for label in deployed.budgets:
        out = tmp_path / "hf" / f"budget-{label}"
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "nemotron_h" and "layers_block_type" not in config
        assert "bos_token" not in json.loads((out / "tokenizer_config.json").read_text())
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            ours = nested(ids, deployed.budgets[label])
            theirs = hf(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4, label
        mine = deployed.generate(ids[:1, :7], budget=label, max_new_tokens=10)
        gen = hf.generate(ids[:1, :7], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert mine.tolist() == gen.tolist(), label


def test_heterogeneous_budgets_export_to_transformers_padded_and_generate_token_identically(tmp_path, capsys):
    """`extract --budget all` (format auto) of budgets with per-layer FFN widths: stock NemotronH directories,
    zero-padded, that transformers loads and generates with exactly as the nested budget does; the real widths
    come back on import. Per-layer Mamba widths have no exact padded form: `--format hf` says so."""
    transformers = pytest.importorskip("transformers")
    path = elastic_checkpoint(tmp_path, heterogeneous=["ffn"])
    deployed = elasticlm.Deployment.load(path)
    model = deployed.model
    hetero = [b for b, s in deployed.budgets.items()
              if len({w.intermediate_size for w in s.layers if hasattr(w, "intermediate_size")}) > 1]
    assert hetero, "the test needs a budget whose FFN widths differ per layer"
    assert main(["extract", "--checkpoint", str(path), "--budget", "all", "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "zero padding to uniform widths" in out and "elasticlm native" not in out
    ids = torch.randint(3, 260, (2, 15))
    for label in deployed.budgets:
        directory = tmp_path / "h" / f"budget-{label}"
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "nemotron_h"
        assert ("elasticlm_padding" in config) == (label in hetero)
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            assert (hf(ids).logits - model(ids, deployed.budgets[label])).abs().max().item() <= 1e-4, label
        mine = deployed.generate(ids[:1, :7], budget=label, max_new_tokens=10)
        theirs = hf.generate(ids[:1, :7], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert mine.tolist() == theirs.tolist(), label
        back = elasticlm.load(directory)
        assert back.num_parameters() == count_parameters(model.config, deployed.budgets[label])
    card = (tmp_path / "h" / f"budget-{hetero[0]}" / "README.md").read_text()
    assert "zero padding to uniform widths" in card

    # a budget with per-layer Mamba widths: refused as hf in one line, written natively by auto
    layers = list(deployed.budgets[hetero[0]].layers)
    mamba = [i for i, k in enumerate(model.config.pattern) if k == "M" and layers[i] is not None]
    layers[mamba[0]] = dataclasses.replace(layers[mamba[0]], heads_per_group=1)
    odd = elasticlm.extract(model, Subnet(deployed.budgets[hetero[0]].hidden_size, tuple(layers)))
    with pytest.raises(ConfigError, match="Mamba head counts"):
        elasticlm.save(odd, tmp_path / "odd", "hf")
    assert not (tmp_path / "odd").exists()


def test_info_reports_every_budget(tmp_path, capsys):
    path = elastic_checkpoint(tmp_path)
    assert main(["info", str(path), "--context", "1024"]) == 0
    out = capsys.readouterr().out
    deployed = elasticlm.Deployment.load(path)
    model = deployed.model
    for label, subnet in deployed.budgets.items():
        assert f"| {label} | {count_parameters(model.config, subnet):,} |" in out
    assert "separate models hold" in out and "memory @ 1,024 tokens" in out


def test_bad_input(tmp_path, capsys, monkeypatch):
    path = elastic_checkpoint(tmp_path)
    plain = tmp_path / "plain"
    elasticlm.save(elasticlm.load(path), plain, tokenizer_dir=path)  # same weights, no elastic.json
    cases = [
        (["extract", "--checkpoint", str(path), "--budget", "0.01", "--out", str(tmp_path / "x")],
         "this checkpoint has budgets 1.0, 0.7, 0.45"),  # and no architecture of its space is that small
        (["extract", "--checkpoint", str(plain), "--budget", "0.5", "--out", str(tmp_path / "x")],
         "not an elastic checkpoint"),
        (["generate", "--checkpoint", str(plain), "--budget", "0.5", "--prompt-ids", "5,6"],
         "not an elastic checkpoint"),
        (["generate", "--checkpoint", str(path), "--budget", "0.01", "--prompt-ids", "5,6"], "unknown budget"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
    # "70%" names the 0.7 budget; an existing output is refused unless --force
    out = tmp_path / "b"
    assert main(["extract", "--checkpoint", str(path), "--budget", "70%", "--out", str(out)]) == 0
    assert main(["extract", "--checkpoint", str(path), "--budget", "0.7", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["extract", "--checkpoint", str(path), "--budget", "0.45", "--out", str(out), "--force"]) == 0
    assert elasticlm.load(out).num_parameters() == elasticlm.Deployment.load(path).num_parameters("0.45")
    # an interrupted write leaves nothing behind
    import elasticlm.elastic.deploy as deploy

    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = deploy.write_model_files
    monkeypatch.setattr(deploy, "write_model_files", dies_on_second)
    assert main(["extract", "--checkpoint", str(path), "--budget", "all", "--out", str(tmp_path / "all")]) == 130
    assert not (tmp_path / "all").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".all")]
    with pytest.raises(ConfigError, match="not an elastic checkpoint"):
        elasticlm.Deployment.load(plain).subnet("0.5")


@pytest.mark.parametrize("keep_attention", [True, False])
def test_depth_keeps_the_last_attention_layer_so_transformers_can_generate(tmp_path, keep_attention):
    """The parent's only attention layer is the least important one: the shallowest depth choice would drop
    it. With elastic.keep_attention (the default) the budget keeps it, and the exported model generates in
    transformers token-identically; without, the budget is attention-free."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config("M-M*M-M-", hidden=48, vocab_size=260)
    attention = cfg.pattern.index("*")
    cfg.depth_order = [attention] + [i for i in range(cfg.num_layers) if i != attention]
    model = randomize_(HybridLM(cfg), seed=5).eval()
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0], depth=[1.0, 0.5], keep_attention=keep_attention))
    dropped = space.dropped_layers(cfg.num_layers // 2)
    assert (attention in dropped) is not keep_attention and len(dropped) == cfg.num_layers // 2
    if not keep_attention:
        return
    subnet = Subnet.uniform(cfg, drop_layers=tuple(dropped))
    small = elasticlm.extract(model, subnet)
    assert "*" in small.config.pattern
    save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    elasticlm.save(small, tmp_path / "hf", "hf", tokenizer_dir=tmp_path / "tok")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 260, (1, 9))
    ours = elasticlm.generate(small, ids, max_new_tokens=8)
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_hf_config_carries_the_names_engines_read_and_reads_per_layer_lists(tmp_path):
    from elasticlm.model.hf import config_from_hf, config_to_hf

    cfg = tiny_config("M*-M*-", hidden=48, vocab_size=260)
    out = config_to_hf(cfg)
    # NVIDIA's field names; no layers_block_type (parsers that derive it from the pattern refuse it)
    assert "layers_block_type" not in out
    assert out["mamba_n_groups"] == out["n_groups"] == cfg.mamba.n_groups
    assert out["mamba_d_head"] == out["mamba_head_dim"] and out["hybrid_override_pattern"] == cfg.pattern
    assert config_from_hf(out) == dataclasses.replace(cfg, depth_order=None)
    # per-layer widths as engines write them: one value per layer (0 where the layer has no such part)
    per_layer = dict(out, num_attention_heads=[0, 4, 0, 0, 2, 0], intermediate_size=[0, 0, 48, 0, 0, 24])
    back = config_from_hf(per_layer)
    assert back.attention_heads_list() == [4, 2] and back.intermediate_sizes_list() == [48, 24]
    with pytest.raises(ConfigError, match="num_attention_heads lists 3 values"):
        config_from_hf(dict(out, num_attention_heads=[4, 2, 2]))
    # transformers derives the layer types from the pattern string alone
    transformers = pytest.importorskip("transformers")
    hc = transformers.NemotronHConfig.from_dict(out)
    kinds = {"M": {"mamba", "linear_attention"}, "*": {"attention", "full_attention"}, "-": {"mlp"}}
    assert len(hc.layers_block_type) == len(cfg.pattern)
    assert all(t in kinds[k] for t, k in zip(hc.layers_block_type, cfg.pattern, strict=True))
    assert hc.n_groups == cfg.mamba.n_groups and hc.mamba_head_dim == out["mamba_head_dim"]
