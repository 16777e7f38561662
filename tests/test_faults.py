"""Bad input and faults, as a careless or unlucky user meets them, across the verbs.

Every case checks the same four things: a non-zero exit, a one-line message naming the problem (no
traceback), every file that existed before byte-identical, and no partial output left behind (nothing new
in the tree but what the case allows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from elasticlm.cli import main

PY = sys.executable


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too): path → content hash ("dir" for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def refused(root: Path, args: list[str], capsys, needle: str, allow_new: tuple[str, ...] = ()) -> str:
    """Run ``args``; assert the four properties; return the message."""
    before = tree(root)
    rc, err = cli(args, capsys)
    after = tree(root)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc not in (0, None), (args, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"changed or removed: {changed}"
    new = [k for k in after if k not in before and not k.startswith(allow_new)]
    assert not new, f"left behind: {new}"
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, an importance-ordered elastic checkpoint and some user files, built once."""
    root = tmp_path_factory.mktemp("faults")
    assert main(["init", str(root / "model"), "--preset", "tiny", "--set", "vocab_size=260"]) == 0
    from test_deploy import elastic_checkpoint

    elastic_checkpoint(root, name="elastic")
    (root / "notes").mkdir()
    (root / "notes" / "thesis.txt").write_text("three years of work\n")
    (root / "report.pdf").write_bytes(b"%PDF-1.4 precious")
    return root


@pytest.fixture
def w(world, tmp_path):
    """A fresh copy of the world for cases that may write."""
    dst = tmp_path / "w"
    shutil.copytree(world, dst, symlinks=True)
    return dst


# -- 1. one output-path policy: nothing replaced without --force, and never an input or a file -------------


def write_verbs(w: Path, out: Path) -> dict[str, list[str]]:
    """Every verb that writes, pointed at ``out``."""
    data = w / "corpus.txt"
    if not data.exists():
        data.write_text("\n\n".join(f"document {i} about nothing much" for i in range(50)))
    elastic_cfg = w / "elastic.json5"
    elastic_cfg.write_text(json.dumps({"parent": {"path": str(w / "elastic")}, "elastic": {"budgets": [1.0, 0.7]},
                                       "train": {"out": str(out), "steps": 2}}))
    pre_cfg = w / "pre.json5"
    pre_cfg.write_text(json.dumps({"model": {"preset": "tiny", "vocab_size": 260},
                                   "train": {"out": str(out), "steps": 2, "batch_size": 2, "seq_len": 16}}))
    return {
        "init": ["init", str(out), "--preset", "tiny"],
        "convert": ["convert", str(w / "model"), str(out), "--to", "native"],
        "extract": ["extract", "--checkpoint", str(w / "elastic"), "--budget", "0.7", "--out", str(out)],
        "importance": ["importance", "--model", str(w / "model"), "--out", str(out), "--samples", "2",
                       "--seq-len", "16", "--depth-samples", "1", "--no-progress"],
        "reorder": ["reorder", "--model", str(w / "model"), "--importance", str(w / "notes"), "--out", str(out)],
        "prune": ["prune", "--model", str(w / "elastic"), "--budget", "0.7", "--out", str(out)],
        "eval": ["eval", "--checkpoint", str(w / "model"), "--n", "1", "--tasks", "add", "--out", str(out)],
        "tokenizer": ["tokenizer", "train", "--path", str(data), "--vocab-size", "300", "--out", str(out)],
        "pretrain": ["pretrain", "--config", str(pre_cfg), "--no-progress"],
        "train": ["train", "--config", str(elastic_cfg), "--no-progress"],
        "demo": ["demo", "--quick", "--out", str(out), "--no-progress"],
    }


VERBS = ["init", "convert", "extract", "importance", "reorder", "prune", "eval", "tokenizer", "pretrain", "train",
         "demo"]


@pytest.mark.parametrize("verb", VERBS)
def test_no_verb_replaces_an_existing_directory_without_force(w, verb, capsys):
    out = w / "notes"  # the user's own folder
    refused(w, write_verbs(w, out)[verb], capsys, str(out) if verb not in ("pretrain", "train") else "other files")


