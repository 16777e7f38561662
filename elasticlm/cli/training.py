"""Verbs that train or prepare a parent: pretrain, elastic training, planning, importance, reordering, pruning,
tokenizers."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..errors import ConfigError
from .common import (
    DATA_HELP,
    SEPARATOR_HELP,
    _calibration,
    _check_memory,
    _count,
    _cuda,
    _device,
    _on_off,
    _parent_architecture,
    _set_val_data,
)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from ..train.config import load_run_config
    from ..train.pretrain import pretrain

    run = load_run_config(args.config, args.set or [])
    if args.out:
        run.train.out = args.out
    _set_val_data(run, args.val_data)
    final = pretrain(run, resume=args.resume, progress=not args.no_progress,
                     allow_config_change=args.allow_config_change)
    print(f"done: {run.train.out}/final  " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()
                                                     if isinstance(v, float)))


def cmd_train(args: argparse.Namespace) -> None:
    from ..train.config import load_elastic_run_config
    from ..train.elastic import train_elastic

    run = load_elastic_run_config(args.config, args.set or [])
    if args.out:
        run.train.out = args.out
    if args.parent:
        run.parent.path = args.parent
    _set_val_data(run, args.val_data)
    final = train_elastic(run, resume=args.resume, progress=not args.no_progress, resume_from=args.resume_from,
                          allow_config_change=args.allow_config_change)
    print(f"done: {run.train.out}/final  " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()
                                                     if isinstance(v, float) and k.startswith(("val_", "acc_"))))


def cmd_plan(args: argparse.Namespace) -> int:
    import json as _json

    from ..config import read_config_file
    from ..train.plan import (
        Cluster,
        device_memory,
        format_plan,
        parse_bytes,
        parse_flops,
        plan_elastic,
        plan_pretrain,
    )

    if not args.config:
        raise ConfigError("--config is required: the run's TOML file (pretrain or elastic)")
    for name in ("gpus", "nodes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = args.device or ("cpu" if args.gpu_memory is None and args.gpus == 1 and args.nodes == 1
                             and not _cuda() else "cuda")
    memory = parse_bytes(args.gpu_memory) if args.gpu_memory else (
        device_memory(device) if device == "cpu" or _cuda() else None)
    flops, source = None, ""
    if args.flops:
        flops, source = parse_flops(args.flops), "given with --flops"
    elif device == "cuda":
        from ..train.plan import DEFAULT_GPU_FLOPS

        flops, source = DEFAULT_GPU_FLOPS, "assumed: H100/H200 dense bf16 peak; pass --flops for your device"
    cluster = Cluster(args.gpus, args.nodes, memory, flops, device=device)
    tables = read_config_file(args.config)
    if "parent" in tables or "stages" in tables or "elastic" in tables:
        from ..train.config import load_elastic_run_config

        run = load_elastic_run_config(args.config, args.set or [])
        plan = plan_elastic(run, _parent_architecture(run.parent), cluster, args.checkpointing)
    else:
        from ..train.config import load_run_config

        run = load_run_config(args.config, args.set or [])
        plan = plan_pretrain(run, cluster, args.checkpointing)
    plan.flops_source = source
    print(_json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 1 if plan.fits is False else 0


def cmd_importance(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output_path, load
    from ..elastic.importance import auto_depth_rounds, estimate

    check_output_path(args.out, args.force, "importance", [args.model])
    model = load(args.model, device=_device(args.device))
    _check_memory(model, args.batch_size, args.seq_len, "--batch-size or --seq-len")
    metrics = tuple(m.strip() for m in args.depth_metrics.split(",") if m.strip())
    unit = 1 if args.depth_blocks else model.config.depth_unit
    if args.depth_rounds == "auto":
        rounds = auto_depth_rounds(model.config, unit)
    elif args.depth_rounds == "all":
        rounds = max(1, model.config.num_layers // unit - 1)
    else:
        try:
            rounds = int(args.depth_rounds)
        except ValueError:
            raise ConfigError(f"--depth-rounds must be auto, all or a number of rounds, "
                              f"got {args.depth_rounds!r}") from None
    start = time.perf_counter()
    batches = _calibration(args, model, args.model, args.samples, "train")
    amp = None
    if {"iterative_mse", "oneshot_mse"} & set(metrics):
        from ..train.trainer import autocast_dtype

        amp = autocast_dtype(args.dtype, model.device, model, (args.batch_size, args.seq_len),
                             setting="importance --dtype")
    imp = estimate(model, batches, total_batches=-(-args.samples // args.batch_size),
                   depth_batches=-(-args.depth_samples // args.batch_size), metrics=metrics,
                   progress=not args.no_progress, depth_rounds=rounds, depth_unit=unit, depth_dtype=amp,
                   meta={"model": str(args.model), "data": args.data, "samples": args.samples,
                         "seq_len": args.seq_len, "depth_samples": args.depth_samples})
    imp.save(args.out, force=args.force, inputs=[args.model])
    print(f"wrote {args.out} ({args.samples} × {args.seq_len} tokens, {time.perf_counter() - start:.0f}s; depth MSE "
          f"in {imp.meta.get('depth_dtype', 'float32')})")
    for metric, order in imp.depth.items():
        print(f"  depth order ({metric}, least important first): {order}")
    if "iterative_mse_note" in imp.meta:
        print(f"  note: {imp.meta['iterative_mse_note']}; an elastic.depth that drops more layers needs "
              f"--depth-rounds of at least that many")


def cmd_reorder(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output_path, load, save
    from ..elastic.importance import Importance
    from ..elastic.reorder import reorder_

    check_output_path(args.out, args.force, "model", [args.model, args.importance])
    model = load(args.model)
    imp = Importance.load(args.importance)
    reorder_(model, imp, args.depth_metric)
    save(model, args.out, "native", tokenizer_dir=args.model, overwrite=args.force,
         inputs=[args.model, args.importance],
         extra_config={"reordered": {"importance": str(args.importance), "depth_metric": args.depth_metric}})
    print(f"wrote {args.out}: weights in importance order, depth order {model.config.depth_order} "
          "(least important first)")


def cmd_prune(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output_path, load, save
    from ..config import parse_budget
    from ..elastic.extract import extract
    from ..elastic.prune import describe_subnet, search

    check_output_path(args.out, args.force, "model", [args.model])  # before the search, not after it
    device = _device(args.device)
    model = load(args.model, device=device)
    if model.config.depth_order is None:
        raise ConfigError(f"{args.model} is not importance-ordered; run `elasticlm importance` and "
                          "`elasticlm reorder` first (pruning keeps prefixes of every axis)")
    parent = model.num_parameters()
    budget = parse_budget(args.budget, parent)
    _check_memory(model, args.batch_size, args.seq_len, "--batch-size or --seq-len")
    batches = list(_calibration(args, model, args.model, args.val_samples, "val", loss_mask=True))
    # an explicit --format native may take any architecture; otherwise only what the family's HF config can hold
    best, scored = search(model, budget, batches, args.max_candidates, progress=not args.no_progress,
                          align=args.align, exportable=args.format != "native")
    print(f"searched {len(scored)} candidates within 1 % of {budget:,} parameters; best by validation loss:")
    for c in sorted(scored, key=lambda c: c.loss)[: args.show]:
        print(f"  loss {c.loss:.4f}  {c.parameters:,}  {describe_subnet(model.config, c.subnet)}")
    small = extract(model, best.subnet)
    save(small, args.out, args.format or "native", tokenizer_dir=args.model, overwrite=args.force,
         inputs=[args.model],
         extra_config={"pruned": {"parent": str(args.model), "budget": args.budget, "parameters": best.parameters,
                                  "val_loss": best.loss, "subnet": best.subnet.to_dict()}})
    print(f"wrote {args.out}: {best.parameters:,} parameters ({best.parameters / parent:.1%} of {parent:,}; "
          f"budget {budget:,}, {best.parameters / budget - 1:+.2%})")
    print(f"  architecture: {small.config.pattern}  {describe_subnet(model.config, best.subnet)}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from ..checkpoint import atomic_directory, check_output_path
    from ..data.datasets import DataConfig, doc_text, documents
    from ..tokenizer import save_tokenizer, train_bpe

    data = DataConfig(source=args.source, path=args.path, text_field=args.text_field, hf_name=args.hf_name)
    inputs = [args.path] if args.path else []
    check_output_path(args.out, args.force, "tokenizer", inputs)
    docs = documents(data, "train")(0)
    tok = train_bpe((doc_text(d) for _, d in zip(range(args.max_documents), docs, strict=False)), args.vocab_size)
    with atomic_directory(args.out, args.force, "tokenizer", inputs) as tmp:
        save_tokenizer(tok, tmp)
    print(f"wrote {args.out}/tokenizer.json ({tok.get_vocab_size()} tokens)")


def run_arguments(p: argparse.ArgumentParser, example: str, overrides: str, parent: bool = False) -> None:
    """The arguments of a verb that runs a TOML run config (pretrain, train), in --help's order."""
    p.add_argument("--config", help=f"TOML (or JSON) run config, e.g. {example}")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help=f"override a field, e.g. {overrides}")
    if parent:
        p.add_argument("--parent", help="shortcut for --set parent.path=DIR")
    p.add_argument("--out", help="shortcut for --set train.out=DIR")
    p.add_argument("--val-data", metavar="PATH", help="validation text / JSONL file or folder (shortcut for --set "
                                                      "data.val_path=PATH); training then reads all of data.path")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in train.out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the checkpoint's in fields a resume must keep "
                        "(architecture, budgets, stages, data, …); without it such a resume is refused")


