"""Greedy decode speed of model directories, elasticlm against transformers, in one process.

    python bench/real_parent_decode.py --prompt-tokens 64 --new-tokens 64 --batch 1 \
        parent=runs/smollm2-hf elastic-0.5=runs/smollm2-family/budget-0.5

Each directory must be a Hugging Face one (transformers loads it; elasticlm loads the same files). Both engines get
the same prompt ids, fp32, greedy, no EOS stop; the time is the whole ``generate`` call (prefill + decode) after
one warm-up call, median of ``--repeats``. Prints tokens/s per engine, their ratio, and whether the tokens agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="LABEL=DIR (Hugging Face directories)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    import elasticlm

    print(f"torch threads {torch.get_num_threads()}; prompt {args.prompt_tokens}, new {args.new_tokens}, "
          f"batch {args.batch}, fp32 greedy")
    print("| model | elasticlm tok/s | transformers tok/s | elasticlm ÷ transformers | same tokens |")
    print("|---|---|---|---|---|")
    for label, d in (m.split("=", 1) for m in args.models):
        d = Path(d)
        ours = elasticlm.load(d).eval()
        ids = torch.randint(3, ours.config.vocab_size, (args.batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))
        n = args.batch * args.new_tokens
        with torch.inference_mode():
            t_ours, a = timed(lambda m=ours, ids=ids: elasticlm.generate(m, ids, max_new_tokens=args.new_tokens),
                              args.repeats)
        del ours
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.inference_mode():
            t_hf, b = timed(lambda m=hf, ids=ids: m.generate(ids, max_new_tokens=args.new_tokens,
                                                    min_new_tokens=args.new_tokens, do_sample=False,
                                                    eos_token_id=None, pad_token_id=0), args.repeats)
        del hf
        print(f"| {label} | {n / t_ours:.1f} | {n / t_hf:.1f} | {t_hf / t_ours:.2f} | {torch.equal(a, b)} |",
              flush=True)


if __name__ == "__main__":
    main()
