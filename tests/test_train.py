"""The parent trainer: exact resume, crash-safe checkpoints, config validation, schedule."""

from __future__ import annotations

import json

import pytest
import torch

import elasticlm
from elasticlm import CheckpointError, ConfigError
from elasticlm.cli import main
from elasticlm.errors import OutputError
from elasticlm.train.checkpoint import latest
from elasticlm.train.config import load_run_config, run_config_from_tables
from elasticlm.train.pretrain import pretrain
from elasticlm.train.trainer import lr_at

TINY = {
    "model": dict(pattern="M*-M", vocab_size=260, hidden_size=32, mamba_num_heads=4, mamba_head_dim=8,
                  mamba_n_groups=2, ssm_state_size=8, chunk_size=16, num_attention_heads=2, num_key_value_heads=1,
                  attention_head_dim=16, intermediate_size=48),
    # float32 pinned: `auto` measures bf16 against fp32, and a busy machine could choose differently per run
    "train": dict(steps=6, batch_size=4, grad_accum=2, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1,
                  dtype="float32", eval_every=3, val_batches=2, checkpoint_every=3, keep_checkpoints=5,
                  tensorboard=False),
    "eval": dict(tasks=False),
}


def run_config(out, **train):
    tables = json.loads(json.dumps(TINY))
    tables["train"].update(out=str(out), **train)
    return run_config_from_tables(tables)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_continues_exactly(tmp_path, monkeypatch):
    pretrain(run_config(tmp_path / "straight"), progress=False)
    import elasticlm.train.trainer as trainer

    real = trainer.save_training_checkpoint

    def save_then_stop(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise KeyboardInterrupt  # the user presses Ctrl-C right after the step-3 checkpoint

    monkeypatch.setattr(trainer, "save_training_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain(run_config(tmp_path / "split"), progress=False)
    monkeypatch.setattr(trainer, "save_training_checkpoint", real)
    assert latest(tmp_path / "split").name == "step_0000003"
    pretrain(run_config(tmp_path / "split"), resume=True, progress=False)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    wa = elasticlm.load(tmp_path / "straight" / "final").state_dict()
    wb = elasticlm.load(tmp_path / "split" / "final").state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)


def test_crash_while_checkpointing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    import elasticlm.train.checkpoint as ck

    real = ck.save_file

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's optimizer file
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "save_file", flaky)
    with pytest.raises(OutputError, match="disk full"):  # one line, naming the path
        pretrain(run_config(out), progress=False)
    monkeypatch.setattr(ck, "save_file", real)
    found = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert found == ["step_0000003"]  # no half-written step_0000006, no temp dirs
    assert elasticlm.load(out / "checkpoints" / "step_0000003") is not None
    pretrain(run_config(out), resume=True, progress=False)
    assert latest(out).name == "step_0000006"


