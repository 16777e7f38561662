"""Checkpoints on disk and the command line: round trips, clear one-line errors, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import randomize_, tiny_config

import elasticlm
from elasticlm import CheckpointError, HybridLM, Subnet, extract
from elasticlm.cli import main
from elasticlm.errors import OutputError


def saved_model(tmp_path, name="m", fmt="native", **kw) -> tuple[HybridLM, object]:
    model = randomize_(HybridLM(tiny_config("M-*M", **kw)), seed=4).eval()
    path = elasticlm.save(model, tmp_path / name, format=fmt)
    return model, path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_native_round_trip_with_heterogeneous_widths(tmp_path):
    model = randomize_(HybridLM(tiny_config("M-*M")), seed=2).eval()
    subnet = Subnet(24, (elasticlm.MambaWidth(3, 8), None, elasticlm.AttentionWidth(1), elasticlm.MambaWidth(1, 5)))
    small = extract(model, subnet)
    assert not small.config.is_homogeneous
    elasticlm.save(small, tmp_path / "small")
    again = elasticlm.load(tmp_path / "small")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(again(ids), small(ids))
    assert again.config == small.config
    with pytest.raises(elasticlm.ConfigError, match="different Mamba head counts"):
        elasticlm.save(small, tmp_path / "small-hf", format="hf")
    assert not (tmp_path / "small-hf").exists()


def test_convert_to_hf_refuses_heterogeneous_with_one_line(tmp_path, capsys):
    model = HybridLM(tiny_config("M-*M", heads=[8, 4]))
    elasticlm.save(model, tmp_path / "het")
    code, _, err = run_cli(capsys, "convert", tmp_path / "het", tmp_path / "out", "--to", "hf")
    assert code == 2
    assert err.startswith("error: cannot convert") and "native" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_convert_round_trip(tmp_path, capsys):
    model, src = saved_model(tmp_path)
    assert run_cli(capsys, "convert", src, tmp_path / "hf", "--to", "hf")[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "nemotron_h"
    assert run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "back", "--to", "native")[0] == 0
    back = elasticlm.load(tmp_path / "back")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    # refuses to overwrite without --force
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "back", "--to", "native")
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_gives_one_line_error(tmp_path, capsys, damage):
    _, src = saved_model(tmp_path)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        elasticlm.load(src)
    code, out, err = run_cli(capsys, "convert", src, tmp_path / "dst", "--to", "hf")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "dst").exists()


def test_bad_directories_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        elasticlm.load(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        elasticlm.load(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        elasticlm.load(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not supported"):
        elasticlm.load(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="llama config.json is missing 'hidden_size'"):
        elasticlm.load(tmp_path / "d")
    _, src = saved_model(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model"]["hidden_size"] = 40
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        elasticlm.load(src)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, path = saved_model(tmp_path)
    before = (path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("elasticlm.checkpoint.save_file", boom)
    other = randomize_(HybridLM(tiny_config("M-*M")), seed=99)
    with pytest.raises(OutputError, match="disk full"):  # one line, naming the path
        elasticlm.save(other, path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == before
    assert elasticlm.load(path) is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind


def test_every_verb_has_help(capsys):
    for verb in ([], ["init"], ["info"], ["generate"], ["convert"], ["pretrain"], ["eval"], ["tokenizer"],
                 ["tokenizer", "train"]):
        assert main([*verb, "--help"]) == 0
        assert "usage: elasticlm" in capsys.readouterr().out


def test_init_info_generate(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "init", tmp_path / "tiny", "--preset", "tiny", "--set", "hidden_size=48")
    assert code == 0 and "parameters" in out
    model = elasticlm.load(tmp_path / "tiny")
    assert model.config.hidden_size == 48
    code, out, _ = run_cli(capsys, "info", tmp_path / "tiny")
    assert code == 0 and f"{model.num_parameters():,}" in out
    code, out, _ = run_cli(capsys, "generate", "--model", tmp_path / "tiny", "--prompt", "abc",
                           "--max-new-tokens", "5", "--ignore-eos")
    assert code == 0
    # --prompt-ids gives the same tokens as the Python API
    code, out, _ = run_cli(capsys, "generate", "--model", tmp_path / "tiny", "--prompt-ids", "5,6,7",
                           "--max-new-tokens", "4", "--ignore-eos")
    want = elasticlm.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4)[0, 3:].tolist()
    assert out.strip() == ",".join(map(str, want))


def test_generate_with_subnet_file(tmp_path, capsys):
    model, src = saved_model(tmp_path)
    subnet = Subnet.uniform(model.config, hidden_size=16, mamba_heads_per_group=1)
    (tmp_path / "s.json").write_text(json.dumps(subnet.to_dict()))
    code, out, _ = run_cli(capsys, "generate", "--model", src, "--prompt-ids", "4,5", "--max-new-tokens", "3",
                           "--subnet", tmp_path / "s.json", "--ignore-eos")
    want = elasticlm.generate(extract(model, subnet), torch.tensor([[4, 5]]), max_new_tokens=3)[0, 2:].tolist()
    assert code == 0 and out.strip() == ",".join(map(str, want))
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 999, "layers": subnet.to_dict()["layers"]}))
    code, _, err = run_cli(capsys, "generate", "--model", src, "--prompt-ids", "4", "--subnet", tmp_path / "bad.json")
    assert code == 2 and "hidden_size=999" in err


def test_cli_errors_have_no_traceback_in_a_real_process(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "elasticlm.cli", "generate", "--model", str(tmp_path / "broken"),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,needle", [
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--top-p", "0"], "top-p"),
    (["--temperature", "-1"], "temperature"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_generate_rejects_bad_options(tmp_path, capsys, extra, needle):
    _, src = saved_model(tmp_path)
    code, _, err = run_cli(capsys, "generate", "--model", src, "--prompt-ids", "4", *extra)
    assert code == 2 and needle in err and err.count("\n") == 1


def test_tokenizer_travels_with_conversion_and_loads_in_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    assert run_cli(capsys, "init", tmp_path / "m", "--preset", "tiny")[0] == 0
    assert run_cli(capsys, "convert", tmp_path / "m", tmp_path / "hf", "--to", "hf")[0] == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("héllo wörld")["input_ids"]
    assert tok.decode(ids) == "héllo wörld"
    assert tok.eos_token_id == elasticlm.load(tmp_path / "hf").config.eos_token_id
