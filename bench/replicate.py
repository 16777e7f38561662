"""The paper's tables in miniature, on the parent that `elasticlm demo` trained (run it first).

    python bench/replicate.py demo     # the table `elasticlm demo` printed, with its timings
    python bench/replicate.py table1   # elastic vs Minitron-style (prune + KD per size) vs from scratch (≈ 35 min)
    python bench/replicate.py table3   # deployment memory: the nested family vs separate models (≈ 1 min)
    python bench/replicate.py table4   # stage 1 only vs stage 1 + 2 at equal tokens, per budget (≈ 12 min)
    python bench/replicate.py table5   # uniform vs weighted stage-2 budget sampling (≈ 6 min)
    python bench/replicate.py seeds --demos runs/demo runs/demo-seed1 runs/demo-seed2   # the spread
    python bench/replicate.py router   # the router's architectures vs the prune grid's vs random, 3 seeds
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
import random
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from elasticlm import Deployment, load
from elasticlm.checkpoint import atomic_write_text, read_config
from elasticlm.config import PRESETS, AttentionWidth, MambaWidth, MlpWidth, ModelConfig, count_parameters
from elasticlm.data import synthetic
from elasticlm.data.datasets import data_config_from_spec
from elasticlm.demo import DEMO_ALIGN, FULL, QUICK, Recipe, seeded, train_or_reuse
from elasticlm.elastic.space import LAYER_AXES
from elasticlm.eval.report import Entry, Point, evaluate_entries
from elasticlm.tokenizer import load_tokenizer
from elasticlm.train.config import elastic_run_config_from_tables, run_config_from_tables
from elasticlm.train.elastic import train_elastic
from elasticlm.train.pretrain import pretrain

SIZES = ("0.75", "0.5")


def demo_recipe(demo: Path) -> Recipe:
    """The recipe the demo in ``demo`` was made with (``--quick`` or not, its seed): the runs here must match it."""
    meta = json.loads((demo / "eval" / "eval.json").read_text())
    return seeded(QUICK if meta.get("demo") == "quick" else FULL, int(meta.get("seed", 0)))


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


def one_size(elastic_table: dict, pattern: str) -> dict:
    """The demo's ``[elastic]`` table for distilling one fixed architecture (a student of layer pattern
    ``pattern``): a single budget and one choice per axis, the student's own widths, so every step trains exactly
    that model; none of the demo's router settings (nothing to route; st would only add full-width mask compute)."""
    fixed = {"hidden": [1.0], "depth": [1.0]}
    fixed |= {axis: [1.0] for axis, (chars, _) in LAYER_AXES.items() if any(c in pattern for c in chars)}
    router = ("router_mode", "router_init_steps", "heterogeneous")  # the demo's router settings
    kept = {k: v for k, v in elastic_table.items() if k not in router and k not in fixed}
    return {**kept, **fixed, "budgets": [1.0]}


