"""The paper's tables in miniature, on the parent that `elasticlm demo` trained (run it first).

    python bench/replicate.py demo     # the table `elasticlm demo` printed, with its timings
    python bench/replicate.py table1   # elastic vs Minitron-style (prune + KD per size) vs from scratch (≈ 35 min)
    python bench/replicate.py table3   # deployment memory: the nested family vs separate models (≈ 1 min)
    python bench/replicate.py table4   # stage 1 only vs stage 1 + 2, per budget (≈ 2 min)
    python bench/replicate.py table5   # uniform vs weighted stage-2 budget sampling (≈ 6 min)
    python bench/replicate.py all

Every table is written to its own section of docs/results.md (between ``<!-- tableN -->`` markers),
with the command, the date and the machine; the runs it trains go under ``--work`` and are reused
when they are complete (delete them to retrain). Accuracy: exact match of greedy generations on
``--n`` held-out prompts per task family; loss: the same 48 held-out sequences for every model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch

from elasticlm import load
from elasticlm.checkpoint import atomic_write_text
from elasticlm.config import PRESETS, ModelConfig, count_parameters
from elasticlm.data import synthetic
from elasticlm.data.datasets import data_config_from_spec
from elasticlm.demo import FULL, QUICK, Recipe, train_or_reuse
from elasticlm.eval.report import Entry, Point, evaluate_entries
from elasticlm.tokenizer import load_tokenizer
from elasticlm.train.config import elastic_run_config_from_tables, run_config_from_tables
from elasticlm.train.elastic import train_elastic
from elasticlm.train.pretrain import pretrain

SIZES = ("0.75", "0.5")


def demo_recipe(demo: Path) -> Recipe:
    """The recipe the demo in ``demo`` was made with (``--quick`` or not): the runs here must match it."""
    meta = json.loads((demo / "eval" / "eval.json").read_text())
    return QUICK if meta.get("demo") == "quick" else FULL


def stage_tokens(recipe_stages: list[dict]) -> int:
    return sum(s["tokens"] for s in recipe_stages)


def parent_tokens(recipe: Recipe) -> int:
    t = recipe.parent["train"]
    return t["steps"] * t["batch_size"] * t["seq_len"]


def write_section(results: Path, key: str, title: str, body: str, command: str) -> None:
    """Replace (or append) the ``key`` section of ``results``; the file is rewritten atomically."""
    header = ("# elasticlm: the paper's tables in miniature\n\nProduced by `bench/replicate.py` on the parent of "
              "`elasticlm demo` (see the README). Each section says how it was made.\n")
    text = results.read_text() if results.exists() else header
    stamp = (f"`{command}` — {date.today()}, {platform.platform()}, {torch.get_num_threads()} CPU threads, "
             f"torch {torch.__version__}")
    section = f"<!-- {key} -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- /{key} -->\n"
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->\n"
    if start in text:
        a = text.index(start)
        b = text.index(end, a) + len(end)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_text(results, text)
    print(f"\n{section}\nwrote section {key} of {results}")


def evaluate(entries: list[Entry], args, levels=("default",)) -> list[Point]:
    val = data_config_from_spec("synthetic", mask_prompt=True)
    return evaluate_entries(entries, families=synthetic.FAMILIES, levels=levels, n=args.n, val_data=val,
                            val_samples=48, log=lambda m: print(m, flush=True))


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


# -- the demo itself -------------------------------------------------------------------------------


def demo(args) -> None:
    """The table `elasticlm demo` printed, its timings, and the comparison with zero-shot pruning."""
    from elasticlm.demo import comparison_lines
    from elasticlm.eval.report import load_points, markdown_table

    d = Path(args.demo)
    points = load_points(d / "eval" / "eval.json")
    timings = json.loads((d / "eval" / "timings.json").read_text())
    steps = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items() if k != "total")
    meta = json.loads((d / "eval" / "eval.json").read_text())
    body = (f"`elasticlm demo` ({'--quick' if meta.get('demo') == 'quick' else 'full recipe'}): "
            f"**{timings['total'] / 60:.1f} min** in all ({steps}). n = {meta['n']} held-out prompts per task family "
            "and difficulty; loss on 48 held-out sequences.\n\n" + markdown_table(points) + "\n\n"
            + "\n".join(f"- {line}" for line in comparison_lines(points)))
    write_section(Path(args.results), "demo", "The demo: one elastic run, three sizes, vs zero-shot pruning", body,
                  "elasticlm demo  (then: python bench/replicate.py demo)")


# -- Table 1/2 -------------------------------------------------------------------------------------


def table1(args) -> None:
    demo, work = Path(args.demo), Path(args.work)
    recipe = demo_recipe(demo)
    ordered = demo / "parent-ordered"
    elastic_tokens = stage_tokens(recipe.elastic["stages"])
    runs: dict[str, dict[str, Path]] = {"kd": {}, "scratch": {}}
    for label in SIZES:
        pruned = demo / f"zero-shot-{label}"
        # Minitron-style: the zero-shot pruned model of this size, distilled from the parent on the
        # same stages (tokens) as the elastic run — once per size
        tabs = copy.deepcopy(recipe.elastic)
        tabs["parent"] = {"path": str(pruned)}
        tabs["distill"] = {"teacher": str(ordered)}
        tabs["elastic"] = {**tabs["elastic"], "budgets": [1.0], "depth": [1.0]}
        tabs["train"]["out"] = str(work / f"kd-{label}")
        for s in tabs["stages"]:
            s.pop("budget_weights", None)
        train_or_reuse(f"Minitron-style KD student {label}", work / f"kd-{label}",
                       elastic_run_config_from_tables(tabs), train_elastic, not args.no_progress, print)
        runs["kd"][label] = work / f"kd-{label}" / "final"
        # from scratch: the same architecture, randomly initialised, trained like the parent
        tabs = copy.deepcopy(recipe.parent)
        model = load(pruned).config.to_dict()
        model.pop("depth_order", None)
        tabs["model"] = model
        tabs["train"]["out"] = str(work / f"scratch-{label}")
        train_or_reuse(f"from-scratch model {label}", work / f"scratch-{label}", run_config_from_tables(tabs),
                       pretrain, not args.no_progress, print)
        runs["scratch"][label] = work / f"scratch-{label}" / "final"

    parent = load(ordered)
    tok = load_tokenizer(ordered)
    elastic = load(demo / "elastic" / "final")
    entries = [Entry("parent", "1.0", parent, tok)]
    entries += [Entry("elastic", label, elastic, tok, elastic.budgets[label]) for label in elastic.budgets]
    for label in SIZES:
        entries.append(Entry("zero-shot pruned", label, load(demo / f"zero-shot-{label}"), tok))
        entries.append(Entry("prune + KD", label, load(runs["kd"][label]), tok))
        entries.append(Entry("from scratch", label, load(runs["scratch"][label]), tok))
    points = {(p.series, p.budget): p for p in evaluate(entries, args)}

    def cell(series: str, label: str) -> str:
        p = points.get((series, label))
        return "–" if p is None else f"{pct(p.mean_accuracy())} / {p.val_loss:.3f}"

    rows = ["| size | parameters | elastic (one run) | prune + KD (Minitron-style) | from scratch | "
            "zero-shot pruned (no training) |", "|---|---|---|---|---|---|"]
    full = points[("elastic", "1.0")]
    rows.append(f"| 1.0 | {full.parameters:,} | {cell('elastic', '1.0')} | parent: {cell('parent', '1.0')} | "
                f"parent: {cell('parent', '1.0')} | – |")
    for label in SIZES:
        rows.append(f"| {label} | {points[('elastic', label)].parameters:,} | {cell('elastic', label)} | "
                    f"{cell('prune + KD', label)} | {cell('from scratch', label)} | "
                    f"{cell('zero-shot pruned', label)} |")
    p_tok = parent_tokens(recipe)
    rows.append(f"| **tokens** (beyond the parent's {p_tok / 1e6:.2f} M) | | **{elastic_tokens / 1e6:.2f} M** for "
                f"all sizes | **{len(SIZES) * elastic_tokens / 1e6:.2f} M** ({elastic_tokens / 1e6:.2f} M per size) | "
                f"**{len(SIZES) * p_tok / 1e6:.2f} M** ({p_tok / 1e6:.2f} M per size, no parent needed) | 0 |")
    body = ("Cells: mean exact-match accuracy over the four task families at the default difficulty / validation "
            f"loss (nats per trace+answer token). n = {args.n} prompts per family.\n\n" + "\n".join(rows) + "\n\n"
            "Elastic: `elasticlm demo`'s single run trained every size at once (the sizes are its router's "
            "choices). Prune + KD: the zero-shot pruned model of the same size (`elasticlm prune`'s search on the "
            "same importance order) distilled from the same parent with the same two stages and token count, "
            "once per size (`distill.teacher`). From scratch: the pruned architecture randomly initialised and "
            "trained like the parent.")
    (work / "table1.json").write_text(json.dumps({k[0] + ":" + k[1]: dataclasses.asdict(v) for k, v in points.items()},
                                                 indent=2) + "\n")
    write_section(Path(args.results), "table1", "Table 1/2 analogue: one elastic run vs prune + KD per size vs "
                  "from scratch", body, "python bench/replicate.py table1")


# -- Table 3 ---------------------------------------------------------------------------------------


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def table3(args) -> None:
    from elasticlm.elastic.router import Router
    from elasticlm.elastic.space import ElasticConfig, ElasticSpace

    demo = Path(args.demo)
    elastic = load(demo / "elastic" / "final")
    sizes = {label: count_parameters(elastic.config, s) for label, s in elastic.budgets.items()}
    labels = list(sizes)
    rows = ["| model family | budgets | nested (one checkpoint) | separate models, all budgets | separate, "
            "two largest (the paper's comparison) | ratio separate ÷ nested (all / two largest) |",
            "|---|---|---|---|---|---|"]
    nested, sep, two = sizes[labels[0]], sum(sizes.values()), sizes[labels[0]] + sizes[labels[1]]
    rows.append(f"| demo (trained, `elasticlm demo`) | {' / '.join(labels)} | {nested * 2 / 1e6:.2f} MB | "
                f"{sep * 2 / 1e6:.2f} MB | {two * 2 / 1e6:.2f} MB | {sep / nested:.2f} / {two / nested:.2f} |")
    cfg = ModelConfig(**PRESETS["nemotron-nano-12b-v2"])
    cfg.depth_order = list(range(cfg.num_layers))
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.75, 0.5]))
    router = Router(space)
    router.fit_budgets(300, lr=1e-2)
    big = [count_parameters(cfg, router.resolve(b)) for b in range(len(space.budgets))]
    rows.append(f"| Nemotron Nano V2 12B shape (router fitted to 12B / 9B / 6B, no training) | "
                f"{' / '.join(f'{n / 1e9:.2f} B' for n in big)} | {gib(big[0] * 2)} | {gib(sum(big) * 2)} | "
                f"{gib((big[0] + big[1]) * 2)} | {sum(big) / big[0]:.2f} / {(big[0] + big[1]) / big[0]:.2f} |")
    measured = ""
    deploy = Path("docs/bench/deploy.json")
    if deploy.exists():
        d = json.loads(deploy.read_text())
        measured = (f"\n\nMeasured resident memory (`python bench/bench_deploy.py`, a 98 M-parameter Nano-shaped "
                    f"model, fp32, serving and decoding every budget): nested {d['rss_nested'] / 2**20:,.0f} MiB vs "
                    f"three separate models {d['rss_separate'] / 2**20:,.0f} MiB "
                    f"({d['rss_separate'] / d['rss_nested']:.2f}×) vs the two largest "
                    f"{d['rss_two_largest'] / 2**20:,.0f} MiB ({d['rss_two_largest'] / d['rss_nested']:.2f}×); the "
                    "nested figure includes the decode-time copies of grouped weight prefixes (docs/deployment.md).")
    body = ("Weights in bf16 (2 bytes per parameter; exact parameter counts of the resolved sub-models). The paper "
            "reports 24 GB for the nested 12B checkpoint vs 42 GB for separate 12B + 9B models (1.75×).\n\n"
            + "\n".join(rows) + measured)
    write_section(Path(args.results), "table3", "Table 3 analogue: deployment memory", body,
                  "python bench/replicate.py table3")


def stage1_checkpoint(demo: Path) -> Path:
    """The demo's elastic run as it stood at the end of stage 1 (kept by the trainer)."""
    found = sorted((demo / "elastic" / "stages").glob("1-*"))
    if not found:
        sys.exit(f"error: {demo}/elastic/stages holds no stage-1 checkpoint; rerun `elasticlm demo --fresh`")
    return found[0]


