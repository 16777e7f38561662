"""Held-out perplexity of model directories on the same windows, in transformers and in elasticlm.

    python bench/real_parent.py --data held_out.txt --seq-len 256 --windows 32 \
        parent=runs/smollm2 zero-shot-0.5=runs/smollm2-pruned-0.5 elastic-0.5=runs/smollm2-family/budget-0.5

The windows are fixed before any model runs: the file's tokens (the first model's tokenizer; every directory must
share it) preceded by EOS, cut into ``--windows`` windows of ``--seq-len + 1`` tokens spread evenly over the
whole file. Each model's loss is the mean next-token cross-entropy over every window's ``--seq-len`` targets,
computed by transformers' own class (``AutoModelForCausalLM``, where the directory is a Hugging Face one) and by
elasticlm (``elasticlm.load``), so the table also shows that both engines agree. Prints a markdown table and
writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def windows(text: str, tokenizer_dir: Path, seq_len: int, n: int, eos: int) -> torch.Tensor:
    from tokenizers import Tokenizer

    ids = [eos] + Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text).ids
    span = seq_len + 1
    if len(ids) < span * n:
        raise SystemExit(f"error: the file holds {len(ids)} tokens, fewer than {n} windows of {span}")
    starts = [round(i * (len(ids) - span) / max(1, n - 1)) for i in range(n)]
    return torch.tensor([ids[s:s + span] for s in starts])


@torch.no_grad()
def mean_nll(forward, rows: torch.Tensor, batch: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        logits = forward(x[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="LABEL=DIR, the first one's tokenizer cuts the windows")
    ap.add_argument("--data", required=True, help="the held-out text file, used whole")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import elasticlm

    torch.manual_seed(0)
    pairs = [m.split("=", 1) for m in args.models]
    first = Path(pairs[0][1])
    eos = json.loads((first / "config.json").read_text())
    eos = eos.get("eos_token_id", eos.get("model", {}).get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    rows = windows(Path(args.data).read_text(), first, args.seq_len, args.windows, eos)
    print(f"{args.data}: {rows.numel() - len(rows):,} target tokens in {len(rows)} windows of {args.seq_len}")
    results = []
    for label, d in pairs:
        d = Path(d)
        row = {"label": label, "dir": str(d)}
        t0 = time.perf_counter()
        model = elasticlm.load(d).eval()
        row["parameters"] = model.num_parameters()
        row["elasticlm_loss"] = mean_nll(lambda x, m=model: m(x), rows, args.batch)
        row["elasticlm_s"] = time.perf_counter() - t0
        del model
        if "elasticlm_format" not in json.loads((d / "config.json").read_text()):
            from transformers import AutoModelForCausalLM

            t0 = time.perf_counter()
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            row["transformers_loss"] = mean_nll(lambda x, m=hf: m(x, use_cache=False).logits, rows, args.batch)
            row["transformers_s"] = time.perf_counter() - t0
            del hf
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | parameters | held-out ppl (elasticlm) | held-out ppl (transformers) |")
    print("|---|---|---|---|")
    for r in results:
        hf = f"{math.exp(r['transformers_loss']):.2f}" if "transformers_loss" in r else "— (native)"
        print(f"| {r['label']} | {r['parameters']:,} | {math.exp(r['elasticlm_loss']):.2f} | {hf} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "seq_len": args.seq_len, "windows": args.windows,
                                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
