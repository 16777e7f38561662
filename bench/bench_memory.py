"""Peak memory of one elastic training step vs sequence length, and short-context speed vs an older checkout.

    python bench/bench_memory.py [--baseline-ref 35def50] [--out docs/bench/memory.json]

1. Memory: one elastic step (teacher + student + router + AdamW; document masking on, an EOS every
   ~300 tokens so every row packs many documents) on the demo-sized model at 2K, 4K, 8K and 16K tokens,
   with and without activation checkpointing; the peak must grow at most 2.2x per doubling.
   The baseline checkout (the code before the long-context work: a dense [t, t] document mask and
   whole-vocabulary KD logits) runs the same step where it fits.
2. Speed: tokens/s of the same step at 256, 512 and 1024 tokens (8, 4, 2 rows), this checkout vs the
   baseline checkout, interleaved, each in a fresh process.
Each measurement is bench/step_probe.py in its own process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_plan import ROOT, probe

MiB = 2**20


def worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="elasticlm-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True,
                   capture_output=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", default="35def50", help="git ref of the code to compare with")
    ap.add_argument("--baseline-max-seq", type=int, default=8192,
                    help="longest context the baseline runs (its dense mask and scores grow as t²)")
    ap.add_argument("--repeats", type=int, default=3, help="speed: interleaved repeats per length")
    ap.add_argument("--speed-only", action="store_true", help="skip part 1 (memory); keep its earlier figures")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "memory.json"))
    args = ap.parse_args()
    base = worktree(args.baseline_ref)
    result: dict = {"command": "python bench/bench_memory.py" + (f" --repeats {args.repeats}" if args.repeats != 3
                                                                 else ""), "baseline_ref": args.baseline_ref,
                    "memory": [], "speed": []}
    try:
        print("| seq_len | checkpointing | peak MiB | × previous | baseline peak MiB |")
        print("|---|---|---|---|---|")
        if args.speed_only and Path(args.out).exists():
            result["memory"] = json.loads(Path(args.out).read_text())["memory"]
        for ckpt in () if args.speed_only else (False, True):
            prev = None
            for t in (2048, 4096, 8192, 16384):
                spec = {"preset": "demo", "seq_len": t, "rows": 1, "checkpointing": ckpt, "steps": 2}
                peak = probe(spec)["peak_bytes"]
                old = probe(dict(spec, checkpointing=False), str(base))["peak_bytes"] \
                    if not ckpt and t <= args.baseline_max_seq else None
                growth = peak / prev if prev else None
                result["memory"].append({"seq_len": t, "checkpointing": ckpt, "peak_bytes": peak,
                                         "growth": growth, "baseline_peak_bytes": old})
                print(f"| {t} | {'on' if ckpt else 'off'} | {peak / MiB:,.0f} | "
                      f"{f'{growth:.2f}' if growth else '–'} | {f'{old / MiB:,.0f}' if old else '–'} |", flush=True)
                prev = peak
        print("\n| seq_len × rows | tok/s (this) | tok/s (baseline) | ratio (median of repeats) |")
        print("|---|---|---|---|")
        for t, rows in ((256, 8), (512, 4), (1024, 2)):
            spec = {"preset": "demo", "seq_len": t, "rows": rows, "steps": 4}
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(probe(spec)["tok_s"])
                theirs.append(probe(spec, str(base))["tok_s"])
            ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
            result["speed"].append({"seq_len": t, "rows": rows, "tok_s": ours, "baseline_tok_s": theirs,
                                    "ratio": ratio})
            print(f"| {t} × {rows} | {statistics.median(ours):,.0f} | {statistics.median(theirs):,.0f} | "
                  f"{ratio:.3f} |", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
