"""Zero-shot pruning of a trained parent: importance order vs random vs reversed order, and the
three depth metrics. Writes a markdown report (stdout) and a JSON record.

    python bench/bench_prune.py --parent runs/demo-parent/final      # ≈ 10 min on 2 CPU cores

For each order, the same architecture search (``elasticlm.elastic.prune.search``) picks the
75 % and 50 % models by validation loss; we then report each model's loss on a separate,
larger validation set and its exact-match accuracy on the synthetic tasks (default difficulty).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date

import torch

from elasticlm import load
from elasticlm.config import Subnet
from elasticlm.data.datasets import data_config_from_spec
from elasticlm.data.synthetic import FAMILIES
from elasticlm.demo import DEMO_ALIGN
from elasticlm.elastic.importance import Importance, calibration_batches, estimate
from elasticlm.elastic.prune import describe_subnet, search, subnet_loss
from elasticlm.elastic.reorder import reorder_
from elasticlm.eval.tasks import task_accuracy
from elasticlm.tokenizer import load_tokenizer


def permuted_scores(imp: Importance, how: str, seed: int = 0) -> Importance:
    """Scores whose order is ``importance`` (as measured), ``random`` or ``reversed``."""
    if how == "importance":
        return imp
    g = torch.Generator().manual_seed(seed)

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=g) if how == "random" else -t

    depth = list(imp.depth["iterative_mse"])
    if how == "random":
        depth = [depth[i] for i in torch.randperm(len(depth), generator=g).tolist()]
    else:
        depth = depth[::-1]
    return Importance(f(imp.hidden), [{k: f(v) for k, v in layer.items()} for layer in imp.layers],
                      {"iterative_mse": depth})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", required=True, help="trained parent model directory")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--depth-samples", type=int, default=16)
    ap.add_argument("--search-samples", type=int, default=16, help="validation sequences for the search")
    ap.add_argument("--report-samples", type=int, default=48, help="validation sequences for the report")
    ap.add_argument("--n", type=int, default=50, help="task examples per family")
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--json", default="docs/bench/prune.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    parent = load(args.parent)
    tok = load_tokenizer(args.parent)
    eos = parent.config.eos_token_id
    data = data_config_from_spec("synthetic")

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    start = time.perf_counter()
    imp = estimate(parent, calibration_batches(data, encode, eos, args.samples, args.seq_len, 8),
                   total_batches=-(-args.samples // 8), depth_batches=-(-args.depth_samples // 8), progress=True)
    calib_s = time.perf_counter() - start
    width_only = time.perf_counter()
    estimate(parent, calibration_batches(data, encode, eos, args.samples, args.seq_len, 8),
             total_batches=-(-args.samples // 8), metrics=(), progress=False)
    width_s = time.perf_counter() - width_only

    # losses count the trace and answer tokens (the prompts are random digits)
    val_data = data_config_from_spec("synthetic", mask_prompt=True)
    held_out = list(calibration_batches(val_data, encode, eos, args.search_samples + args.report_samples, 256, 8,
                                        "val", True))
    search_set, report_set = held_out[: args.search_samples // 8], held_out[args.search_samples // 8:]
    full_loss = subnet_loss(parent, None, report_set)
    full_acc = {f: task_accuracy(parent, tok, f, n=args.n) for f in FAMILIES}
    rows = [{"order": "—", "budget": 1.0, "parameters": parent.num_parameters(), "loss": full_loss,
             "acc": full_acc, "arch": "the parent"}]
    for how in ("importance", "random", "reversed"):
        model = copy.deepcopy(parent)
        reorder_(model, permuted_scores(imp, how))
        for b in (float(x) for x in args.budgets.split(",")):
            budget = round(b * parent.num_parameters())
            best, _ = search(model, budget, search_set, progress=False, align=DEMO_ALIGN)
            acc = {f: task_accuracy(model, tok, f, n=args.n, subnet=best.subnet) for f in FAMILIES}
            rows.append({"order": how, "budget": b, "parameters": best.parameters,
                         "loss": subnet_loss(model, best.subnet, report_set), "acc": acc,
                         "arch": describe_subnet(model.config, best.subnet)})
            print(f"{how:10s} {b:.2f}  loss {rows[-1]['loss']:.3f}  acc {sum(acc.values()) / len(acc):.1%}", flush=True)

    # depth metrics: which layers each drops first, and the loss after dropping k layers
    depth_rows = []
    for metric, order in imp.depth.items():
        losses = []
        for k in (1, 2, 3):
            losses.append(subnet_loss(parent, Subnet.uniform(parent.config, drop_layers=order[:k]), report_set))
        depth_rows.append({"metric": metric, "order": order, "loss_after_drop": losses})

    print(f"\n## Zero-shot pruning of `{args.parent}` ({parent.num_parameters():,} parameters)\n")
    print(f"Calibration: {args.samples} × {args.seq_len} tokens — width scores in {width_s:.0f} s, "
          f"width + all depth metrics ({args.depth_samples} sequences) in {calib_s:.0f} s.\n")
    print("| order | budget | parameters | val loss | " + " | ".join(FAMILIES) + " | mean | architecture |")
    print("|---" * (6 + len(FAMILIES)) + "|")
    for r in rows:
        mean = sum(r["acc"].values()) / len(r["acc"])
        print(f"| {r['order']} | {r['budget']:.2f} | {r['parameters']:,} | {r['loss']:.3f} | "
              + " | ".join(f"{100 * r['acc'][f]:.0f} %" for f in FAMILIES) + f" | {100 * mean:.1f} % | {r['arch']} |")
    print("\n| depth metric | layers, least important first | loss after dropping 1 / 2 / 3 layers |")
    print("|---|---|---|")
    for r in depth_rows:
        print(f"| {r['metric']} | {r['order']} | " + " / ".join(f"{x:.3f}" for x in r["loss_after_drop"]) + " |")
    with open(args.json, "w") as fh:
        json.dump({"date": str(date.today()), "machine": platform.platform(), "parent": args.parent,
                   "calibration_seconds": calib_s, "width_seconds": width_s, "rows": rows, "depth": depth_rows,
                   "args": vars(args)}, fh, indent=2)


if __name__ == "__main__":
    main()