@pytest.mark.parametrize("verb", ["init", "convert", "extract", "tokenizer", "eval"])
def test_force_never_replaces_a_regular_file_or_a_foreign_directory(w, verb, capsys):
    refused(w, write_verbs(w, w / "report.pdf")[verb] + ["--force"], capsys, "is a file")
    refused(w, write_verbs(w, w / "notes")[verb] + ["--force"], capsys, "does not look like")


def test_importance_out_is_the_model_itself_is_refused_even_with_force(w, capsys):
    args = ["importance", "--model", str(w / "model"), "--out", str(w / "model"), "--force", "--samples", "2"]
    refused(w, args, capsys, "is the input")


def test_convert_into_a_folder_that_holds_the_source_is_refused(w, capsys):
    refused(w, ["convert", str(w / "model"), str(w), "--to", "native", "--force"], capsys, "holds the input")


def test_reorder_onto_its_importance_input_is_refused(w, capsys):
    refused(w, ["reorder", "--model", str(w / "model"), "--importance", str(w / "elastic"), "--out",
                str(w / "elastic"), "--force"], capsys, "is the input")


def test_output_under_a_regular_file(w, capsys):
    refused(w, ["init", str(w / "report.pdf" / "model"), "--preset", "tiny"], capsys, "is a file")


def test_output_through_a_dangling_symlink(w, capsys):
    (w / "link").symlink_to(w / "gone" / "deeper")
    refused(w, ["init", str(w / "link"), "--preset", "tiny"], capsys, "does not exist")


def test_symlinked_output_is_followed_and_said(w, capsys, caplog):
    (w / "target").mkdir()
    (w / "link").symlink_to(w / "target")
    assert main(["init", str(w / "link"), "--preset", "tiny"]) == 0
    assert (w / "target" / "config.json").is_file() and (w / "link").is_symlink()
    assert any("is a symlink" in r.message for r in caplog.records)


def test_force_replaces_what_the_verb_wrote(w, capsys):
    assert main(["init", str(w / "m2"), "--preset", "tiny"]) == 0
    before = (w / "m2" / "model.safetensors").read_bytes()
    assert main(["init", str(w / "m2"), "--preset", "tiny", "--seed", "3", "--force"]) == 0
    assert (w / "m2" / "model.safetensors").read_bytes() != before
    assert not [p for p in w.iterdir() if p.name.startswith(".m2.")]  # no temp or lock left


# -- 2. race-free publishing, crashed writers, clean-up ---------------------------------------------------


def test_a_writer_holding_the_lock_turns_the_second_away(w, capsys):
    from elasticlm.outputs import _host

    (w / ".m3.lock").write_text(f"{_host()} {os.getpid()}\n")  # a live writer: this process
    msg = refused(w, ["init", str(w / "m3"), "--preset", "tiny"], capsys, "is being written by")
    assert str(os.getpid()) in msg


