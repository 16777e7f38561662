"""Verbs that evaluate and serve: the demo, per-budget evaluation, the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..demo import DEMO_PARENTS
from ..errors import ConfigError
from .common import (
    DATA_HELP,
    SEPARATOR_HELP,
    _check_listen,
    _check_memory,
    _count,
    _data_spec,
    _device,
    _loss_scope,
    _number,
    _read_subnet,
)


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import comparison_lines, run_demo

    out = args.out or (("runs/demo-quick" if args.quick else "runs/demo")
                       + (f"-{args.parent}" if args.parent != "nemotron_h" else "")
                       + (f"-seed{args.seed}" if args.seed else ""))
    result = run_demo(out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress,
                      log=lambda msg: print(msg, flush=True), seed=args.seed, parent=args.parent)
    print("\n## elasticlm demo" + (" --quick" if args.quick else "") + "\n")
    print(result["table"])
    print()
    for line in comparison_lines(result["points"]):
        print(line)
    print(f"\nelastic checkpoint (every budget, shared weights): {result['elastic']}")
    print("extracted models: " + ", ".join(result["extracted"]))
    print("report: " + ", ".join(str(p) for p in result["paths"].values())
          + ("" if "plot" in result["paths"] else "  (no plot: pip install matplotlib)"))
    print(f"total {result['timings']['total'] / 60:.1f} min")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output_path, load
    from ..data.datasets import is_local
    from ..elastic.deployment import Deployment
    from ..eval.report import Entry, evaluate_entries, markdown_table, parse_levels, parse_tasks, save_report
    from ..tokenizer import load_tokenizer

    ppl, families = parse_tasks(args.tasks)
    levels = parse_levels(args.difficulty)
    lm_tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    if args.lm_eval is not None and not lm_tasks:
        raise ConfigError("--lm-eval needs a comma-separated list of lm-eval task names")
    if lm_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("--lm-eval needs lm-eval: pip install 'elasticlm[lmeval]'") from None
        if args.lm_eval_include and not Path(args.lm_eval_include).is_dir():
            raise ConfigError(f"--lm-eval-include {args.lm_eval_include} is not a directory")
        from ..lm_eval import task_manager

        manager = task_manager(lm_tasks, args.lm_eval_include)  # unknown tasks: one line before any model runs
    out = Path(args.out) if args.out else Path(str(Path(args.checkpoint).resolve()) + "-eval")
    inputs = [args.checkpoint] + [spec.rpartition("=")[2] for spec in args.baseline or []]
    check_output_path(out, args.force, "report", inputs)
    device = _device(args.device)
    deployment = Deployment.load(args.checkpoint, device=device)
    model = deployment.model
    if ppl:
        _check_memory(model, args.batch_size, args.seq_len, "--batch-size or --seq-len")
    tok = load_tokenizer(args.checkpoint)
    name = Path(args.checkpoint).resolve().name
    if deployment.budgets:
        if args.subnet:
            raise ConfigError("--subnet is for plain models; an elastic checkpoint is evaluated by --budgets")
        entries = [Entry("elastic" if label not in deployment.untrained else "elastic, not trained",
                         label, model, tok, deployment.budgets[label], str(args.checkpoint), memo=deployment.memo)
                   for label in deployment.labels(args.budgets)]
        if args.think_budget is not None:
            think = deployment.label(args.think_budget)
            entries += [Entry(f"think {think}", f"{think}→{e.budget}", model, tok, e.subnet, str(args.checkpoint),
                              think=deployment.budgets[think], memo=deployment.memo)
                        for e in list(entries) if e.budget != think]
    else:
        if args.budgets.strip().lower() != "all" or args.think_budget is not None:
            deployment.labels(args.budgets)  # raises: not an elastic checkpoint
        entries = [Entry(name, "1.0", model, tok, _read_subnet(args.subnet), str(args.checkpoint),
                         memo=deployment.memo)]
    reference = model.num_parameters()
    for spec in args.baseline or []:
        label, _, path = spec.rpartition("=")
        base = load(path, device=device)
        entries.append(Entry(label or Path(path).resolve().name, f"{base.num_parameters() / reference:.2f}", base,
                             load_tokenizer(path), None, path))
    val = _data_spec(args) if ppl else None
    whole = val is not None and is_local(val)  # a file or folder: every token of it (or --val-samples windows)
    start = time.perf_counter()
    points = evaluate_entries(entries, families=families, levels=levels, n=args.n, val_data=val,
                              val_samples=args.val_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if lm_tasks:
        from ..lm_eval import run_tasks

        for e, point in zip(entries, points, strict=True):
            if e.think is None:  # lm-eval scores one model; think→answer pairs are ours alone
                print(f"lm-eval {','.join(lm_tasks)}: {e.series} {e.budget}", file=sys.stderr, flush=True)
                point.lm_eval = run_tasks(e.model, e.tokenizer, e.subnet, lm_tasks, limit=args.lm_eval_limit,
                                          batch_size=args.batch_size, manager=manager)
    meta = {"checkpoint": str(args.checkpoint), "tasks": args.tasks, "difficulty": list(levels), "n": args.n,
            "data": args.data if ppl else None, "separator": args.separator, "seq_len": args.seq_len,
            "val_samples": args.val_samples if whole or not ppl else args.val_samples or 48,
            "val_tokens": next((p.val_tokens for p in points if p.val_tokens is not None), None),
            "lm_eval": {"tasks": lm_tasks, "include": args.lm_eval_include, "limit": args.lm_eval_limit}
            if lm_tasks else None,
            "untrained": {k: v.describe() for k, v in deployment.untrained.items()}}
    paths = save_report(points, out, meta, title=f"elasticlm eval {args.checkpoint}", force=args.force, inputs=inputs)
    print(markdown_table(points))
    print(f"\n[{args.n} held-out examples per task and difficulty, greedy decoding"
          + (f"; loss on {_loss_scope(args, points, whole)}" if ppl else "")
          + f"; {time.perf_counter() - start:.0f}s]")
    print("wrote " + ", ".join(str(p) for p in paths.values())
          + ("" if "plot" in paths else "  (no plot: pip install matplotlib)"))


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from ..serve import build_app, load_engine, serve_until_signalled

    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("`elasticlm serve` needs FastAPI and uvicorn: pip install 'elasticlm[serve]'") from None
    _check_listen(args.host, args.port)  # before loading and measuring anything
    api_key = args.api_key or os.environ.get("ELASTICLM_API_KEY") or None
    engine, path = load_engine(args.checkpoint, args.device, max_batch=args.max_batch,
                               target_latency_ms=args.target_latency_ms, max_context=args.max_context,
                               max_queue=args.max_queue)
    app = build_app(engine, path, api_key=api_key, max_body_bytes=args.max_body_bytes,
                    request_timeout=args.request_timeout)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key: anyone who reaches the port can use it "
              "(set ELASTICLM_API_KEY or --api-key)", file=sys.stderr)
    print(f"serving {engine.name}: budgets {', '.join(engine.order)} and auto on http://{args.host}:{args.port}/v1 "
          "(measuring step times…)", file=sys.stderr, flush=True)
    engine.start()
    return serve_until_signalled(engine, app, args.host, args.port, args.shutdown_timeout)


def add_parsers(sub: Any, fmt: type) -> None:
    """The verbs of this module on the ``elasticlm`` parser's subcommands."""
    p = sub.add_parser("demo", formatter_class=fmt, help="the whole method end to end on the embedded data",
                       description="Train the small parent on the synthetic reasoning blend (or reuse the one a "
                                   "previous demo left), estimate importance and reorder, train budgets 1.0 / 0.75 "
                                   "/ 0.5 in one elastic run (two stages), extract every budget, build zero-shot "
                                   "pruned baselines of the same sizes, evaluate all of them and write the table, "
                                   "eval.json and the Pareto plot. ≈ 20 min on 2 CPU cores; --quick: a tiny run of "
                                   "the same pipeline in under a minute. An interrupted demo resumes where it "
                                   "stopped.")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run; quality is not "
                                                        "meaningful)")
    p.add_argument("--out", help="working directory (default: runs/demo, or runs/demo-quick with --quick; "
                                 "runs/demo-PARENT with --parent, runs/demo-seedN with --seed N)")
    p.add_argument("--parent", choices=list(DEMO_PARENTS), default="nemotron_h",
                   help="the parent's architecture: the Nemotron-H hybrid (Mamba-2 + attention + MLP), the hybrid "
                        "with mixture-of-experts layers instead of MLPs (8 experts, top 2, a shared expert), or a "
                        "Llama- or Qwen3-shaped transformer (rotary attention + gated SiLU MLP) of about the same "
                        "size; the rest of the recipe is the same")
    # the name this option had before "family" came to mean only the Hugging Face model_type
    p.add_argument("--family", dest="parent", choices=list(DEMO_PARENTS), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="moves every random choice (the parent's and the elastic "
                                                       "run's init and data slice; the evaluation prompts stay): run "
                                                       "seeds 0, 1, 2 to see the spread (bench/replicate.py seeds)")
    p.add_argument("--fresh", action="store_true", help="delete the working directory first (retrain everything)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", formatter_class=fmt, help="per-budget loss and task accuracy: table, JSON, plot",
                       description="Evaluate every budget of an elastic checkpoint (or a plain model, or one "
                                   "--subnet of it): validation loss / perplexity on held-out data and exact-match "
                                   "accuracy of greedy generation on the synthetic tasks (add, vars, recall, sort) "
                                   "per difficulty. Prints a markdown table; writes eval.json, eval.md and a Pareto "
                                   "plot pareto.png (parameters vs accuracy and vs loss; needs matplotlib).")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="elastic checkpoint (final/ of `elasticlm train`) or model directory (with tokenizer.json)")
    p.add_argument("--budgets", default="all",
                   help="'all' (the trained budgets) or one budget (0.5, 50%%, 780K; an untrained one is placed by "
                        "the router and marked as such)")
    p.add_argument("--think-budget", help="also evaluate think small, answer big: this budget writes each trace and "
                                          "every evaluated budget the answer (rows labelled THINK→BUDGET)")
    p.add_argument("--tasks", default="ppl,reasoning,recall",
                   help="comma list: ppl, reasoning (add, vars, sort), recall, or single tasks (add, vars, sort)")
    p.add_argument("--difficulty", default="default,hard", help="difficulty levels to score: default, hard")
    p.add_argument("--n", type=_count(1), default=100, help="examples per task and difficulty")
    p.add_argument("--baseline", action="append", metavar="[LABEL=]DIR",
                   help="another model directory to score and plot alongside (repeatable), e.g. a pruned model")
    p.add_argument("--subnet", help="JSON Subnet of a plain model to evaluate (default: the full model)")
    p.add_argument("--data", default="synthetic", help=DATA_HELP.replace("calibration", "validation"))
    p.add_argument("--separator", help=SEPARATOR_HELP)
    p.add_argument("--val-samples", type=_count(1), default=None,
                   help="held-out sequences for the loss (default: 48; with a file or folder: every window, so "
                        "that every token of it is scored)")
    p.add_argument("--seq-len", type=_count(1), default=256, help="tokens per held-out sequence")
    p.add_argument("--batch-size", type=_count(1), default=8, help="sequences per forward pass")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="also run these lm-eval tasks (comma-separated) on every budget, nested, without extracting "
                        "it; their metrics join the table and eval.json (needs lm-eval)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a directory of local lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=_count(1), metavar="N", help="at most N documents per lm-eval task")
    p.add_argument("--out", help="report directory (default: CHECKPOINT-eval next to the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", formatter_class=fmt, help="every budget behind an OpenAI-compatible HTTP API",
                       description="Serve an elastic checkpoint: /v1/completions and /v1/chat/completions (streaming "
                                   "or not), /v1/models (NAME@<budget> per budget, NAME@auto), /health, /metrics. One "
                                   "copy of the weights; concurrent requests of a budget are batched continuously. "
                                   "Needs `pip install 'elasticlm[serve]'`.")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint (final/ of `elasticlm train`)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=_count(0, 65535), default=8000, help="TCP port")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--max-batch", type=_count(1), default=32, help="most sequences decoding together per budget")
    p.add_argument("--max-context", type=_count(2), default=4096, help="most prompt + generated tokens per request")
    p.add_argument("--target-latency-ms", type=_number(0.0, None, low_open=True), default=100.0,
                   help="NAME@auto: the per-token latency the chosen budget must meet under the current load")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route (default: the "
                                     "ELASTICLM_API_KEY environment variable; none: open)")
    p.add_argument("--max-queue", type=_count(1), default=256,
                   help="most requests waiting for a decoding slot; more get 429 with Retry-After")
    p.add_argument("--request-timeout", type=_number(0.0, None), default=600.0,
                   help="seconds a request may take from arrival to its last token, then 504 (0: no limit)")
    p.add_argument("--max-body-bytes", type=_count(1), default=2 << 20,
                   help="larger request bodies get 413 without being parsed")
    p.add_argument("--shutdown-timeout", type=_number(0.0, None), default=30.0,
                   help="on SIGTERM/SIGINT: seconds in-flight requests get to finish before they are cancelled")
    p.set_defaults(func=cmd_serve)