# -- Table 4 ---------------------------------------------------------------------------------------


def longest_families(k: int = 2) -> list[str]:
    """The ``k`` task families with the longest examples (trace + answer, in bytes) at the default
    difficulty — the miniature's stand-in for the paper's long-reasoning benchmarks."""
    mean_len = {f: sum(len(ex.text) for ex in synthetic.eval_set(f, synthetic.DIFFICULTY[f][0], 50))
                for f in synthetic.FAMILIES}
    return sorted(mean_len, key=mean_len.get, reverse=True)[:k]


def table4(args) -> None:
    demo = Path(args.demo)
    stage1 = stage1_checkpoint(demo)
    tok = load_tokenizer(demo / "parent-ordered")
    models = {"stage 1 only": load(stage1), "stage 1 + stage 2": load(demo / "elastic" / "final")}
    entries = [Entry(name, label, m, tok, m.budgets[label]) for name, m in models.items() for label in m.budgets]
    points = {(p.series, p.budget): p for p in evaluate(entries, args, levels=("default", "hard"))}
    longest = longest_families()
    rows = ["| budget | " + " | ".join(f"{f}: stage 1 → 1+2" for f in longest) + " | longest mean: stage 1 → 1+2 | "
            "all tasks: stage 1 → 1+2 | hard (longer than trained): stage 1 → 1+2 | gain on the longest |",
            "|---" * (5 + len(longest)) + "|"]
    for label in models["stage 1 + stage 2"].budgets:
        a, b = points[("stage 1 only", label)], points[("stage 1 + stage 2", label)]
        la = sum(a.accuracy["default"][f] for f in longest) / len(longest)
        lb = sum(b.accuracy["default"][f] for f in longest) / len(longest)
        rows.append(f"| {label} | " + " | ".join(f"{pct(a.accuracy['default'][f])} → {pct(b.accuracy['default'][f])}"
                                                 for f in longest)
                    + f" | {pct(la)} → {pct(lb)} | {pct(a.mean_accuracy())} → {pct(b.mean_accuracy())} | "
                    f"{pct(a.mean_accuracy('hard'))} → {pct(b.mean_accuracy('hard'))} | {100 * (lb - la):+.1f} pt |")
    s = demo_recipe(demo).elastic["stages"]
    body = (f"The same elastic run (`elasticlm demo`) evaluated at the end of stage 1 (`{stage1.relative_to(demo)}`: "
            f"{s[0]['tokens'] / 1e6:.2f} M tokens at {s[0]['seq_len']} context, uniform budgets) and after stage 2 "
            f"(+{s[1]['tokens'] / 1e6:.2f} M tokens at {s[1]['seq_len']} context, budget weights "
            f"{s[1]['budget_weights']}). Longest tasks: {', '.join(longest)} (the longest traces at the default "
            f"difficulty). n = {args.n} per family and difficulty. Note that the learning rate at the end of stage 1 "
            "is still mid-schedule (one cosine spans both stages).\n\n" + "\n".join(rows))
    write_section(Path(args.results), "table4", "Table 4 analogue: stage 1 vs stage 1 + 2 (long context)", body,
                  "python bench/replicate.py table4")


