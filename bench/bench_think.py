"""Think small, answer big on an elastic checkpoint: exact-match accuracy and time of the synthetic tasks when
the smallest budget writes the reasoning trace and the full model the answer (from ``A:`` on), against each
budget alone.

    python bench/bench_think.py [--checkpoint runs/demo/elastic/final] [--n 40] [--think 0.5] [--answer 1.0]

Greedy decoding, the prompts of a family and length decoded as one batch (as `elasticlm eval` does); time is
wall-clock for all families, in this process, one configuration after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo" / "elastic" / "final"))
    ap.add_argument("--n", type=int, default=40, help="examples per family")
    ap.add_argument("--think", default="0.5")
    ap.add_argument("--answer", default="1.0")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "think.json"))
    args = ap.parse_args()

    import torch

    import elasticlm
    from elasticlm.data import synthetic
    from elasticlm.eval.tasks import task_accuracy
    from elasticlm.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    deployment = elasticlm.Deployment.load(args.checkpoint, serving=True)
    model = deployment.model
    tok = load_tokenizer(args.checkpoint)
    think, answer = (deployment.labels(b)[0] for b in (args.think, args.answer))
    budgets = deployment.budgets
    configs = [(f"{think} alone", budgets[think], None), (f"{answer} alone", budgets[answer], None),
               (f"{think} → {answer}", budgets[answer], budgets[think])]
    rows = []
    print(f"{args.checkpoint}: {args.n} examples per family, default difficulty, greedy\n")
    print("| configuration | " + " | ".join(synthetic.FAMILIES) + " | mean | seconds |")
    print("|---|" + "---|" * (len(synthetic.FAMILIES) + 2))
    for name, subnet, thinker in configs:
        t0 = time.perf_counter()
        acc = {f: task_accuracy(model, tok, f, None, args.n, subnet, think=thinker) for f in synthetic.FAMILIES}
        seconds = time.perf_counter() - t0
        mean = sum(acc.values()) / len(acc)
        rows.append({"configuration": name, "accuracy": acc, "mean": mean, "seconds": seconds})
        print(f"| {name} | " + " | ".join(f"{100 * acc[f]:.0f} %" for f in synthetic.FAMILIES)
              + f" | {100 * mean:.1f} % | {seconds:.1f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/bench_think.py " + " ".join(sys.argv[1:]),
                               "checkpoint": args.checkpoint, "n": args.n, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
