"""`elasticlm plan`: the memory model against independent counts, and the command's behaviour."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import random_subnet, randomize_, tiny_config

from elasticlm import HybridLM
from elasticlm.cli import main
from elasticlm.config import preset
from elasticlm.model.documents import document_ids_from_eos
from elasticlm.train.plan import GiB, Precision, activation_bytes, parse_bytes, stage_memory

EOS = 2


def _saved_bytes(model: HybridLM, ids: torch.Tensor, subnet=None) -> int:
    """Bytes autograd keeps for backward (unique storages, parameters excluded): the reference."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(ids, subnet, document_ids=document_ids_from_eos(ids, EOS), head=lambda h, w: h)
    return sum(seen.values())


@pytest.mark.parametrize("pattern,hidden,heads,head_dim,groups", [("M-*M", 48, 6, 12, 3), ("*-M-", 80, 4, 24, 1),
                                                                 ("MM*-", 40, 10, 8, 5)])
def test_saved_activations_match_autograd_on_shapes_outside_the_fit(pattern, hidden, heads, head_dim, groups):
    cfg = tiny_config(pattern, hidden=hidden, heads=heads, head_dim=head_dim, groups=groups, chunk=16, vocab_size=96)
    model = HybridLM(cfg)
    ids = torch.randint(3, 96, (2, 600), generator=torch.Generator().manual_seed(0))
    ids[:, ::150] = EOS
    subnet = random_subnet(cfg, random.Random(5))
    for sn in (None, subnet):
        measured = _saved_bytes(model, ids, sn)
        planned = activation_bytes(cfg, sn, ids.numel(), Precision(), checkpointing=False, scan_chunk=16,
                                   dense_mask_len=600)["saved"]
        assert abs(planned / measured - 1) < 0.15, (sn, planned, measured)


def test_static_memory_is_the_exact_parameter_count_and_activations_scale_linearly():
    cfg = preset("demo")
    n = sum(p.numel() for p in HybridLM(cfg, device="meta").parameters())
    kw = dict(micro_batch=1, world=1, sharded=False, amp=False, teacher=True, grad_accum=1)
    a = stage_memory(cfg, seq_len=4096, checkpointing=False, **kw)
    assert a["student_weights"] == 4 * n and a["optimizer_adamw"] == 8 * n and a["teacher_weights"] == 4 * n
    b = stage_memory(cfg, seq_len=8192, checkpointing=False, **kw)
    assert 1.99 < b["activations"] / a["activations"] < 2.01
    c = stage_memory(cfg, seq_len=8192, checkpointing=True, **kw)
    assert c["activations"] < b["activations"] / 5
    sharded = stage_memory(cfg, seq_len=4096, checkpointing=False, **{**kw, "world": 8, "sharded": True})
    assert sharded["student_weights"] == 4 * n / 8 and sharded["communication"] > 0


