"""Serving every budget from one elastic checkpoint vs loading the separate extracted models.

    python bench/bench_deploy.py                 # ≈ 6 min on 2 CPU cores; JSON: docs/bench/deploy.json

A ~100 M-parameter Nano-shaped model (random weights: memory and speed do not depend on training)
gets routing metadata for budgets 1.0 / 0.75 / 0.5 from the router's budget fit, exactly as
`elasticlm train` writes it, and every budget is extracted with `elasticlm extract`. Then:

* resident memory (peak RSS of a fresh process, minus that of a process that only imports torch
  and elasticlm) of (a) loading the elastic checkpoint once and decoding with every budget,
  (b) loading the three extracted models and decoding with each; and the paper's framing, the
  nested family vs separate models of the two largest budgets;
* greedy decode tokens/s at batch 1 of every budget, nested and extracted, as ratios to the full
  model's decode speed, measured alternately in one process. Nested and extracted models are both
  loaded for serving (``elasticlm.load(..., serving=True)``: projections in the decoding layout, see
  elasticlm/model/serving.py); "training-layout views" is the elastic checkpoint loaded plainly
  (row-major, as trained), and the full model's speed in that layout is reported as well.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(pattern="M-M*-M-M-M*-", vocab_size=8192, hidden_size=1024, mamba_num_heads=32, mamba_head_dim=64,
              mamba_n_groups=4, ssm_state_size=64, chunk_size=128, num_attention_heads=16, num_key_value_heads=4,
              attention_head_dim=64, intermediate_size=4096)

PROBE = """
import sys, torch, elasticlm
torch.set_num_threads(2)
mode, paths = sys.argv[1], sys.argv[2:]
ids = torch.tensor([[5, 6, 7, 8]])
if mode in ("nested", "nested-views"):
    d = elasticlm.Deployment.load(paths[0], serving=mode == "nested")
    for b in d.budgets:
        d.generate(ids, budget=b, max_new_tokens=4)
elif mode == "separate":
    models = [elasticlm.load(p, serving=True) for p in paths]
    for m in models:
        elasticlm.generate(m, ids, max_new_tokens=4)
# VmHWM: peak RSS of this program (ru_maxrss would include the forking parent's memory)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss(mode: str, paths: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *paths], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def round_robin(runs: dict, repeats: int) -> dict:
    """Seconds of every repeat of every run, executing them in turn ``repeats`` times (after one warm-up)."""
    for run in runs.values():
        run()
    times: dict = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return times