# -- Table 5 ---------------------------------------------------------------------------------------


def table5(args) -> None:
    demo, work = Path(args.demo), Path(args.work)
    stage1 = stage1_checkpoint(demo)
    out = work / "stage2-uniform"
    tabs = copy.deepcopy(demo_recipe(demo).elastic)
    tabs["parent"] = {"path": str(demo / "parent-ordered")}
    tabs["train"]["out"] = str(out)
    tabs["stages"][1]["budget_weights"] = None
    run = elastic_run_config_from_tables(tabs)
    if not (out / "final" / "config.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        print(f"training stage 2 with uniform budget sampling from {stage1} → {out}", flush=True)
        train_elastic(run, progress=not args.no_progress, resume_from=stage1)
    tok = load_tokenizer(demo / "parent-ordered")
    models = {"weighted 0.5/0.3/0.2": load(demo / "elastic" / "final"), "uniform": load(out / "final")}
    entries = [Entry(name, label, m, tok, m.budgets[label]) for name, m in models.items() for label in m.budgets]
    points = {(p.series, p.budget): p for p in evaluate(entries, args)}
    rows = ["| budget | weighted: accuracy / loss | uniform: accuracy / loss |", "|---|---|---|"]
    for label in models["uniform"].budgets:
        w, u = points[("weighted 0.5/0.3/0.2", label)], points[("uniform", label)]
        bold = "**" if label == "1.0" else ""
        rows.append(f"| {bold}{label}{bold} | {bold}{pct(w.mean_accuracy())} / {w.val_loss:.3f}{bold} | "
                    f"{bold}{pct(u.mean_accuracy())} / {u.val_loss:.3f}{bold} |")
    body = (f"Stage 2 run twice from the same stage-1 state (`{stage1.relative_to(demo)}`, identical data order): "
            "with the paper's weighted budget sampling (the demo's run) and with uniform sampling "
            "(`elasticlm train --resume-from`). The paper's claim concerns the full model (bold). "
            f"n = {args.n} per family.\n\n" + "\n".join(rows))
    write_section(Path(args.results), "table5", "Table 5 analogue: uniform vs weighted stage-2 budget sampling",
                  body, "python bench/replicate.py table5")


TABLES = {"demo": demo, "table1": table1, "table3": table3, "table4": table4, "table5": table5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=[*TABLES, "all"])
    ap.add_argument("--demo", default="runs/demo", help="the working directory of a finished `elasticlm demo`")
    ap.add_argument("--work", default="runs/replicate", help="where the extra training runs go")
    ap.add_argument("--results", default="docs/results.md")
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per task family")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if not (Path(args.demo) / "elastic" / "final").is_dir():
        sys.exit(f"error: {args.demo} holds no finished demo; run `elasticlm demo` first (or pass --demo)")
    torch.manual_seed(0)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for name in (list(TABLES) if args.table == "all" else [args.table]):
        start = time.perf_counter()
        TABLES[name](args)
        print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