def test_resume_without_checkpoint_and_overwrite_protection(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        pretrain(run_config(tmp_path / "none"), resume=True, progress=False)
    pretrain(run_config(tmp_path / "r", steps=3), progress=False)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        pretrain(run_config(tmp_path / "r", steps=3), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by torchrun: refused before anything is written
    with pytest.raises(ConfigError, match="without torchrun"):
        pretrain(run_config(tmp_path / "ddp", steps=3), progress=False)
    assert not (tmp_path / "ddp").exists()


@pytest.mark.parametrize("tables,needle", [
    ({"train": {"lr": "fast"}}, "train.lr must be a finite float"),
    ({"train": {"stepz": 3}}, "unknown field"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"data": {"source": "web"}}, "data.source"),
    ({"optim": {}}, "unknown table"),
    ({"model": {"preset": "nope"}}, "unknown model preset"),
])
def test_bad_run_configs_name_the_field(tables, needle):
    base = json.loads(json.dumps(TINY))
    for k, v in tables.items():
        base[k] = {**base.get(k, {}), **v}
    with pytest.raises(ConfigError, match=needle):
        run_config_from_tables(base)


def test_overrides_and_toml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "tiny"\n[train]\nsteps = 5\n')
    run = load_run_config(f, ["train.lr=0.01", "model.hidden_size=48", 'data.source="synthetic"'])
    assert run.train.lr == 0.01 and run.model.hidden_size == 48 and run.train.steps == 5
    with pytest.raises(ConfigError, match="section.field=value"):
        load_run_config(f, ["lr=3"])
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="malformed"):
        load_run_config(tmp_path / "bad.toml")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = run_config("x", steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1).train
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_cli_pretrain_and_generate(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress",
                 "--set", "train.steps=3"]) == 0
    assert main(["generate", "--model", str(tmp_path / "o" / "final"), "--prompt", "Q: 1+2", "--max-new-tokens",
                 "4", "--ignore-eos"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "o" / "final"), "--n", "2"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("| model | budget | parameters | val loss | ppl | add (d3) |") and "recall (h10)" in header
    assert "| final | 1.0 |" in out and (tmp_path / "o" / "final-eval" / "eval.json").is_file()
    assert main(["pretrain", "--config", str(cfg), "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_cli_tokenizer_train(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"some text number {i} about tokens" for i in range(300)))
    assert main(["tokenizer", "train", "--path", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    from elasticlm.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode("some text").ids) == "some text" and tok.get_vocab_size() <= 300
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["tokenizer", "train", "--path", str(tmp_path / "empty"), "--out", str(tmp_path / "t2")]) == 2
    assert "no " in capsys.readouterr().err and not (tmp_path / "t2").exists()


def test_validation_loss_is_a_token_mean_like_the_elastic_trainers():
    """One definition for both trainers: a batch with fewer loss tokens weighs less (not a mean of batch means)."""
    from elasticlm.config import ModelConfig
    from elasticlm.model.hybrid import HybridLM
    from elasticlm.train.pretrain import validation_loss

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict({**TINY["model"], "eos_token_id": 0})).eval()
    tokens = [torch.randint(1, 260, (2, 17)) for _ in range(2)]
    masks = [torch.ones(2, 17, dtype=torch.bool), torch.zeros(2, 17, dtype=torch.bool)]
    masks[1][:, 12:] = True  # the second batch has 5 loss tokens per row, the first 16
    got = validation_loss(model, list(zip(tokens, masks, strict=True)), None, eos_token_id=None)
    total, count = 0.0, 0
    with torch.no_grad():
        for t, m in zip(tokens, masks, strict=True):
            for row in range(2):
                for pos in range(16):
                    if m[row, pos + 1]:
                        logits = model(t[row:row + 1, :pos + 1])[0, -1]
                        total += torch.nn.functional.cross_entropy(logits, t[row, pos + 1]).item()
                        count += 1
    assert count == 42 and got == pytest.approx(total / count, rel=1e-5)


def test_resume_reads_a_checkpoint_from_before_the_trainers_merged(tmp_path):
    """Pretrain checkpoints used to store one optimizer with unprefixed keys and a list of param groups."""
    from safetensors.torch import load_file, save_file

    pretrain(run_config(tmp_path / "straight"), progress=False)
    old = tmp_path / "old"
    pretrain(run_config(old, steps=6), progress=False)
    ckpt = old / "checkpoints" / "step_0000003"
    for later in (old / "checkpoints").glob("step_*"):
        if later.name != ckpt.name:
            import shutil

            shutil.rmtree(later)
    tensors = load_file(ckpt / "optimizer.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, ckpt / "optimizer.safetensors")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["param_groups"] = state["param_groups"]["model"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    pretrain(run_config(old), resume=True, progress=False)
    assert losses(old) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


def test_resume_records_of_every_earlier_layout_of_the_model_config_still_match(tmp_path):
    """A pretraining checkpoint records the architecture flat (`mamba_num_heads`, `moe_top_k`, …) as configs were
    written before kinds kept sections. Records written when every field was flat, and those written while the MoE
    settings were a section but Mamba's still flat (no `moe_*` keys), both resume; a real change is still named."""
    from elasticlm.train.pretrain import _current_layout, compat_record
    from elasticlm.train.trainer import check_resume

    run = run_config_from_tables(TINY)
    record = compat_record(run)
    flat = dict(record["model"])
    assert flat["mamba_num_heads"] == 4 and flat["ssm_state_size"] == 8 and flat["moe_top_k"] == 2
    assert "mamba" not in flat and "moe" not in flat
    without_moe = {k: v for k, v in flat.items() if not k.startswith("moe_")}
    # and for a few hours a layout with the MoE settings nested under "sections" (the run config's dataclass dump)
    nested = without_moe | {"sections": {"moe": {"num_experts": 8, "top_k": 2}}}
    for i, model in enumerate((flat, without_moe, nested)):
        ckpt = tmp_path / f"c{i}"
        ckpt.mkdir()
        saved = record | {"model": model}  # as written back then
        (ckpt / "trainer_state.json").write_text(json.dumps({"compat": saved}))
        check_resume(ckpt, record, allow_change=False, normalize=_current_layout)
        changed = run_config_from_tables({**TINY, "model": {**TINY["model"], "mamba_n_groups": 4}})
        with pytest.raises(ConfigError, match="model.mamba_n_groups: 2 → 4"):
            check_resume(ckpt, compat_record(changed), allow_change=False, normalize=_current_layout)