def test_two_racing_writers_exactly_one_wins(w):
    """Two `convert` processes to one new directory, started together: one succeeds, the other gets one line,
    and the directory holds one complete model."""
    out = w / "raced"
    procs = [subprocess.Popen([PY, "-m", "elasticlm", "convert", str(w / "model"), str(out), "--to", "native"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(out) in err
    import elasticlm

    elasticlm.load(out)
    assert not [p for p in w.iterdir() if p.name.startswith(".raced.")]


SLOW_SAVE = """
import sys, time
import elasticlm.checkpoint as ck
real = ck.write_model_files
def slow(model, directory, *a, **k):
    real(model, directory, *a, **k)
    print("written", flush=True)
    time.sleep(60)
ck.write_model_files = slow
from elasticlm.cli import main
sys.exit(main(["init", sys.argv[1], "--preset", "tiny"]))
"""


def test_kill_9_during_a_save_leaves_nothing_and_the_next_writer_cleans_up(w, capsys, caplog):
    out = w / "killed"
    p = subprocess.Popen([PY, "-c", SLOW_SAVE, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    leftovers = [q.name for q in w.iterdir() if q.name.startswith(".killed.")]
    assert any(".tmp-" in n for n in leftovers) and ".killed.lock" in leftovers
    assert main(["init", str(out), "--preset", "tiny"]) == 0  # the dead writer's lock does not block
    assert not [q for q in w.iterdir() if q.name.startswith(".killed.")]
    assert any("no longer running" in r.message for r in caplog.records)


def test_an_interrupted_training_checkpoint_is_cleaned_when_the_run_resumes(tmp_path, capsys, caplog):
    cfg = tmp_path / "pre.json"
    cfg.write_text(json.dumps({"model": {"preset": "tiny", "vocab_size": 260},
                               "train": {"out": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "seq_len": 16,
                                         "checkpoint_every": 1, "dtype": "float32", "tensorboard": False},
                               "eval": {"tasks": False}}))
    assert main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    stale = tmp_path / "run" / "checkpoints" / ".step_0000003.tmp-somehost-999999-abcdef12"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    from elasticlm.outputs import _host

    mine = tmp_path / "run" / "checkpoints" / f".step_0000003.tmp-{_host()}-999999-abcdef12"
    shutil.copytree(stale, mine)
    assert main(["pretrain", "--config", str(cfg), "--no-progress", "--resume", "--set", "train.steps=3"]) == 0
    assert not mine.exists() and stale.exists()  # only this host's dead writers are provably gone
    assert any("no longer running" in r.message for r in caplog.records)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only; the test is skipped where mounting is not allowed)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_the_previous_model(tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        (small / "old").mkdir()
        (small / "old" / "config.json").write_text("{}")
        refused(small, ["init", str(small / "old"), "--preset", "demo", "--force"], capsys, "No space left on device")


def test_read_only_location_is_one_line(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        refused(ro, ["init", str(ro / "m"), "--preset", "tiny"], capsys, "cannot write")


# -- 3. resume compatibility --------------------------------------------------------------------------------


def elastic_run(root: Path, **elastic) -> Path:
    cfg = root / "run.json"
    cfg.write_text(json.dumps({
        "parent": {"path": str(root / "elastic")},
        "elastic": {"budgets": [1.0, 0.7], "router_init_steps": 20, **elastic},
        "train": {"out": str(root / "run"), "dtype": "float32", "checkpoint_every": 1, "tensorboard": False,
                  "eval_every": 100, "val_batches": 1},
        "eval": {"tasks": False},
        "stages": [{"seq_len": 16, "batch_size": 2, "tokens": 64}]}))
    return cfg


def test_resume_under_changed_budgets_is_refused_naming_the_field(w, capsys):
    assert main(["train", "--config", str(elastic_run(w)), "--no-progress"]) == 0
    changed = elastic_run(w, budgets=[1.0, 0.5])
    msg = refused(w, ["train", "--config", str(changed), "--no-progress", "--resume"], capsys, "elastic.budgets")
    assert "--allow-config-change" in msg
    assert "0.7 (params" in msg and "0.5 (params" in msg  # the budgets as the user wrote them, not only counts
    # the same budgets in other spellings are the same budgets: the resume goes ahead
    same = elastic_run(w, budgets=["100%", "70%"])
    assert main(["train", "--config", str(same), "--no-progress", "--resume"]) == 0
    # a deliberate change goes ahead with the switch, and says what changed
    assert main(["train", "--config", str(changed), "--no-progress", "--resume", "--allow-config-change"]) == 0


def test_the_same_budget_twice_is_refused(w, capsys):
    refused(w, ["train", "--config", str(elastic_run(w, budgets=[1.0, 0.5, "50%"])), "--no-progress"], capsys,
            "same budget")


def test_a_failed_run_leaves_no_output_directory(w, capsys):
    (w / "elastic" / "tokenizer.json").unlink()
    refused(w, ["train", "--config", str(elastic_run(w)), "--no-progress"], capsys, "tokenizer.json")


def test_train_out_that_is_a_file(w, capsys):
    refused(w, ["train", "--config", str(elastic_run(w)), "--no-progress", "--out", str(w / "report.pdf")], capsys,
            "is a file")


# -- 4. inputs validated at the edge ------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["generate", "--model", "M", "--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
    (["generate", "--model", "M", "--prompt", "x", "--temperature", "nan"], "finite"),
    (["generate", "--model", "M", "--prompt", "x", "--top-p", "0"], "> 0.0"),
    (["eval", "--checkpoint", "M", "--batch-size", "0"], "at least 1"),
    (["importance", "--model", "M", "--out", "o", "--seq-len", "-5"], "at least 1"),
    (["plan", "--config", "C", "--gpus", "two"], "expected an integer"),
    (["nonsense"], "invalid choice"),
    (["serve", "--checkpoint", "M", "--port", "99999"], "at most 65535"),
])
def test_cli_numbers_are_checked(w, args, needle, capsys):
    args = [str(w / "model") if a == "M" else str(w / "run.json") if a == "C" else a for a in args]
    refused(w, args, capsys, needle)


def test_prompt_with_invalid_utf8_is_refused_clearly(w, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 byte in argv
    refused(w, ["generate", "--model", str(w / "model"), "--prompt", bad], capsys, "not valid UTF-8")
    refused(w, ["generate", "--model", str(w / "model"), "--prompt", "a\ud800b"], capsys, "cannot be encoded")


@pytest.mark.parametrize("patch,needle", [
    ({"elastic": {"budgets": [1.0, float("nan")]}}, "finite"),
    ({"distill": {"temperature": float("inf")}}, "finite float"),
    ({"train": {"betas": ["a", "b"]}}, "list of float"),
    ({"train": {"activation_checkpointing": "maybe"}}, "true or false"),
    ({"stages": [{"seq_len": 16, "batch_size": 2, "tokens": 64, "budget_weights": "uniform"}]}, "budget_weights"),
    ({"data": {"task_weights": {"add": "lots"}}}, "task_weights"),
])
def test_config_fields_of_the_wrong_type_or_not_finite(w, patch, needle, capsys):
    cfg = json.loads(elastic_run(w).read_text())
    for k, v in patch.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    (w / "bad.json").write_text(json.dumps(cfg).replace("NaN", "NaN").replace("Infinity", "Infinity"))
    refused(w, ["train", "--config", str(w / "bad.json"), "--no-progress"], capsys, needle, allow_new=("bad.json",))


def test_a_binary_data_file_names_the_file_and_offset(w, capsys):
    (w / "blob.txt").write_bytes(b"fine text\n\n" + bytes(range(256)))
    cfg = json.loads(elastic_run(w).read_text())
    cfg["data"] = {"source": "text", "path": str(w / "blob.txt")}
    (w / "bin.json").write_text(json.dumps(cfg))
    msg = refused(w, ["train", "--config", str(w / "bin.json"), "--no-progress"], capsys, "blob.txt")
    assert "offset" in msg


def test_a_sequence_longer_than_the_data_is_refused_not_repeated(w, capsys):
    (w / "short.txt").write_text("\n\n".join(f"short document {i}" for i in range(20)))
    cfg = json.loads(elastic_run(w).read_text())
    cfg["data"] = {"source": "text", "path": str(w / "short.txt"), "val_fraction": 0.5, "separator": "\n\n"}
    cfg["stages"][0]["seq_len"] = 4096
    (w / "long.json").write_text(json.dumps(cfg))
    refused(w, ["train", "--config", str(w / "long.json"), "--no-progress"], capsys, "fewer than one batch")


def test_a_run_too_large_for_memory_is_refused_before_allocating(w, capsys):
    cfg = json.loads(elastic_run(w).read_text())
    cfg["stages"][0] = {"seq_len": 2_000_000, "batch_size": 64, "tokens": 2_000_000 * 64}
    cfg["train"]["activation_checkpointing"] = False
    (w / "huge.json").write_text(json.dumps(cfg))
    refused(w, ["train", "--config", str(w / "huge.json"), "--no-progress"], capsys, "GiB")


@pytest.mark.parametrize("verb", ["importance", "eval"])
def test_a_forward_too_large_for_memory_is_refused(w, verb, capsys):
    big = ["--seq-len", "50000000", "--batch-size", "64"]
    args = {"importance": ["importance", "--model", str(w / "model"), "--out", str(w / "imp"), "--no-progress"],
            "eval": ["eval", "--checkpoint", str(w / "model"), "--tasks", "ppl", "--out", str(w / "ev")]}[verb]
    refused(w, args + big, capsys, "GiB")


# -- 5. corrupt inputs ----------------------------------------------------------------------------------------


def test_truncated_weights(w, capsys):
    f = w / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(w, ["generate", "--model", str(w / "model"), "--prompt", "hi"], capsys, "model")


def test_elastic_json_with_a_non_integer_width(w, capsys):
    meta = json.loads((w / "elastic" / "elastic.json").read_text())
    meta["budgets"][1]["subnet"]["hidden_size"] = 12.5
    (w / "elastic" / "elastic.json").write_text(json.dumps(meta))
    refused(w, ["info", str(w / "elastic")], capsys, "hidden")


# -- 6. the last line of defence -------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_with_the_traceback_in_a_file(w, capsys, monkeypatch):
    import elasticlm.cli.models as verbs

    def boom(args):
        raise RuntimeError("a bug somewhere deep")

    monkeypatch.setattr(verbs, "cmd_info", boom)
    msg = refused(w, ["info", str(w / "model")], capsys, "unexpected RuntimeError: a bug somewhere deep")
    report = Path(msg.split("full traceback in ")[1].split(";")[0])
    assert "Traceback" in report.read_text() and "boom" in report.read_text()
    report.unlink()
    with pytest.raises(RuntimeError):
        main(["--debug", "info", str(w / "model")])


def test_the_output_is_checked_before_any_work(tmp_path, capsys):
    """init of the 12B preset into a non-empty folder is refused at once, not after building 12 B parameters."""
    (tmp_path / "x").write_text("")
    t0 = time.perf_counter()
    refused(tmp_path, ["init", str(tmp_path), "--preset", "nemotron-nano-12b-v2"], capsys, "already exists")
    assert time.perf_counter() - t0 < 30


# -- 5. inputs that used to escape as "unexpected" errors ---------------------------------------------------


def edited_config(w: Path, name: str, **fields) -> Path:
    """A copy of the world's model with ``fields`` of its config.json replaced."""
    dst = w / name
    shutil.copytree(w / "model", dst)
    raw = json.loads((dst / "config.json").read_text())
    for key, value in fields.items():  # "mamba.time_step_min": a field of a kind's section
        *section, name = key.split(".")
        (raw["model"][section[0]] if section else raw["model"])[name] = value
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("field,value,needle", [
    ("norm_eps", "1e-5", "norm_eps must be a finite number, got '1e-5'"),
    ("mamba.time_step_min", 0, "[model.mamba] time_step_min and time_step_max must satisfy 0 < min"),
])
def test_a_config_field_of_the_wrong_type_or_range_is_named(w, capsys, field, value, needle):
    model = edited_config(w, "edited", **{field: value})
    refused(w, ["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "1"], capsys, needle)
    refused(w, ["init", str(w / "new"), "--preset", "tiny", "--set", f"{field}={json.dumps(value)}"], capsys,
            field.rpartition(".")[2])


def test_a_tensor_of_the_wrong_dtype_is_named(w, capsys):
    from safetensors.torch import load_file, save_file

    dst = w / "ints"
    shutil.copytree(w / "model", dst)
    weights = load_file(dst / "model.safetensors")
    weights["embeddings.weight"] = weights["embeddings.weight"].to(torch.int32)
    save_file(weights, dst / "model.safetensors")
    refused(w, ["generate", "--model", str(dst), "--prompt", "x", "--max-new-tokens", "1"], capsys,
            "embeddings.weight is stored as int32")


def test_pretrain_that_fills_the_disk_leaves_no_run_directory(tmp_path, capsys):
    cfg = tmp_path / "pre.json"
    with tmpfs(tmp_path / "small", "size=256k") as small:
        cfg.write_text(json.dumps({
            "model": {"preset": "tiny"}, "tokenizer": {"kind": "bytes"}, "data": {"source": "synthetic"},
            "train": {"out": str(small / "run"), "steps": 2, "batch_size": 2, "seq_len": 32, "checkpoint_every": 1,
                      "eval_every": 100, "val_batches": 1, "tensorboard": False, "dtype": "float32"}}))
        refused(small, ["pretrain", "--config", str(cfg), "--no-progress"], capsys, "No space left on device")
        assert not (small / "run").exists()
