"""Elastic sub-models vs zero-shot pruned models of the same size, on the same held-out data.

    python bench/bench_elastic_quality.py --parent runs/demo-parent-ordered --elastic runs/demo-elastic/final

For every budget in the elastic checkpoint's ``elastic.json``: the zero-shot baseline is the
parent pruned to the same parameter count by ``elasticlm prune``'s search (importance order,
picked by validation loss on 16 held-out sequences); the elastic model is the budget's resolved
Subnet of the trained checkpoint. Both are scored on 48 other held-out sequences (loss on trace +
answer tokens) and by exact-match accuracy on ``--n`` held-out prompts per task family (default
difficulty, greedy). Writes a markdown table (stdout) and docs/bench/elastic_quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from elasticlm import load
from elasticlm.config import Subnet
from elasticlm.data.datasets import data_config_from_spec
from elasticlm.data.synthetic import FAMILIES
from elasticlm.demo import DEMO_ALIGN
from elasticlm.elastic.importance import calibration_batches
from elasticlm.elastic.prune import describe_subnet, search, subnet_loss
from elasticlm.eval.tasks import task_accuracy
from elasticlm.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", required=True, help="the importance-ordered parent the elastic run started from")
    ap.add_argument("--elastic", required=True, help="elastic checkpoint (final/ of `elasticlm train`)")
    ap.add_argument("--n", type=int, default=100, help="task examples per family")
    ap.add_argument("--search-samples", type=int, default=16)
    ap.add_argument("--report-samples", type=int, default=48)
    ap.add_argument("--json", default="docs/bench/elastic_quality.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    parent, elastic = load(args.parent), load(args.elastic)
    meta = json.loads((Path(args.elastic) / "elastic.json").read_text())
    tok = load_tokenizer(args.parent)
    eos = parent.config.eos_token_id
    val = data_config_from_spec("synthetic", mask_prompt=True)
    held_out = list(calibration_batches(val, lambda s: tok.encode(s).ids, eos,
                                        args.search_samples + args.report_samples, 256, 8, "val", True))
    search_set, report_set = held_out[: args.search_samples // 8], held_out[args.search_samples // 8:]

    def score(model, subnet):
        acc = {f: task_accuracy(model, tok, f, n=args.n, subnet=subnet) for f in FAMILIES}
        return subnet_loss(model, subnet, report_set), acc

    rows = []
    loss, acc = score(parent, None)
    rows.append({"model": "parent", "budget": "1.0", "parameters": parent.num_parameters(), "loss": loss,
                 "acc": acc, "arch": "the parent"})
    for b in meta["budgets"]:
        subnet = Subnet.from_dict(b["subnet"])
        loss, acc = score(elastic, subnet)
        rows.append({"model": "elastic", "budget": b["budget"], "parameters": b["parameters"], "loss": loss,
                     "acc": acc, "arch": b["architecture"]})
        if b["parameters"] < parent.num_parameters():
            best, _ = search(parent, b["parameters"], search_set, progress=False, align=DEMO_ALIGN)
            loss, acc = score(parent, best.subnet)
            rows.append({"model": "zero-shot pruned", "budget": b["budget"], "parameters": best.parameters,
                         "loss": loss, "acc": acc, "arch": describe_subnet(parent.config, best.subnet)})
        print(f"budget {b['budget']} done", flush=True)

    print(f"\n## Elastic vs zero-shot pruned ({args.elastic}; parent {args.parent})\n")
    print("| model | budget | parameters | val loss | " + " | ".join(FAMILIES) + " | mean | architecture |")
    print("|---" * (6 + len(FAMILIES)) + "|")
    for r in rows:
        mean = sum(r["acc"].values()) / len(r["acc"])
        r["mean_acc"] = mean
        print(f"| {r['model']} | {r['budget']} | {r['parameters']:,} | {r['loss']:.3f} | "
              + " | ".join(f"{100 * r['acc'][f]:.0f} %" for f in FAMILIES) + f" | {100 * mean:.1f} % | {r['arch']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": str(date.today()), "machine": platform.platform(),
                                           "args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