def add_parsers(sub: Any, fmt: type) -> None:
    """The verbs of this module on the ``elasticlm`` parser's subcommands."""
    p = sub.add_parser("pretrain", formatter_class=fmt, help="train a parent model from scratch",
                       description="Train a HybridLM parent from a TOML run config ([model], [tokenizer], [data], "
                                   "[train], [eval]); checkpoints, metrics.jsonl and final/ go under train.out.")
    run_arguments(p, "configs/demo-parent.toml", "--set train.steps=200 --set train.lr=1e-3")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and metrics only)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", formatter_class=fmt, help="elastic training: every budget of one model at once",
                       description="Elastic training (knowledge distillation from the frozen parent, router, "
                                   "budgets, stages) from a TOML config with [parent] path = an importance-ordered "
                                   "parent (`elasticlm reorder`), [elastic] budgets and choice sets, [distill], "
                                   "[data], [train], [eval] and [[stages]]. Multi-process: torchrun "
                                   "--nproc_per_node N -m elasticlm train ... (DDP, or train.parallel=fsdp).")
    run_arguments(p, "configs/demo-elastic.toml", "--set elastic.budgets='[1.0,0.5]' --set stages[0].tokens=100000",
                  parent=True)
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this training checkpoint into a new train.out, e.g. stages/1-short of "
                        "another run to branch a stage-2 ablation (later stages may differ)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and metrics only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", formatter_class=fmt, help="will a training run fit? per-GPU memory and time",
                       description="Per-rank peak memory of a pretrain or elastic run config, broken down (student "
                                   "weights / grads / AdamW, teacher, activations with and without checkpointing, "
                                   "KD chunk, FSDP buffers), whether it fits the device, which knob to turn when "
                                   "not, and throughput / wall-time estimates. An elastic config whose [parent] "
                                   "path does not exist yet is sized from [parent] architecture (a preset). "
                                   "Exit status 0 when the run fits, 1 when it does not, 2 on bad input.")
    p.add_argument("--config", help="TOML run config (pretrain or elastic), e.g. configs/nano-12b-elastic.toml")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a field")
    p.add_argument("--gpus", type=_count(1), default=1, help="GPUs per node")
    p.add_argument("--nodes", type=_count(1), default=1, help="number of nodes")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per device, e.g. 141GB or 80GiB (default: this "
                                                         "machine's GPU, or available RAM with --device cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="plan for GPUs (default when --gpus/--gpu-memory "
                                                              "are given or a GPU is present) or this CPU")
    p.add_argument("--flops", help="peak FLOP/s per device for the estimates, e.g. 989T (default: H100/H200 bf16)")
    p.add_argument("--checkpointing", type=_on_off, default=None, metavar="on|off",
                   help="force activation checkpointing on or off (default: the config's, else auto)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("importance", formatter_class=fmt, help="score every width axis and layer (calibration)",
                       description="Forward passes on calibration data score hidden channels, FFN neurons, "
                                   "attention heads, Mamba heads and head channels (DESIGN 2.3), and rank layers by "
                                   "the normalized MSE of the logits when each is removed (iterative and one-shot) "
                                   "and by cosine block importance. Writes scores.safetensors + importance.json.")
    p.add_argument("--model", required=True, help="parent model directory (with tokenizer.json)")
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--separator", help=SEPARATOR_HELP)
    p.add_argument("--samples", type=_count(1), default=256, help="calibration sequences")
    p.add_argument("--seq-len", type=_count(1), default=512, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=_count(1), default=8, help="sequences per forward pass")
    p.add_argument("--depth-samples", type=_count(1), default=8,
                   help="sequences used for the depth metrics (each round runs every remaining layer's suffix: "
                        "SmolLM2-135M at 256 tokens ≈ 30 s per sequence on 2 cores, docs/pruning.md)")
    p.add_argument("--depth-metrics", default="iterative_mse,oneshot_mse,cosine", help="depth metrics to compute")
    p.add_argument("--depth-rounds", default="auto",
                   help="layers the iterative MSE drops one by one (each round costs about half a whole-model "
                        "forward per remaining layer); the rest follow the last round's scores. auto: as many as "
                        "`prune` and the default elastic.depth choices drop (about a quarter of the layers); all: "
                        "the complete order")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="precision of the depth MSE forwards (most of the time): auto = bf16 autocast on CUDA, and "
                        "on a CPU only where a measured step is >= 1.25x faster than fp32 (AVX-512 BF16 / AMX); "
                        "width scores stay fp32")
    p.add_argument("--depth-blocks", action="store_true",
                   help="a transformer: score its attention and MLP blocks one by one (as before) rather than the "
                        "whole decoder layers that depth choices drop (about 4x the cost)")
    p.add_argument("--out", required=True, help="directory for the scores (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace an existing importance directory")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser("reorder", formatter_class=fmt, help="permute a parent's weights into importance order",
                       description="Permute every axis of the parent into descending importance (per group for "
                                   "Mamba and query heads) without changing its function, and record the depth "
                                   "order in its config. Every nested sub-model is then a prefix.")
    p.add_argument("--model", required=True, help="parent model directory")
    p.add_argument("--importance", required=True, help="scores written by `elasticlm importance`")
    p.add_argument("--depth-metric", default="iterative_mse", choices=["iterative_mse", "oneshot_mse", "cosine"],
                   help="which depth ranking to record")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_reorder)

    p = sub.add_parser("prune", formatter_class=fmt, help="zero-shot structured pruning to a parameter budget",
                       description="Search homogeneous architectures of a reordered parent (hidden, Mamba heads and "
                                   "head channels, attention heads, FFN, dropped layers) that meet the budget within "
                                   "1 %, keep the one with the lowest validation loss, and write it as a standalone "
                                   "model. No training.")
    p.add_argument("--model", required=True, help="reordered parent (`elasticlm reorder`)")
    p.add_argument("--budget", required=True, help="fraction of the parent (0.5, 75%%) or a count (300M, 6B)")
    p.add_argument("--data", default="synthetic", help=DATA_HELP.replace("calibration", "validation"))
    p.add_argument("--separator", help=SEPARATOR_HELP)
    p.add_argument("--val-samples", type=_count(1), default=16,
                   help="validation sequences per candidate (from a file: evenly spread over all of it)")
    p.add_argument("--seq-len", type=_count(1), default=256, help="tokens per validation sequence")
    p.add_argument("--batch-size", type=_count(1), default=8, help="sequences per forward pass")
    p.add_argument("--max-candidates", type=_count(1), default=24,
                   help="candidates evaluated (the most evenly pruned ones when there are more)")
    p.add_argument("--show", type=_count(1), default=5, help="how many of the best candidates to print")
    p.add_argument("--format", choices=["native", "hf"], default=None,
                   help="output format (default: native, searching only architectures the parent family's Hugging "
                        "Face config can hold; an explicit native allows any)")
    p.add_argument("--align", type=_count(1), default=8,
                   help="hidden, FFN and head-channel widths are multiples of this (64 or 128 on GPUs; 1: none)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("tokenizer", help="tokenizer tools (train)",
                       description="Tokenizer tools. `elasticlm tokenizer train --help` for training a BPE.")
    tsub = p.add_subparsers(dest="tokverb", metavar="ACTION", required=True)
    t = tsub.add_parser("train", formatter_class=fmt, help="train a byte-level BPE on a dataset",
                        description="Train a byte-level BPE (ids 0-2: <pad> <s> </s>) with the `tokenizers` "
                                    "library and write tokenizer.json + tokenizer_config.json to OUT.")
    t.add_argument("--source", choices=["text", "jsonl", "hf", "synthetic"], default="text",
                   help="kind of data")
    t.add_argument("--path", help="file or folder (text, jsonl)")
    t.add_argument("--text-field", default="text", help="JSONL / HF field holding the text")
    t.add_argument("--hf-name", help="Hugging Face dataset name or local path (source hf)")
    t.add_argument("--vocab-size", type=_count(1), default=4096, help="vocabulary size including the 259 base tokens")
    t.add_argument("--max-documents", type=_count(1), default=100_000, help="documents read at most")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--force", action="store_true", help="replace an existing directory")
    t.set_defaults(func=cmd_tokenizer_train)