def table1(args) -> None:
    demo, work = Path(args.demo), Path(args.work)
    recipe = demo_recipe(demo)
    ordered = demo / "parent-ordered"
    elastic_tokens = stage_tokens(recipe.elastic["stages"])
    runs: dict[str, dict[str, Path]] = {"kd": {}, "scratch": {}}
    for label in SIZES:
        pruned = demo / f"zero-shot-{label}"
        pruned_config = read_config(pruned)[0]
        # Minitron-style: the zero-shot pruned model of this size, distilled from the parent on the
        # same stages (tokens) as the elastic run — once per size
        tabs = copy.deepcopy(recipe.elastic)
        tabs["parent"] = {"path": str(pruned)}
        tabs["distill"] = {"teacher": str(ordered)}
        tabs["elastic"] = one_size(tabs["elastic"], pruned_config.pattern)
        tabs["train"]["out"] = str(work / f"kd-{label}")
        for s in tabs["stages"]:
            s.pop("budget_weights", None)
        train_or_reuse(f"Minitron-style KD student {label}", work / f"kd-{label}",
                       elastic_run_config_from_tables(tabs), train_elastic, not args.no_progress, print)
        runs["kd"][label] = work / f"kd-{label}" / "final"
        # from scratch: the same architecture, randomly initialised, trained like the parent
        tabs = copy.deepcopy(recipe.parent)
        model = pruned_config.to_dict()
        model.pop("depth_order", None)
        tabs["model"] = model
        tabs["train"]["out"] = str(work / f"scratch-{label}")
        runs["scratch"][label] = work / f"scratch-{label}" / "final"
        if args.keep_scratch and (runs["scratch"][label] / "config.json").is_file():
            print(f"keeping the from-scratch model {label} of an earlier run (--keep-scratch)", flush=True)
            continue  # its architecture came from the earlier demo's sizes: the table says so
        train_or_reuse(f"from-scratch model {label}", work / f"scratch-{label}", run_config_from_tables(tabs),
                       pretrain, not args.no_progress, print)

    parent = load(ordered)
    tok = load_tokenizer(ordered)
    elastic = Deployment.load(demo / "elastic" / "final")
    entries = [Entry("parent", "1.0", parent, tok)]
    entries += [Entry("elastic", label, elastic.model, tok, elastic.budgets[label]) for label in elastic.budgets]
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
        scratch = cell("from scratch", label)
        n_scratch = points[("from scratch", label)].parameters
        if n_scratch != points[("zero-shot pruned", label)].parameters:  # kept from an earlier demo's sizes
            scratch += f" ({n_scratch:,} parameters)"
        rows.append(f"| {label} | {points[('elastic', label)].parameters:,} | {cell('elastic', label)} | "
                    f"{cell('prune + KD', label)} | {scratch} | {cell('zero-shot pruned', label)} |")
    p_tok = parent_tokens(recipe)
    rows.append(f"| **tokens** (beyond the parent's {p_tok / 1e6:.2f} M) | | **{elastic_tokens / 1e6:.2f} M** for "
                f"all sizes | **{len(SIZES) * elastic_tokens / 1e6:.2f} M** ({elastic_tokens / 1e6:.2f} M per size) | "
                f"**{len(SIZES) * p_tok / 1e6:.2f} M** ({p_tok / 1e6:.2f} M per size, no parent needed) | 0 |")
    body = ("Cells: mean exact-match accuracy over the four task families at the default difficulty / validation "
            f"loss (nats per trace+answer token). n = {args.n} prompts per family.\n\n" + "\n".join(rows) + "\n\n"
            "Elastic: `elasticlm demo`'s single run trained every size at once (the sizes are its router's "
            "choices). Prune + KD: the zero-shot pruned model of the same size (`elasticlm prune`'s search on the "
            "same importance order) distilled from the same parent with the same two stages and token count, "
            "once per size (`distill.teacher`), as Minitron does. From scratch: the pruned architecture randomly "
            "initialised and trained like the parent." + (
                " The elastic run's teachers differ: with `distill.trainable_teacher` (this recipe) its full budget "
                "keeps learning from the labels and teaches the smaller budgets as it improves, where prune + KD "
                "learns from the frozen parent only." if recipe.elastic.get("distill", {}).get("trainable_teacher")
                else ""))
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
    elastic = Deployment.load(demo / "elastic" / "final")
    sizes = {label: count_parameters(elastic.config, s) for label, s in elastic.budgets.items()}
    labels = list(sizes)
    rows = ["| model family | budgets | nested (one checkpoint) | separate models, all budgets | separate, "
            "two largest (the paper's comparison) | ratio separate ÷ nested (all / two largest) |",
            "|---|---|---|---|---|---|"]
    nested, sep, two = sizes[labels[0]], sum(sizes.values()), sizes[labels[0]] + sizes[labels[1]]
    rows.append(f"| demo (trained, `elasticlm demo`) | {' / '.join(labels)} | {nested * 2 / 1e6:.2f} MB | "
                f"{sep * 2 / 1e6:.2f} MB | {two * 2 / 1e6:.2f} MB | {sep / nested:.2f} / {two / nested:.2f} |")
    cfg = ModelConfig.from_dict(copy.deepcopy(PRESETS["nemotron-nano-12b-v2"]))
    cfg.depth_order = list(range(cfg.num_layers))
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.75, 0.5]))
    router = Router(space)
    router.fit_budgets(args.fit_steps, lr=1e-2)
    big = [count_parameters(cfg, router.resolve(b)) for b in range(len(space.budgets))]
    rows.append(f"| Nemotron Nano V2 12B shape (router fitted to 12B / 9B / 6B in {args.fit_steps} steps, "
                "no training) | "
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
    """Stage 2's gain at equal tokens: the demo's stage 1 + 2 against an elastic run that spends the same tokens
    on stage 1 alone (short context, uniform budgets), each with a learning-rate schedule that ends at its own
    last step; the demo's own stage-1 checkpoint (mid-schedule) is shown for reference."""
    demo, work = Path(args.demo), Path(args.work)
    recipe = demo_recipe(demo)
    stage1 = stage1_checkpoint(demo)
    s = recipe.elastic["stages"]
    out = work / "stage1-only"
    tabs = copy.deepcopy(recipe.elastic)
    tabs["parent"] = {"path": str(demo / "parent-ordered")}
    tabs["train"]["out"] = str(out)
    tabs["stages"] = [{**s[0], "tokens": stage_tokens(s)}]
    train_or_reuse("stage-1-only elastic run (the demo's tokens, short context)", out,
                   elastic_run_config_from_tables(tabs), train_elastic, not args.no_progress, print)
    tok = load_tokenizer(demo / "parent-ordered")
    names = ("stage 1, mid-schedule", "stage 1 only", "stage 1 + 2")
    models = dict(zip(names, (Deployment.load(stage1), Deployment.load(out / "final"),
                              Deployment.load(demo / "elastic" / "final")), strict=True))
    entries = [Entry(name, label, d.model, tok, d.budgets[label]) for name, d in models.items() for label in d.budgets]
    points = {(p.series, p.budget): p for p in evaluate(entries, args, levels=("default", "hard"))}
    longest = longest_families()

    def longest_mean(p: Point) -> float:
        return sum(p.accuracy["default"][f] for f in longest) / len(longest)

    def cells(label: str, get) -> str:
        return " → ".join(get(points[(n, label)]) for n in names)

    rows = ["| budget | " + " | ".join(f"{f}" for f in longest) + " | longest mean | all tasks | hard (longer than "
            "trained) | val loss | stage 2's gain on the longest (equal tokens) |", "|---" * (6 + len(longest)) + "|"]
    for label in models["stage 1 + 2"].budgets:
        a, b = points[("stage 1 only", label)], points[("stage 1 + 2", label)]
        columns = [*(lambda p, f=f: pct(p.accuracy["default"][f]) for f in longest),
                   lambda p: pct(longest_mean(p)), lambda p: pct(p.mean_accuracy()),
                   lambda p: pct(p.mean_accuracy("hard")), lambda p: f"{p.val_loss:.3f}"]
        rows.append(f"| {label} | " + " | ".join(cells(label, get) for get in columns)
                    + f" | {100 * (longest_mean(b) - longest_mean(a)):+.1f} pt |")
    body = (f"Cells: {' → '.join(names)}. \"stage 1 + 2\": the demo's run ({s[0]['tokens'] / 1e6:.2f} M tokens at "
            f"{s[0]['seq_len']} context with uniform budgets, then {s[1]['tokens'] / 1e6:.2f} M at {s[1]['seq_len']} "
            f"with budget weights {s[1]['budget_weights']}). \"stage 1 only\": a second elastic run from the same "
            f"ordered parent that spends the same {stage_tokens(s) / 1e6:.2f} M tokens at {s[0]['seq_len']} context "
            "with uniform budgets; both learning-rate schedules end at their own last step, so the difference is the "
            "long-context stage, not the learning rate. \"stage 1, mid-schedule\": the demo's checkpoint at the end "
            f"of its stage 1 (`{stage1.relative_to(demo)}`, learning rate still mid-cosine), for reference. Longest "
            f"tasks: {', '.join(longest)} (the longest traces at the default difficulty). n = {args.n} per family and "
            "difficulty.\n\n" + "\n".join(rows))
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
    # reused only when it is stage 2 of this very recipe from this very stage-1 state (a rerun demo replaces it)
    source = json.loads(json.dumps({"run": run.to_dict(), "stage1": str(stage1.resolve()),
                                    "stage1_mtime": (stage1 / "config.json").stat().st_mtime}))
    marker = work / "stage2-uniform.source.json"
    same = marker.is_file() and json.loads(marker.read_text()) == source
    if not (same and (out / "final" / "config.json").is_file()):
        if out.exists():
            shutil.rmtree(out)
        print(f"training stage 2 with uniform budget sampling from {stage1} → {out}", flush=True)
        train_elastic(run, progress=not args.no_progress, resume_from=stage1)
        atomic_write_text(marker, json.dumps(source, indent=2) + "\n")
    tok = load_tokenizer(demo / "parent-ordered")
    models = {"weighted 0.5/0.3/0.2": Deployment.load(demo / "elastic" / "final"),
              "uniform": Deployment.load(out / "final")}
    entries = [Entry(name, label, d.model, tok, d.budgets[label]) for name, d in models.items() for label in d.budgets]
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


# -- Router: learned vs grid vs random architectures (issue 19) -----------------------------------

# the router's own choices under two recipes (docs/elastic.md): the default (hard gates after a 300-step
# budget-only warm start) and the straight-through mask estimator after a 20-step warm start
ROUTER_RECIPES = {"learned, hard": {"router_mode": "hard", "router_init_steps": 300},
                  "learned, st": {"router_mode": "st", "router_init_steps": 20}}
ROUTER_AXES = {"heterogeneous": ["ffn"]}


def random_subnet(space, target: float, rng: random.Random, tolerance: float = 0.01, tries: int = 200_000):
    """A random point of the router's space (every axis and per-layer slot drawn uniformly and
    independently) whose cost is within ``tolerance`` of ``target``, by rejection."""
    for _ in range(tries):
        sub = space.subnet({a.name: [rng.randrange(a.n_choices) for _ in range(a.n_slots)] for a in space.axes})
        if abs(space.cost_of(sub) / target - 1) <= tolerance:
            return sub
    sys.exit(f"error: no random architecture within {tolerance:.0%} of {target:,.0f} in {tries} draws")


def short_arch(config: ModelConfig, subnet) -> str:
    """hidden · Mamba heads/group × head dim · query heads per KV head · FFN per MLP layer · dropped layers."""
    kept = [(i, w) for i, w in enumerate(subnet.layers) if w is not None]
    mamba = sorted({f"{w.heads_per_group}×{w.head_dim}" for _, w in kept if isinstance(w, MambaWidth)})
    attn = sorted({str(w.heads_per_kv_group) for _, w in kept if isinstance(w, AttentionWidth)})
    ffn = [str(w.intermediate_size) for _, w in kept if isinstance(w, MlpWidth)]
    dropped = [i for i, w in enumerate(subnet.layers) if w is None]
    return (f"h {subnet.hidden_size} · M {'/'.join(mamba)} · A {'/'.join(attn)} · F {'/'.join(ffn)}"
            + (f" · drop {dropped}" if dropped else ""))


def mean_spread(xs: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± sample std (min–max)`` of ``xs``, each value times ``scale``."""
    v = [x * scale for x in xs]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def router(args) -> None:
    from elasticlm.checkpoint import atomic_directory, write_model_files
    from elasticlm.elastic.extract import extract
    from elasticlm.elastic.importance import calibration_batches
    from elasticlm.elastic.prune import search
    from elasticlm.elastic.space import ElasticConfig, ElasticSpace

    demo, work = Path(args.demo), Path(args.work) / "router"
    recipe = demo_recipe(demo)
    ordered_dir = demo / "parent-ordered"
    ordered, tok = load(ordered_dir), load_tokenizer(ordered_dir)
    stage1 = dict(recipe.elastic["stages"][0])
    stage1.pop("budget_weights", None)
    kd_stage = {**stage1, "name": "kd", "tokens": args.kd_steps * stage1["batch_size"] * stage1["seq_len"]}
    seeds = args.seeds
    progress = not args.no_progress

    def elastic_tables(out: Path, seed: int, extra: dict | None, stages: list[dict], pattern: str = "") -> dict:
        """``extra`` None: one fixed architecture of layer pattern ``pattern`` (``one_size``)."""
        tabs = copy.deepcopy(recipe.elastic)
        tabs["elastic"] = one_size(tabs["elastic"], pattern) if extra is None else {**tabs["elastic"], **extra}
        tabs["stages"] = stages
        tabs["train"] = {**tabs["train"], "out": str(out), "seed": seed}
        tabs["data"] = {**tabs["data"], "seed": 1 + seed}
        return tabs

    # (a) the router's architectures: one elastic stage-1 run per recipe and seed, all budgets at once
    archs: dict[tuple[str, str, int], object] = {}
    elastic_models: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for name, extra in ROUTER_RECIPES.items():
            out = work / f"elastic-{name.split(', ')[1]}-s{seed}"
            tabs = elastic_tables(out, seed, {**ROUTER_AXES, **extra}, [stage1])
            tabs["parent"] = {"path": str(ordered_dir)}
            train_or_reuse(f"elastic run ({name}, seed {seed})", out, elastic_run_config_from_tables(tabs),
                           train_elastic, progress, print)
            elastic_models[(name, seed)] = out / "final"
            budgets = Deployment.load(out / "final").budgets
            for label in SIZES:
                archs[(name, label, seed)] = budgets[label]
    # (b) the best of the prune search's grid (by calibration loss; deterministic) and (c) random ones
    space = ElasticSpace.build(ordered.config, ElasticConfig(budgets=[float(x) for x in SIZES], **ROUTER_AXES))
    val = data_config_from_spec("synthetic", mask_prompt=True)
    search_set = list(calibration_batches(val, lambda s: tok.encode(s).ids, ordered.config.eos_token_id,
                                          recipe.eval["search_samples"], 256, 8, "train", True))
    for label, target in zip(space.budgets, space.targets, strict=True):
        grid = search(ordered, int(target), search_set, progress=progress, align=DEMO_ALIGN)[0].subnet
        for seed in seeds:
            archs[("grid", label, seed)] = grid
            archs[("random", label, seed)] = random_subnet(space, target, random.Random(f"router:{label}:{seed}"))
    # every architecture distilled alone from the parent with the same tokens and seed
    methods = [*ROUTER_RECIPES, "grid", "random"]
    entries = []
    for (method, label, seed), subnet in sorted(archs.items()):
        slug = f"{method.replace(', ', '-')}-{label}-s{seed}"
        student, out = work / f"student-{slug}", work / f"kd-{slug}"
        if not (student / "config.json").is_file():
            with atomic_directory(student, overwrite=True) as tmp:
                write_model_files(extract(ordered, subnet), tmp, "native", tokenizer_dir=ordered_dir)
        tabs = elastic_tables(out, seed, None, [kd_stage], read_config(student)[0].pattern)
        tabs["parent"] = {"path": str(student)}
        tabs["distill"] = {"teacher": str(ordered_dir)}
        train_or_reuse(f"KD student {slug}", out, elastic_run_config_from_tables(tabs), train_elastic, progress, print)
        entries.append(Entry(f"{method}|{seed}", label, load(out / "final"), tok))
    for (name, seed), path in elastic_models.items():
        d = Deployment.load(path)
        entries += [Entry(f"{name} (as trained)|{seed}", label, d.model, tok, d.budgets[label]) for label in SIZES]
    points = {(p.series, p.budget): p for p in evaluate(entries, args)}

    rows = ["| budget | architecture | parameters | val loss (mean ± std, min–max) | accuracy % | recall % | "
            "architectures (seed 0 / 1 / 2 …) |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for label in SIZES:
        for method in [*methods, *(f"{n} (as trained)" for n in ROUTER_RECIPES)]:
            ps = [points[(f"{method}|{s}", label)] for s in seeds]
            summary[f"{method}|{label}"] = [dataclasses.asdict(p) for p in ps]
            arch_key = method.replace(" (as trained)", "")
            descs = list(dict.fromkeys(short_arch(ordered.config, archs[(arch_key, label, s)]) for s in seeds))
            rows.append(f"| {label} | {method} | {' / '.join(sorted({f'{p.parameters:,}' for p in ps}))} | "
                        f"{mean_spread([p.val_loss for p in ps])} | "
                        f"{mean_spread([p.mean_accuracy() for p in ps], 100, 1)} | "
                        f"{mean_spread([p.accuracy['default']['recall'] for p in ps], 100, 1)} | "
                        f"{'<br>'.join(descs)} |")
    (work / "router.json").write_text(json.dumps(summary, indent=2) + "\n")
    body = (f"At each budget, four architectures of about the same parameter count (grid and random within 1 % of the "
            f"target, the router's where it ended: see the parameters column), each pruned from the "
            f"demo's ordered parent and distilled alone from it with the same tokens "
            f"({kd_stage['tokens'] / 1e6:.2f} M: "
            f"{args.kd_steps} steps × {stage1['batch_size']} × {stage1['seq_len']}, KD τ = 1, the demo's elastic "
            f"optimiser settings) and the same data seed: the router's choice after an elastic stage 1 of all three "
            f"budgets ({stage1['tokens'] / 1e6:.2f} M tokens, FFN width per layer, hard gates with the default "
            f"300-step warm start, or `router_mode = \"st\"` with a 20-step one); the best of `elasticlm prune`'s "
            f"grid by calibration loss (homogeneous widths); and a random point of the router's space. "
            f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} (the elastic run's and the distillation's data order "
            f"and router init; a new random "
            f"architecture per seed). \"as trained\": the elastic run's own sub-model, before any per-size "
            f"distillation. n = {args.n} prompts per family, default difficulty; loss on 48 held-out sequences. "
            "Architectures: hidden · Mamba heads per group × head dim · query heads per KV head · FFN per MLP layer "
            "· dropped layers.\n\n" + "\n".join(rows))
    write_section(Path(args.results), "router", "Router: learned vs grid vs random architectures", body,
                  f"python bench/replicate.py router --seeds {','.join(map(str, seeds))} --kd-steps {args.kd_steps}")


# -- Seeds: the demo's conclusions over several seeds (issue 19) ------------------------------------


def seeds(args) -> None:
    """The demo table over ``--demos`` (one finished `elasticlm demo --seed N` each): mean ± std (min–max)
    per model, and per budget whether elastic beats zero-shot pruning by more than the seed spread: the
    per-seed difference (same parent) positive in every seed and its mean above its std over seeds, for
    accuracy and loss alike."""
    from collections import defaultdict

    from elasticlm.eval.report import load_points

    runs = {}
    for d in map(Path, args.demos):
        meta = json.loads((d / "eval" / "eval.json").read_text())
        points = load_points(d / "eval" / "eval.json")
        runs[int(meta.get("seed", 0))] = (meta, {(p.series, p.budget): p for p in points})
    if len(runs) < 2:
        sys.exit("error: seeds needs finished demos of at least two seeds (--demos runs/demo runs/demo-seed1 ...)")
    per: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for _, (_, pts) in sorted(runs.items()):
        for key, p in pts.items():
            per[key].append(p)
    fams = synthetic.FAMILIES
    rows = ["| model | budget | parameters | val loss | mean accuracy % | " + " | ".join(f"{f} %" for f in fams) + " |",
            "|---" * (5 + len(fams)) + "|"]
    for (series, budget), ps in per.items():
        if len(ps) != len(runs):
            continue
        fam = " | ".join(f"{statistics.mean(100 * p.accuracy['default'][f] for p in ps):.0f}" for f in fams)
        rows.append(f"| {series} | {budget} | {' / '.join(sorted({f'{p.parameters:,}' for p in ps}))} | "
                    f"{mean_spread([p.val_loss for p in ps])} | {mean_spread([p.mean_accuracy() for p in ps], 100, 1)} "
                    f"| {fam} |")
    verdicts = []
    for (series, budget), ps in per.items():
        if series != "zero-shot pruned" or ("elastic", budget) not in per:
            continue
        # paired per seed (the same parent): elastic minus zero-shot, and that difference's spread over seeds
        es = per[("elastic", budget)]
        acc = [e.mean_accuracy() - z.mean_accuracy() for e, z in zip(es, ps, strict=True)]
        loss = [z.val_loss - e.val_loss for e, z in zip(es, ps, strict=True)]

        def clear(d: list[float]) -> bool:
            return min(d) > 0 and statistics.mean(d) > statistics.stdev(d)

        ok = clear(acc) and clear(loss)
        verdicts.append(f"- budget {budget}, elastic minus zero-shot per seed: accuracy "
                        f"{', '.join(f'{100 * d:+.1f}' for d in acc)} pt (mean ± std {mean_spread(acc, 100, 1)}), "
                        f"loss {', '.join(f'{-d:+.3f}' for d in loss)}: **"
                        + ("above in every seed, by more than the seed spread" if ok else "NOT clearly above")
                        + "**")
    recall = [runs[s][1][("parent", "1.0")].accuracy["default"]["recall"] for s in sorted(runs)]
    minutes = [runs[s][0]["timings_s"] for s in sorted(runs)]
    total = [sum(t.values()) / 60 for t in minutes]
    body = (f"Seeds {', '.join(map(str, sorted(runs)))} of `elasticlm demo --seed N` (each seed moves the parent's and "
            "the elastic run's init and data order; the held-out prompts are the same). Cells: mean ± std "
            f"(min–max) over the seeds; per-family columns are means. n = {runs[min(runs)][0]['n']} prompts per "
            "family, default difficulty. The verdict compares elastic and zero-shot within each seed "
            "(the same parent): the difference must be positive in every seed and its mean larger than its std "
            "over seeds, for accuracy and loss.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(verdicts)
            + f"\n- the parent's recall per seed: {', '.join(f'{100 * r:.0f} %' for r in recall)}"
            + "\n- time per demo before its evaluation (training, importance, extraction, baselines; a parent reused "
            "from an earlier demo of the same recipe counts 0): "
            + ", ".join(f"{t:.1f} min (parent {m.get('parent', 0) / 60:.1f})" for t, m in zip(total, minutes,
                                                                                       strict=True)))
    write_section(Path(args.results), "seeds", "The demo over seeds: mean and spread", body,
                  "elasticlm demo --seed N  (N = " + ", ".join(map(str, sorted(runs))) + "), then "
                  "python bench/replicate.py seeds --demos " + " ".join(args.demos))


# -- Budgets never trained (issue 19) ---------------------------------------------------------------

UNSEEN = ("0.85", "0.6")


def unseen(args) -> None:
    """The demo's elastic checkpoint at budgets it never trained, next to the trained ones (``elasticlm eval
    --budgets``' path: the router's input interpolated between neighbours, the cost solver as fallback)."""
    demo = Path(args.demo)
    deployment = Deployment.load(demo / "elastic" / "final")
    tok = load_tokenizer(demo / "elastic" / "final")
    full = count_parameters(deployment.config)
    for text in UNSEEN:  # not trained: placed by the router (the cost solver as fallback), marked untrained
        deployment.label(text)
    order = sorted(deployment.budgets, key=lambda b: -float(b))
    entries = [Entry("elastic", label, deployment.model, tok, deployment.budgets[label]) for label in order]
    points = {p.budget: p for p in evaluate(entries, args)}
    rows = ["| budget | trained? | parameters (vs target) | val loss | mean accuracy (default) | how it was found |",
            "|---|---|---|---|---|---|"]
    for label in order:
        p, n = points[label], deployment.num_parameters(label)
        info = deployment.untrained.get(label)
        how = info.describe().split(": ", 1)[1].split("; cost")[0] if info else "trained"
        rows.append(f"| {label} | {'no' if info else 'yes'} | {n:,} ({n / (float(label) * full) - 1:+.1%}) | "
                    f"{p.val_loss:.3f} | {100 * p.mean_accuracy():.1f} % | {how} |")
    body = ("Every budget of the demo's elastic checkpoint, trained or not, as `elasticlm eval --checkpoint "
            f"{demo}/elastic/final --budgets {','.join(order)}` resolves them. n = {args.n} prompts per family, "
            "default difficulty; loss on 48 held-out sequences. Parameters against the budget's target (budget × "
            f"the parent's {full:,}).\n\n" + "\n".join(rows))
    write_section(Path(args.results), "unseen", "Budgets never trained", body, "python bench/replicate.py unseen")


TABLES = {"demo": demo, "table1": table1, "table3": table3, "table4": table4, "table5": table5, "unseen": unseen,
          "router": router, "seeds": seeds}


def seed_list(text: str) -> list[int]:
    """``3`` → [0, 1, 2]; ``1,2`` → [1, 2]; ``2,`` → [2]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma-separated list of seeds, got {text!r}") from None
    if not values or any(v < 0 for v in values) or (values == [0] and "," not in text):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0 and a count >= 1, got {text!r}")
    return list(range(values[0])) if len(values) == 1 and "," not in text else values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=[*TABLES, "all"])
    ap.add_argument("--demo", default="runs/demo", help="the working directory of a finished `elasticlm demo`")
    ap.add_argument("--work", default="runs/replicate", help="where the extra training runs go")
    ap.add_argument("--results", default="docs/results.md")
    ap.add_argument("--keep-scratch", action="store_true",
                    help="table1: keep from-scratch models an earlier run trained (their sizes are then the earlier "
                         "demo's and the table says so) instead of training them again")
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per task family")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--demos", nargs="+", default=["runs/demo", "runs/demo-seed1", "runs/demo-seed2"],
                    help="seeds: finished demos of different --seed")
    ap.add_argument("--seeds", type=seed_list, default=[0, 1, 2],
                    help="router: seeds per architecture, a count (3: seeds 0, 1, 2) or a list (1,2); finished runs "
                         "are reused, so two processes can train disjoint seeds and a third run reports them all")
    ap.add_argument("--kd-steps", type=int, default=200, help="router: distillation steps per architecture")
    ap.add_argument("--fit-steps", type=int, default=300,
                    help="table3: budget-only steps fitting the router of the 12B-shaped space (no training)")
    args = ap.parse_args()
    if args.table != "seeds" and not (Path(args.demo) / "elastic" / "final").is_dir():
        sys.exit(f"error: {args.demo} holds no finished demo; run `elasticlm demo` first (or pass --demo)")
    torch.manual_seed(0)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    # all: the tables of one demo; seeds and router train or read several runs and are asked for by name
    for name in (["demo", "table1", "table3", "table4", "table5", "unseen"] if args.table == "all" else [args.table]):
        start = time.perf_counter()
        TABLES[name](args)
        print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