def test_plan_the_paper_run_fits_on_8_h200(capsys):
    assert main(["plan", "--config", "configs/nano-12b-elastic.toml", "--gpus", "8", "--gpu-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    assert "fits." in out and "headroom" in out and "activations" in out and "estimates" in out.lower()
    assert main(["plan", "--config", "configs/nano-12b-elastic.toml", "--gpus", "8", "--gpu-memory", "141GB",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["world_size"] == 8 and plan["parallel"] == "fsdp"
    assert [s["seq_len"] for s in plan["stages"]] == [8192, 49152]
    assert all(s["activation_checkpointing"] for s in plan["stages"])  # auto: needed at this scale
    # against an independent count: the parameters of the architecture built on the meta device, and what FSDP2
    # over 8 ranks keeps of them (fp32 weights, grads, two AdamW moments; the frozen teacher in bf16)
    n = sum(p.numel() for p in HybridLM(preset("nemotron-nano-12b-v2"), device="meta").parameters())
    assert plan["parameters"] == n and 12.2e9 < n < 12.4e9  # Nemotron Nano V2 12B
    for stage in plan["stages"]:
        b = stage["breakdown_bytes"]
        assert (b["student_weights"], b["student_grads"], b["optimizer_adamw"], b["teacher_weights"]) == \
            (4 * n / 8, 4 * n / 8, 8 * n / 8, 2 * n / 8)
        assert 16 * n / 8 + 2 * n / 8 < stage["peak_bytes"] <= plan["peak_bytes"] < 141e9


def test_plan_says_what_to_turn_when_a_run_does_not_fit(capsys):
    rc = main(["plan", "--config", "configs/nano-12b-elastic.toml", "--gpus", "1", "--gpu-memory", "80GB",
               "--set", "train.parallel=ddp", "--checkpointing", "off"])
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out
    assert "activation checkpointing" in out and "fsdp" in out


@pytest.mark.parametrize("argv,message", [(["--gpu-memory", "lots"], "memory size"), (["--gpus", "0"], "--gpus"),
                                          (["--flops", "fast"], "FLOP/s")])
def test_plan_bad_input_is_one_line(argv, message, capsys):
    assert main(["plan", "--config", "configs/nano-12b-elastic.toml", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_plan_a_pretrain_config_on_this_cpu(capsys):
    assert main(["plan", "--config", "configs/demo-parent.toml", "--device", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kind"] == "pretrain" and plan["stages"][0]["breakdown_bytes"]["teacher_weights"] == 0
    assert plan["peak_bytes"] < 4 * GiB


def test_plan_refuses_multi_gpu_pretraining(capsys):
    assert main(["plan", "--config", "configs/demo-parent.toml", "--gpus", "8", "--gpu-memory", "80GB"]) == 2
    assert "one device" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("141GB") == 141e9 and parse_bytes("80GiB") == 80 * GiB and parse_bytes("2e9") == 2e9


def test_trainable_teacher_adds_what_autograd_keeps_for_the_full_budget():
    """distill.trainable_teacher: the full budget runs on every row with gradients before the sampled budgets. What
    that adds to a step (autograd's saved tensors, trainable minus frozen teacher, same rows and budgets) is the
    planner's extra activations plus the full budget's CE log-probabilities, within 10 %."""
    from elasticlm.elastic.router import Router
    from elasticlm.elastic.space import ElasticConfig, ElasticSpace
    from elasticlm.train.elastic import ElasticStudent, teacher_hidden

    cfg = tiny_config("M*-M-*", hidden=48, vocab_size=2048, chunk=16)
    model = randomize_(HybridLM(cfg), seed=1)
    student = ElasticStudent(model, Router(ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.5], depth=[1.0])),
                                           hidden=16))
    teacher = randomize_(HybridLM(cfg)).requires_grad_(False)
    rows, seq = 2, 256
    ids = torch.randint(3, 2048, (rows, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets, keep = ids[:, :-1], ids[:, 1:], torch.ones(rows, seq)
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}

    def saved(t) -> int:
        seen: dict[int, int] = {}

        def pack(x: torch.Tensor) -> torch.Tensor:
            if x.untyped_storage().data_ptr() not in params:
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            student(inputs, None, keep, t, targets, [0, 1], step=0, seed=0, scale=1.0, temperature=1.0,
                    kd_temperature=1.0, ce_weight=1.0, budget_weight=0.0, amp=None)
        return sum(seen.values())

    with torch.no_grad():
        hidden = teacher_hidden(teacher, inputs, None)
    measured = saved(None) - saved(hidden)
    kw = dict(seq_len=seq, micro_batch=rows, world=1, sharded=False, amp=False, checkpointing=False, grad_accum=1,
              scan_chunk=16, documents=False)
    plan_frozen = stage_memory(cfg, teacher=True, **kw)
    plan_trainable = stage_memory(cfg, teacher=False, trainable_teacher=True, **kw)
    planned = (plan_trainable["activations"] + plan_trainable["teacher_logits"]) - plan_frozen["activations"]
    assert abs(planned / measured - 1) < 0.1, (planned, measured)
    assert plan_trainable["teacher_weights"] == 0 and plan_frozen["teacher_weights"] > 0
