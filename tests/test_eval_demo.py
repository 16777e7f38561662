"""`elasticlm eval` (per-budget table, JSON, Pareto plot) and the `elasticlm demo --quick` smoke run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_deploy import elastic_checkpoint

import elasticlm
from elasticlm import ConfigError
from elasticlm.cli import main
from elasticlm.data.datasets import data_config_from_spec
from elasticlm.elastic.importance import calibration_batches
from elasticlm.eval.report import Point, markdown_table, parse_tasks
from elasticlm.tokenizer import load_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def naive_loss(model, batches) -> float:
    """Cross-entropy of a plain model over the masked targets, one document at a time (no packing
    masks needed: each document is run on its own, so documents cannot see each other)."""
    total, count = 0.0, 0
    for ids, doc, mask in batches:
        for row in range(ids.shape[0]):
            for d in doc[row].unique():
                sel = (doc[row] == d).nonzero().flatten()
                seg, keep = ids[row, sel], mask[row, sel]
                if len(seg) < 2:
                    continue
                with torch.no_grad():
                    logits = model(seg[None, :-1])[0]
                losses = F.cross_entropy(logits, seg[1:], reduction="none")
                total += float((losses * keep[1:]).sum())
                count += int(keep[1:].sum())
    return total / count


def test_parse_tasks_groups_and_errors():
    assert parse_tasks("ppl,reasoning,recall") == (True, ("add", "vars", "recall", "sort"))
    assert parse_tasks("recall") == (False, ("recall",))
    with pytest.raises(ConfigError, match="unknown task 'mmlu'"):
        parse_tasks("ppl,mmlu")
    with pytest.raises(ConfigError, match="empty"):
        parse_tasks(" , ")


def test_markdown_table_shows_every_point_and_means():
    pts = [Point("elastic", "1.0", 1000, 0.5, {"default": {"add": 1.0, "sort": 0.5}}),
           Point("zero-shot pruned", "0.5", 500, 2.0, {"default": {"add": 0.0, "sort": 0.25}})]
    table = markdown_table(pts)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "add (d3)" in lines[0] and "sort (d4)" in lines[0]
    assert "| elastic | 1.0 | 1,000 | 0.500 | 1.649 | 100 % | 50 % | **75.0 %** |" == lines[2]
    assert "**12.5 %**" in lines[3]


def test_eval_elastic_checkpoint_loss_matches_extracted_models(tmp_path, capsys):
    path = elastic_checkpoint(tmp_path)
    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(path), "--tasks", "ppl,recall", "--difficulty", "default", "--n", "3",
                 "--val-samples", "4", "--seq-len", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "eval.json").read_text())
    assert [p["budget"] for p in data["points"]] == ["1.0", "0.7", "0.45"]
    assert (out / "pareto.png").read_bytes()[:8] == PNG
    assert "| elastic | 0.45 |" in printed and "wrote" in printed
    # independent reference: the extracted model of each budget, run document by document
    assert main(["extract", "--checkpoint", str(path), "--budget", "all", "--out", str(tmp_path / "fam")]) == 0
    tok = load_tokenizer(path)
    nested = elasticlm.load(path)
    batches = list(calibration_batches(data_config_from_spec("synthetic", mask_prompt=True),
                                       lambda s: tok.encode(s).ids, nested.config.eos_token_id, 4, 64, 8, "val", True))
    for p in data["points"]:
        small = elasticlm.load(tmp_path / "fam" / f"budget-{p['budget']}")
        assert p["parameters"] == small.num_parameters()
        assert p["val_loss"] == pytest.approx(naive_loss(small, batches), rel=1e-4)
        assert set(p["accuracy"]["default"]) == {"recall"}


def test_eval_with_baseline_and_bad_input(tmp_path, capsys):
    path = elastic_checkpoint(tmp_path)
    assert main(["extract", "--checkpoint", str(path), "--budget", "0.45", "--out", str(tmp_path / "small")]) == 0
    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(path), "--budgets", "0.7", "--tasks", "add", "--difficulty", "default",
                 "--n", "2", "--baseline", f"pruned={tmp_path / 'small'}", "--out", str(out)]) == 0
    pts = json.loads((out / "eval.json").read_text())["points"]
    full = elasticlm.load(path).num_parameters()
    assert [(p["series"], p["budget"]) for p in pts] == [("elastic", "0.7"),
                                                         ("pruned", f"{pts[1]['parameters'] / full:.2f}")]
    assert pts[1]["parameters"] == elasticlm.load(tmp_path / "small").num_parameters()
    assert pts[0]["val_loss"] is None  # no ppl task asked for
    capsys.readouterr()
    for argv, message in [(["--tasks", "mmlu"], "unknown task"),
                          (["--budgets", "0.01"], "0.01"),  # no architecture of the space that small
                          (["--difficulty", "extreme"], "unknown difficulty"),
                          (["--baseline", str(tmp_path / "missing")], "missing")]:
        assert main(["eval", "--checkpoint", str(path), "--out", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "bad").exists()


def test_demo_quick_runs_the_whole_pipeline_and_reuses_its_parent(quick_demo, tmp_path, capsys):
    shared, printed = quick_demo
    out = tmp_path / "demo"
    shutil.copytree(shared, out)  # the rerun below writes into it; the shared run stays as it was
    pts = json.loads((out / "eval" / "eval.json").read_text())["points"]
    assert [(p["series"], p["budget"]) for p in pts] == [
        ("parent", "1.0"), ("elastic", "1.0"), ("elastic", "0.75"), ("elastic", "0.5"),
        ("zero-shot pruned", "0.75"), ("zero-shot pruned", "0.5")]
    assert all(p["val_loss"] is not None and p["accuracy"]["default"] for p in pts)
    parent = pts[0]["parameters"]
    for p in pts[1:]:  # every budget within 2 % of its target, the baselines within 1 % of the elastic size
        target = float(p["budget"]) * parent
        assert abs(p["parameters"] / target - 1) < 0.03, p
    deployed = elasticlm.Deployment.load(out / "elastic" / "final")
    elastic = deployed.model
    for label, subnet in deployed.budgets.items():
        assert elasticlm.load(out / "extracted" / f"budget-{label}").num_parameters() == elastic.num_parameters(subnet)
    assert (out / "eval" / "pareto.png").read_bytes()[:8] == PNG
    assert "budget 0.5: elastic vs zero-shot pruned" in printed and "pareto.png" in printed
    # a second run reuses the parent and the elastic model (same recipe) instead of training again
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "reusing the parent" in again and "reusing the elastic model" in again


def test_demo_refuses_a_file_as_its_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    assert target.read_text() == "x"


def test_demo_seed_moves_every_random_choice_and_seed_zero_is_the_recipe():
    from elasticlm.demo import FULL, seeded

    assert seeded(FULL, 0).parent["data"]["seed"] == FULL.parent["data"]["seed"] == 0
    assert seeded(FULL, 0).elastic["data"]["seed"] == FULL.elastic["data"]["seed"] == 1
    seeds = [(r.parent["train"]["seed"], r.parent["data"]["seed"], r.elastic["train"]["seed"],
              r.elastic["data"]["seed"]) for r in (seeded(FULL, s) for s in range(3))]
    assert seeds == [(0, 0, 0, 1), (1, 2, 1, 3), (2, 4, 2, 5)]
    assert "seed" not in FULL.parent["train"]  # the module-level recipe is not modified
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            seeded(FULL, bad)


def test_demo_refuses_a_negative_seed(tmp_path, capsys):
    assert main(["demo", "--quick", "--seed", "-1", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed" in err[0]
    assert not (tmp_path / "d").exists()


def test_demo_quick_with_a_llama_parent_exports_to_transformers(tmp_path, capsys):
    """The whole pipeline on a Llama-shaped parent: importance → reorder → elastic training → extract → export;
    budgets that are whole decoder layers of one width load in transformers' LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--parent", "llama", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "budget 0.5: elastic vs zero-shot pruned" in printed
    assert json.loads((out / "demo.json").read_text())["parent"] == "llama"
    deployed = elasticlm.Deployment.load(out / "elastic" / "final")
    elastic = deployed.model
    assert elastic.config.family == "llama" and set(elastic.config.pattern) == {"*", "-"}
    assert elastic.config.rope_parameters is not None and elastic.config.mlp_type == "swiglu"
    ids = torch.randint(3, elastic.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    exported = 0
    for label, subnet in deployed.budgets.items():
        directory = out / "extracted" / f"budget-{label}"
        assert elasticlm.load(directory).num_parameters() == elastic.num_parameters(subnet)
        config = json.loads((directory / "config.json").read_text())
        if config.get("model_type") == "llama":  # written as Hugging Face Llama: transformers runs it
            hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
            with torch.no_grad():
                assert (hf(ids, use_cache=False).logits - elastic(ids, subnet=subnet)).abs().max() <= 1e-4
            exported += 1
        else:  # per-layer widths or half a decoder layer dropped: native
            assert "elasticlm_format" in config
    assert exported >= 1  # at least the full budget


def test_demo_parent_option_and_its_old_name():
    """`--parent` picks the demo's parent architecture; `--family`, its name before "family" came to mean only the
    Hugging Face model_type, still parses to it but is no longer advertised."""
    from elasticlm.cli import build_parser
    from elasticlm.demo import DEMO_PARENTS

    parser = build_parser()
    assert parser.parse_args(["demo", "--parent", "qwen3"]).parent == "qwen3"
    assert parser.parse_args(["demo", "--family", "llama"]).parent == "llama"
    assert parser.parse_args(["demo"]).parent == "nemotron_h"
    assert set(DEMO_PARENTS) == {"nemotron_h", "nemotron_h_moe", "llama", "qwen3"}
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--parent", "gpt2"])
