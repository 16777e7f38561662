"""The GPU part of scripts/gpu_check.sh: bf16 training-step and decode speed of a ~1B-parameter Nano-shaped
model, and `elasticlm plan` held against the GPU's measured peak memory. Writes one JSON.

    python bench/gpu_bench.py --out runs/gpu_check/gpu_bench.json [--preset nano-1b] [--quick]

On a machine without CUDA it runs the same code on the CPU with a tiny model (``--device cpu``), so the
script itself is tested everywhere; only a CUDA run's figures are GPU results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from elasticlm import HybridLM, ModelConfig, generate
from elasticlm.config import Subnet, count_parameters, preset
from elasticlm.model.documents import document_ids_from_eos
from elasticlm.train.losses import kd_loss_from_hidden, teacher_hidden
from elasticlm.train.plan import GiB, peak_of, stage_memory

# Nemotron Nano V2 12B's proportions at ~1.1B parameters (its vocabulary, head sizes and group structure).
NANO_1B = dict(pattern="M-M-M*-M-M-M*-M-M-M*-", vocab_size=131072, hidden_size=2048, mamba_num_heads=64,
               mamba_head_dim=64, mamba_n_groups=8, ssm_state_size=128, chunk_size=128, num_attention_heads=16,
               num_key_value_heads=4, attention_head_dim=128, intermediate_size=8192)
EOS = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def packed(rows: int, t: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, t + 1), generator=g)
    ids[torch.rand(rows, t + 1, generator=g) < 1 / 400] = EOS
    return ids.to(device)


def elastic_step(student: HybridLM, teacher: HybridLM, opt: torch.optim.Optimizer, ids: torch.Tensor,
                 subnet: Subnet | None, amp: bool) -> float:
    inputs, keep = ids[:, :-1], torch.ones(ids.shape[0], ids.shape[1] - 1, device=ids.device)
    doc = document_ids_from_eos(inputs, EOS)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            target = teacher_hidden(teacher, inputs, doc)
        loss = student(inputs, subnet, document_ids=doc,
                       head=lambda h, w: kd_loss_from_hidden(h, w, *target, keep))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def measure_step(cfg: ModelConfig, device: torch.device, rows: int, t: int, ckpt: bool, amp: bool, steps: int,
                 subnet: Subnet | None = None) -> dict:
    """Peak memory and tokens/s of elastic steps (teacher bf16 under amp, student fp32 + AdamW)."""
    torch.manual_seed(0)
    student = HybridLM(cfg, device=device)
    teacher = HybridLM(cfg, device=device, dtype=torch.bfloat16 if amp else torch.float32).requires_grad_(False)
    student.activation_checkpointing = ckpt
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = packed(rows, t, cfg.vocab_size, device)
    times = []
    for i in range(steps):
        if i == steps - 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        t0 = time.perf_counter()
        elastic_step(student, teacher, opt, ids, subnet, amp)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    # the plan counts the models, gradients and optimizer too: add what was allocated before the step
    measured = (peak + base) if peak is not None else None
    items = stage_memory(cfg, seq_len=t, micro_batch=rows, world=1, sharded=False, amp=amp, checkpointing=ckpt,
                         teacher=True, grad_accum=1, subnet=subnet, dense_mask=device.type == "cpu",
                         scan_chunk=cfg.mamba.chunk_size if device.type == "cuda" else min(cfg.mamba.chunk_size, 32))
    plan = peak_of(items, 1, ckpt)
    del student, teacher, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "seq_len": t, "checkpointing": ckpt, "bf16": amp,
            "tok_s": rows * t / statistics.median(times[1:] or times), "measured_peak_bytes": measured,
            "plan_peak_bytes": plan, "measured_over_plan": measured / plan if measured else None}


def measure_decode(cfg: ModelConfig, device: torch.device, amp: bool, new_tokens: int) -> dict:
    model = HybridLM(cfg, device=device, dtype=torch.bfloat16 if amp else torch.float32).eval()
    prompt = packed(1, 64, cfg.vocab_size, device)[:, :64]
    generate(model, prompt, max_new_tokens=4)
    sync(device)
    t0 = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens)
    sync(device)
    return {"batch": 1, "prompt": 64, "new_tokens": new_tokens, "tok_s": new_tokens / (time.perf_counter() - t0),
            "dtype": "bfloat16" if amp else "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check/gpu_bench.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps and shorter sequences")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = ModelConfig.from_dict(NANO_1B) if cuda else preset("tiny")
    cfg.depth_order = list(range(cfg.num_layers))
    steps = 3 if args.quick else 5
    result: dict = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                    "torch": torch.__version__, "parameters": count_parameters(cfg), "model": "nano-1b" if cuda
                    else "tiny (CPU smoke run: not a GPU result)", "train": [], "decode": []}
    lengths = [(4, 4096, False), (1, 16384, True), (1, 49152, True)] if cuda else [(2, 256, False), (1, 512, True)]
    if args.quick:
        lengths = lengths[:2]
    for rows, t, ckpt in lengths:
        r = measure_step(cfg, device, rows, t, ckpt, amp=cuda, steps=steps)
        result["train"].append(r)
        print(json.dumps(r), flush=True)
    half = Subnet(cfg.hidden_size * 3 // 4, Subnet.full(cfg).layers)
    r = measure_step(cfg, device, *lengths[0][:2], False, amp=cuda, steps=steps, subnet=half)
    r["subnet"] = "hidden 3/4"
    result["train"].append(r)
    print(json.dumps(r), flush=True)
    for amp in ((True, False) if cuda else (False,)):
        r = measure_decode(cfg, device, amp, 128 if cuda else 16)
        result["decode"].append(r)
        print(json.dumps(r), flush=True)
    if cuda:
        result["max_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GiB
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