def per_repeat_ratios(samples: dict, a: tuple, b: tuple) -> list[float]:
    return sorted(x / y for x, y in zip(samples[a], samples[b], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default="docs/bench/deploy.json")
    args = ap.parse_args()
    import elasticlm
    from elasticlm import ModelConfig
    from elasticlm.elastic.deploy import extract_budgets
    from elasticlm.elastic.router import Router
    from elasticlm.elastic.space import ElasticConfig, ElasticSpace
    from elasticlm.model.hybrid import HybridLM
    from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer
    from elasticlm.train.elastic import ElasticStudent, save_elastic_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = ModelConfig.from_dict({**CONFIG, "depth_order": list(range(len(CONFIG["pattern"])))})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_tokenizer(byte_level_tokenizer(), tmp / "tok")
        model = HybridLM(cfg)
        space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.75, 0.5]))
        router = Router(space)
        router.fit_budgets(300, lr=1e-2)
        save_elastic_checkpoint(tmp / "elastic", ElasticStudent(model, router), space, tmp / "tok")
        views = elasticlm.Deployment.load(tmp / "elastic")  # nested, in the training layout (row-major)
        written = extract_budgets(views, list(views.budgets), tmp / "separate", "native")
        nested = elasticlm.Deployment.load(tmp / "elastic", serving=True)  # nested, in the decoding layout
        separate = {label: elasticlm.load(path, serving=True) for label, path, _ in written}
        full_rows = elasticlm.load(written[0][1])  # the full model in the training layout

        base = peak_rss("none", [])
        rss_nested = peak_rss("nested", [str(tmp / "elastic")]) - base
        rss_views = peak_rss("nested-views", [str(tmp / "elastic")]) - base
        rss_separate = peak_rss("separate", [str(p) for _, p, _ in written]) - base
        rss_two = peak_rss("separate", [str(p) for _, p, _ in written[:2]]) - base

        ids = torch.randint(0, cfg.vocab_size, (1, 32))
        n = args.new_tokens
        runs = {("full", "1.0"): lambda: elasticlm.generate(separate["1.0"], ids, max_new_tokens=n),
                ("full-rows", "1.0"): lambda: elasticlm.generate(full_rows, ids, max_new_tokens=n)}
        for label in nested.budgets:
            runs[("nested", label)] = lambda label=label: nested.generate(ids, budget=label, max_new_tokens=n)
            runs[("views", label)] = lambda label=label: views.generate(ids, budget=label, max_new_tokens=n)
            runs[("extracted", label)] = lambda label=label: elasticlm.generate(separate[label], ids,
                                                                                  max_new_tokens=n)
        # interleaved, so machine drift hits every run alike; the spread of the per-repeat ratio is reported
        # because this shared machine's speed varies by tens of percent between minutes
        samples = round_robin(runs, args.repeats)
        times = {k: statistics.median(v) for k, v in samples.items()}
        full_s = times[("full", "1.0")]
        rows = []
        for label in nested.budgets:
            t_nested, t_sep = times[("nested", label)], times[("extracted", label)]
            ratios = per_repeat_ratios(samples, ("nested", label), ("extracted", label))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            view_ratios = per_repeat_ratios(samples, ("views", label), ("extracted", label))
            rows.append({"budget": label, "parameters": separate[label].num_parameters(),
                         "nested_tok_s": n / t_nested, "extracted_tok_s": n / t_sep,
                         "views_tok_s": n / times[("views", label)],
                         "views_over_extracted_per_repeat_median": statistics.median(view_ratios),
                         "nested_speedup_vs_full": full_s / t_nested, "extracted_speedup_vs_full": full_s / t_sep,
                         "nested_over_extracted_time": t_nested / t_sep,
                         "nested_over_extracted_per_repeat_median": statistics.median(ratios),
                         "nested_over_extracted_per_repeat_iqr": [q1, q3]})
        owned = {t.untyped_storage().data_ptr() for t in (*nested.model.parameters(), *nested.model.buffers())}
        packed = nested.memo.nbytes(owned)  # the decode slices kept beyond the weights' own storage
    print(f"model: {nested.num_parameters():,} parameters, fp32, {torch.get_num_threads()} threads, "
          f"{platform.machine()}\n")
    print("| serving | resident memory (peak RSS − import baseline) | ratio to nested |")
    print("|---|---|---|")
    print(f"| one elastic checkpoint, all 3 budgets (decoding layout) | {rss_nested / 2**20:,.0f} MiB | 1.00 |")
    print(f"| one elastic checkpoint, all 3 budgets (training layout) | {rss_views / 2**20:,.0f} MiB | "
          f"{rss_views / rss_nested:.2f} |")
    print(f"| 3 extracted models | {rss_separate / 2**20:,.0f} MiB | {rss_separate / rss_nested:.2f} |")
    print(f"| 2 extracted models (1.0 + 0.75; the paper's 42 GB case) | {rss_two / 2**20:,.0f} MiB | "
          f"{rss_two / rss_nested:.2f} |")
    print(f"\nnested model: {packed / 2**20:,.0f} MiB of memoised grouped-prefix copies after decoding every "
          "budget (included in its resident memory above)")
    print(f"\ndecode, batch 1, {ids.shape[1]}-token prompt + {n} new tokens; full model "
          f"{n / full_s:.1f} tok/s in the decoding layout, {n / times[('full-rows', '1.0')]:.1f} tok/s in the "
          "training layout\n")
    print("| budget | parameters | nested tok/s | extracted tok/s | nested ÷ full speed | extracted ÷ full speed | "
          "nested time ÷ extracted (median of per-repeat ratios, IQR) | training-layout nested ÷ extracted |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['parameters']:,} | {r['nested_tok_s']:.1f} | {r['extracted_tok_s']:.1f} | "
              f"{r['nested_speedup_vs_full']:.2f}x | {r['extracted_speedup_vs_full']:.2f}x | "
              f"{r['nested_over_extracted_per_repeat_median']:.3f} ({r['nested_over_extracted_per_repeat_iqr'][0]:.3f}–"
              f"{r['nested_over_extracted_per_repeat_iqr'][1]:.3f}) | "
              f"{r['views_over_extracted_per_repeat_median']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "rss_nested": rss_nested,
                                           "rss_separate": rss_separate, "rss_two_largest": rss_two,
                                           "rss_nested_views": rss_views,
                                           "full_tok_s": n / full_s,
                                           "full_training_layout_tok_s": n / times[("full-rows", "1.0")],
                                           "packed_bytes": packed, "rows": rows},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
