"""Hold `elasticlm plan`'s memory model against measured peak memory of real elastic training steps on CPU.

    python bench/bench_plan.py [--quick] [--out docs/bench/plan.json]

Each configuration (model size × sequence length × budget × activation checkpointing) runs in a fresh
process (bench/step_probe.py: teacher + student + router + AdamW, three full steps, the last measured);
its measured peak is compared with the plan's peak for the same model, rows, sequence length and the
Subnet the router chose. Prints a markdown table; the acceptance bar is |measured / plan − 1| ≤ 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from elasticlm.config import ModelConfig, Subnet, preset
from elasticlm.train.plan import peak_of, stage_memory

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

WIDE = dict(pattern="M-M*-M-", vocab_size=8192, hidden_size=512, mamba_num_heads=16, mamba_head_dim=64,
            mamba_n_groups=2, ssm_state_size=64, num_attention_heads=8, num_key_value_heads=2,
            attention_head_dim=64, intermediate_size=1536, chunk_size=64)

CONFIGS = [  # (label, model, seq_len, rows, budget, checkpointing); budget None = a pretraining step
    ("demo", "demo", 512, 4, 0, False),
    ("demo", "demo", 2048, 1, 0, False),
    ("demo", "demo", 2048, 1, 0, True),
    ("demo", "demo", 4096, 1, 2, False),
    ("demo", "demo", 4096, 1, 2, True),
    ("wide", WIDE, 1024, 2, 0, False),
    ("wide", WIDE, 1024, 2, 0, True),
    ("wide", WIDE, 2048, 1, 1, False),
    ("wide", WIDE, 4096, 1, 1, True),
    ("demo", "demo", 2048, 2, None, False),
    ("wide", WIDE, 4096, 1, None, True),
]


def probe(spec: dict, pythonpath: str | None = None) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=pythonpath or str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_probe.py"), json.dumps(spec)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"step_probe failed for {spec}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def planned(cfg: ModelConfig, seq_len: int, rows: int, checkpointing: bool, subnet: Subnet, teacher: bool = True
            ) -> tuple[float, dict]:
    items = stage_memory(cfg, seq_len=seq_len, micro_batch=rows, world=1, sharded=False, amp=False,
                         checkpointing=checkpointing, teacher=teacher, grad_accum=1, subnet=subnet,
                         scan_chunk=min(cfg.mamba.chunk_size, 32), dense_mask=True)
    return peak_of(items, 1, checkpointing), items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the first three configurations only")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N configurations")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "plan.json"))
    args = ap.parse_args()
    rows_out = []
    print("| model | params | seq_len × rows | budget | checkpointing | measured MiB | plan MiB | measured/plan |")
    print("|---|---|---|---|---|---|---|---|")
    for label, model, seq_len, rows, budget, ckpt in (CONFIGS[:3] if args.quick else CONFIGS)[args.skip:]:
        spec = {"seq_len": seq_len, "rows": rows, "budget": budget or 0, "checkpointing": ckpt,
                "pretrain": budget is None}
        spec.update({"preset": model} if isinstance(model, str) else {"model": model})
        r = probe(spec)
        cfg = preset(model) if isinstance(model, str) else ModelConfig.from_dict(model)
        plan, items = planned(cfg, seq_len, rows, ckpt, Subnet.from_dict(r["subnet"]), teacher=budget is not None)
        ratio = r["peak_bytes"] / plan
        rows_out.append({"model": label, "parameters": r["parameters"], "seq_len": seq_len, "rows": rows,
                         "budget": budget, "checkpointing": ckpt, "measured_bytes": r["peak_bytes"],
                         "plan_bytes": plan, "ratio": ratio, "plan_items": items})
        print(f"| {label} | {r['parameters'] / 1e6:.1f} M | {seq_len} × {rows} | "
              f"{'pretrain' if budget is None else budget} | {'on' if ckpt else 'off'} "
              f"| {r['peak_bytes'] / MiB:,.0f} | {plan / MiB:,.0f} | {ratio:.3f} |", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows_out)
    print(f"\nworst |measured/plan - 1| = {worst:.1%} over {len(rows_out)} configurations")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python bench/bench_plan.py", "rows": rows_out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
