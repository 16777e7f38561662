"""``elasticlm <verb>``: the command line.

Errors caused by input (bad config, missing or corrupt checkpoint, …) print one line,
``error: …``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, ElasticLMError

DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _device(name: str) -> Any:
    from .runtime import resolve_device

    return resolve_device(name)


def _read_mapping(path: str) -> dict[str, Any]:
    """A JSON or TOML file as a dict (a TOML file may nest the model under [model])."""
    from .config import read_config_file

    data = read_config_file(path)
    return data.get("model", data) if Path(path).suffix == ".toml" else data


def _read_subnet(path: str | None):  # -> Subnet | None
    from .config import Subnet

    return None if path is None else Subnet.from_dict(_read_mapping(path))


# -- verbs ---------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import check_output_path, save
    from .config import PRESETS, ModelConfig, parse_value
    from .model.hybrid import HybridLM
    from .tokenizer import byte_level_tokenizer, save_tokenizer

    check_output_path(args.out, args.force)
    fields: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    if args.config:
        fields.update(_read_mapping(args.config))
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        fields[key.strip()] = parse_value(value)
    if not fields:
        raise ConfigError("give --preset and/or --config (see --help)")
    config = ModelConfig.from_dict(fields)
    torch.manual_seed(args.seed)
    model = HybridLM(config)
    tok = byte_level_tokenizer()
    if tok.get_vocab_size() > config.vocab_size:
        raise ConfigError(f"vocab_size={config.vocab_size} is smaller than the byte-level tokenizer's "
                          f"{tok.get_vocab_size()} tokens")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tok, tmp)
        save(model, args.out, "native", tokenizer_dir=tmp, overwrite=args.force)
    print(f"wrote {args.out}: randomly initialised {config.pattern!r} model, "
          f"{model.num_parameters():,} parameters, byte-level tokenizer")


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import read_config
    from .config import LAYER_NAMES, count_parameters
    from .model.hf import hf_label

    config, kind = read_config(args.model)
    subnet = _read_subnet(args.subnet)
    print(f"{args.model}  ({hf_label(config.family) if kind == 'hf' else 'elasticlm native'}, "
          f"family {config.family})")
    print(f"pattern      {config.pattern}  ({config.num_layers} layers: "
          + ", ".join(f"{config.count(k)} {n}" for k, n in LAYER_NAMES.items()) + ")")
    print(f"hidden       {config.hidden_size}   vocab {config.vocab_size}   tied head {config.tie_word_embeddings}")
    if config.count("*"):
        rope = config.rope_parameters
        position = ("none" if rope is None
                    else f"rotary ({rope.get('rope_type', 'default')}, theta {rope['rope_theta']:g})")
        biases = "q/k/v" * config.attention_bias + (", o" if config.attention_out_bias else "") or "none"
        print(f"attention    {config.num_key_value_heads} KV heads × head_dim {config.attention_head_dim}; positions "
              f"{position}; biases {biases}; q/k norm {'yes' if config.qk_norm else 'no'}")
    if config.count("-"):
        print(f"mlp          {'gated SiLU' if config.mlp_type == 'swiglu' else 'squared ReLU'}")
    if config.count("E"):
        from .config import count_active_parameters

        print(f"moe          routed experts {config.moe_num_experts} (top {config.moe_top_k}, {config.moe_n_group} "
              f"routing group(s)), expert FFN {config.moe_intermediate_size}, shared expert FFN "
              f"{config.moe_shared_intermediate_size}; active parameters {count_active_parameters(config):,}")
    print(f"parameters   {count_parameters(config):,}")
    if kind == "native":
        from .checkpoint import read_json

        quantization = read_json(Path(args.model) / "config.json").get("quantization")
        if quantization:
            print(f"weights      {quantization.get('method')}, one scale per output row (`elasticlm quantize`): "
                  "every budget below is a slice of the one int8 copy")
    if subnet is not None:
        n = count_parameters(config, subnet)
        print(f"subnet       {n:,} parameters ({n / count_parameters(config):.1%} of the model)")
    if args.layers:
        for i in range(config.num_layers):
            print(f"  layer {i:3d}  {LAYER_NAMES[config.pattern[i]]:9s}  {config.layer_widths(i)}")
    from .checkpoint import read_routing

    routing = read_routing(args.model)
    if routing is not None:
        from .config import Subnet
        from .elastic.deploy import budget_report

        budgets = {b["budget"]: Subnet.from_dict(b["subnet"]) for b in routing["budgets"]}
        for subnet in budgets.values():
            subnet.validate(config)
        print(budget_report(config, budgets, args.context, args.dtype))


def cmd_extract(args: argparse.Namespace) -> None:
    from .checkpoint import check_output_path, load
    from .config import count_parameters, subnet_config
    from .elastic.deploy import extract_budgets, select_budgets
    from .model.padding import padding_note

    check_output_path(args.out, args.force, "extract", [args.checkpoint])
    model = load(args.checkpoint)
    labels = select_budgets(model, args.budget)
    for label, path, fmt in extract_budgets(model, labels, args.out, args.format, args.force, [args.checkpoint],
                                            gguf_type=args.gguf_type):
        n = count_parameters(model.config, model.budgets[label])
        note = padding_note(subnet_config(model.config, model.budgets[label])) if fmt == "hf" else ""
        print(f"budget {label}: {path} ({format_label(fmt, model.config.family)}, {n:,} parameters{note})")


def cmd_quantize(args: argparse.Namespace) -> None:
    from .config import count_parameters
    from .elastic.deploy import quantize_checkpoint

    out, model, before, after = quantize_checkpoint(args.checkpoint, args.out, args.to, args.force)
    mib = 1024 ** 2
    print(f"wrote {out} ({args.to}: {after / mib:,.1f} MiB, {after / before:.2f}x the {before / mib:,.1f} MiB of "
          f"{str(model.dtype).removeprefix('torch.')} weights)")
    parent = count_parameters(model.config)
    for label, subnet in model.budgets.items():
        n = count_parameters(model.config, subnet)
        print(f"  budget {label}: {n:,} parameters ({n / parent:.1%}), nested in the one int8 copy")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import load
    from .generate import generate

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    device = _device(args.device)
    model = load(args.model, device=device, dtype=_torch_dtype(args.dtype), serving=True)
    subnet = _read_subnet(args.subnet)
    if args.budget is not None:
        if subnet is not None:
            raise ConfigError("give --budget or --subnet, not both")
        from .elastic.deploy import select_budgets

        subnet = model.budgets[select_budgets(model, args.budget)[0]] if args.budget.lower() != "all" else None
        if subnet is None:
            raise ConfigError("--budget all is for `elasticlm extract`; generate runs one budget")
    tok = None
    if args.prompt is not None:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(args.model)
        ids = tok.encode(_utf8(args.prompt, "--prompt")).ids
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if not ids:
        raise ConfigError("the prompt is empty after tokenization")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {model.config.vocab_size})")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    eos = None if args.ignore_eos else model.config.eos_token_id
    start = time.perf_counter()
    if args.think_budget is not None:
        from .elastic.deploy import select_budgets
        from .generate import generate_think_answer

        if tok is None:
            raise ConfigError("--think-budget needs --prompt TEXT (the switch marker is text)")
        if args.temperature > 0:
            raise ConfigError("--think-budget decodes greedily; drop --temperature")
        think = model.budgets[select_budgets(model, args.think_budget)[0]]
        switch = args.switch.replace("\\n", "\n").replace("\\t", "\t")  # as typed in a shell
        new = generate_think_answer(model, [ids], switch_ids=tok.encode(switch).ids, think=think, answer=subnet,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=eos)[0]
    else:
        out = generate(model, torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, eos_token_id=eos, subnet=subnet,
                       generator=gen)
        new = out[0, len(ids):].tolist()
    seconds = time.perf_counter() - start
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    print(f"[{len(new)} tokens in {seconds:.2f}s]", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import check_output_path, load, save
    from .model.hf import hf_incompatibility, hf_label
    from .model.padding import padding_note

    check_output_path(args.dst, args.force, "model", [args.src])
    model = load(args.src, dtype=_torch_dtype(args.dtype))
    if args.to == "hf":
        reason = hf_incompatibility(model.config)
        if reason:
            raise ConfigError(f"cannot convert {args.src} to {hf_label(model.config.family)}: {reason}")
    save(model, args.dst, args.to, overwrite=args.force, inputs=[args.src], gguf_type=args.gguf_type)
    note = padding_note(model.config) if args.to == "hf" else ""
    print(f"wrote {args.dst} ({format_label(args.to, model.config.family)}, {model.num_parameters():,} "
          f"parameters{note})")


def format_label(fmt: str, family: str) -> str:
    from .model.hf import hf_label

    return {"hf": hf_label(family), "native": "elasticlm native", "gguf": "GGUF for llama.cpp"}[fmt]
GGUF_TYPE_HELP = ("GGUF tensor type for the weight matrices: auto keeps the weights' precision; q8_0 needs "
                  "rows that are a multiple of 32 (others fall back to f16); norms and SSM parameters stay f32")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .train.config import load_run_config
    from .train.pretrain import pretrain

    run = load_run_config(args.config, args.set or [])
    if args.out:
        run.train.out = args.out
    _set_val_data(run, args.val_data)
    final = pretrain(run, resume=args.resume, progress=not args.no_progress,
                     allow_config_change=args.allow_config_change)
    print(f"done: {run.train.out}/final  " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()
                                                     if isinstance(v, float)))


def _set_val_data(run: Any, path: str | None) -> None:
    """``--val-data FILE``: the run's validation data (data.val_path); training then reads all of data.path."""
    if path:
        run.data.val_path = path
        run.data.validate()


def cmd_train(args: argparse.Namespace) -> None:
    from .train.config import load_elastic_run_config
    from .train.elastic import train_elastic

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

    from .config import read_config_file
    from .train.plan import (
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
        from .train.plan import DEFAULT_GPU_FLOPS

        flops, source = DEFAULT_GPU_FLOPS, "assumed: H100/H200 dense bf16 peak; pass --flops for your device"
    cluster = Cluster(args.gpus, args.nodes, memory, flops, device=device)
    tables = read_config_file(args.config)
    if "parent" in tables or "stages" in tables or "elastic" in tables:
        from .train.config import load_elastic_run_config

        run = load_elastic_run_config(args.config, args.set or [])
        plan = plan_elastic(run, _parent_architecture(run.parent), cluster, args.checkpointing)
    else:
        from .train.config import load_run_config

        run = load_run_config(args.config, args.set or [])
        plan = plan_pretrain(run, cluster, args.checkpointing)
    plan.flops_source = source
    print(_json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 1 if plan.fits is False else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parent_architecture(parent: Any) -> Any:
    from .checkpoint import read_config
    from .config import ModelConfig, preset, read_config_file

    if parent.path and Path(parent.path).is_dir():
        return read_config(parent.path)[0]
    arch = parent.architecture
    if not arch:
        raise ConfigError(f"[parent] path {parent.path!r} does not exist yet; to plan before it does, set "
                          "[parent] architecture = a preset name or a config.json")
    config = ModelConfig.from_dict(read_config_file(arch)) if Path(arch).is_file() else preset(arch)
    if config.depth_order is None:  # sizes do not depend on which layers the importance pass drops first
        config.depth_order = list(range(config.num_layers))
    return config


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import check_output_path, load
    from .data.datasets import is_local
    from .elastic.deploy import select_budgets
    from .eval.report import Entry, evaluate_entries, markdown_table, parse_levels, parse_tasks, save_report
    from .tokenizer import load_tokenizer

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
        from .lm_eval import task_manager

        manager = task_manager(lm_tasks, args.lm_eval_include)  # unknown tasks: one line before any model runs
    out = Path(args.out) if args.out else Path(str(Path(args.checkpoint).resolve()) + "-eval")
    inputs = [args.checkpoint] + [spec.rpartition("=")[2] for spec in args.baseline or []]
    check_output_path(out, args.force, "report", inputs)
    device = _device(args.device)
    model = load(args.checkpoint, device=device)
    if ppl:
        _check_memory(model, args.batch_size, args.seq_len, "--batch-size or --seq-len")
    tok = load_tokenizer(args.checkpoint)
    name = Path(args.checkpoint).resolve().name
    if model.budgets:
        if args.subnet:
            raise ConfigError("--subnet is for plain models; an elastic checkpoint is evaluated by --budgets")
        entries = [Entry("elastic" if label not in getattr(model, "untrained", {}) else "elastic, not trained",
                         label, model, tok, model.budgets[label], str(args.checkpoint))
                   for label in select_budgets(model, args.budgets)]
        if args.think_budget is not None:
            think = select_budgets(model, args.think_budget)[0]
            entries += [Entry(f"think {think}", f"{think}→{e.budget}", model, tok, e.subnet, str(args.checkpoint),
                              think=model.budgets[think]) for e in list(entries) if e.budget != think]
    else:
        if args.budgets.strip().lower() != "all" or args.think_budget is not None:
            select_budgets(model, args.budgets)  # raises: not an elastic checkpoint
        entries = [Entry(name, "1.0", model, tok, _read_subnet(args.subnet), str(args.checkpoint))]
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
        from .lm_eval import run_tasks

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
            "untrained": {k: v.describe() for k, v in getattr(model, "untrained", {}).items()}}
    paths = save_report(points, out, meta, title=f"elasticlm eval {args.checkpoint}", force=args.force, inputs=inputs)
    print(markdown_table(points))
    print(f"\n[{args.n} held-out examples per family and difficulty, greedy decoding"
          + (f"; loss on {_loss_scope(args, points, whole)}" if ppl else "")
          + f"; {time.perf_counter() - start:.0f}s]")
    print("wrote " + ", ".join(str(p) for p in paths.values())
          + ("" if "plot" in paths else "  (no plot: pip install matplotlib)"))


def _loss_scope(args: argparse.Namespace, points: list[Any], whole: bool) -> str:
    """What the loss column covers, for the line under the table."""
    tokens = sorted({p.val_tokens for p in points if p.val_tokens is not None})
    counted = "/".join(f"{t:,}" for t in tokens) + " tokens"  # one count per distinct tokenizer
    if whole:
        part = "every token" if args.val_samples is None else f"{args.val_samples} windows"
        return f"{part} of {args.data}: {counted} in windows of up to {args.seq_len}"
    return f"{args.val_samples or 48} held-out sequences of {args.seq_len} tokens ({counted})"


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import comparison_lines, run_demo

    out = args.out or (("runs/demo-quick" if args.quick else "runs/demo")
                       + (f"-{args.family}" if args.family != "nemotron_h" else "")
                       + (f"-seed{args.seed}" if args.seed else ""))
    result = run_demo(out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress,
                      log=lambda msg: print(msg, flush=True), seed=args.seed, family=args.family)
    print("\n## elasticlm demo" + (" --quick" if args.quick else "") + "\n")
    print(result["table"])
    print()
    for line in comparison_lines(result["points"]):
        print(line)
    print(f"\nelastic checkpoint (every budget, shared weights): {result['elastic']}")
    print("extracted models: " + ", ".join(result["family"]))
    print("report: " + ", ".join(str(p) for p in result["paths"].values())
          + ("" if "plot" in result["paths"] else "  (no plot: pip install matplotlib)"))
    print(f"total {result['timings']['total'] / 60:.1f} min")


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serve import build_app, load_engine, serve_until_signalled

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


def _check_listen(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or "
                          "--host") from None


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .checkpoint import atomic_directory, check_output_path
    from .data.datasets import DataConfig, doc_text, documents
    from .tokenizer import save_tokenizer, train_bpe

    data = DataConfig(source=args.source, path=args.path, text_field=args.text_field, hf_name=args.hf_name)
    inputs = [args.path] if args.path else []
    check_output_path(args.out, args.force, "tokenizer", inputs)
    docs = documents(data, "train")(0)
    tok = train_bpe((doc_text(d) for _, d in zip(range(args.max_documents), docs, strict=False)), args.vocab_size)
    with atomic_directory(args.out, args.force, "tokenizer", inputs) as tmp:
        save_tokenizer(tok, tmp)
    print(f"wrote {args.out}/tokenizer.json ({tok.get_vocab_size()} tokens)")


def _data_spec(args: argparse.Namespace) -> Any:
    """The DataConfig of ``--data`` (and ``--separator``)."""
    from .data.datasets import data_config_from_spec

    # synthetic prompts are random digits: a validation loss counts the trace and answer only
    return data_config_from_spec(args.data, mask_prompt=args.data == "synthetic",
                                 separator=_escapes(args.separator) if args.separator else None)


def _escapes(text: str) -> str:
    """\\n and \\t as typed in a shell: a new line and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _calibration(args: argparse.Namespace, model: Any, model_dir: str, samples: int, split: str,
                 loss_mask: bool = False) -> Any:
    from .data.datasets import calibration_windows, is_local
    from .elastic.importance import calibration_batches
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    eos = model.config.eos_token_id
    if eos is None:
        raise ConfigError(f"{model_dir}: the model has no eos_token_id, needed to pack calibration documents")
    data = _data_spec(args)
    if is_local(data):  # a file the user gives is used whole: no hashed split
        flags = ("--val-samples" if split == "val" else "--samples", "--seq-len")
        return calibration_windows(data, lambda text: tok.encode(text).ids, eos, samples, args.seq_len,
                                   args.batch_size, loss_mask, flags)
    return calibration_batches(data, lambda text: tok.encode(text).ids, eos, samples, args.seq_len,
                               args.batch_size, split, loss_mask)


def cmd_importance(args: argparse.Namespace) -> None:
    from .checkpoint import check_output_path, load
    from .elastic.importance import auto_depth_rounds, estimate

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
        from .train.trainer import autocast_dtype

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
    from .checkpoint import check_output_path, load, save
    from .elastic.importance import Importance
    from .elastic.reorder import reorder_

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
    from .checkpoint import check_output_path, load, save
    from .config import parse_budget
    from .elastic.extract import extract
    from .elastic.prune import describe_subnet, search

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


# -- parser --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (``error: …``, exit 2), like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="elasticlm",
        description="Many nested model sizes from one hybrid Mamba-2/attention language model "
                    "(Nemotron Elastic). Each verb has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"elasticlm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error instead of one line")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("init", formatter_class=fmt, help="create a randomly initialised model directory",
                       description="Create a randomly initialised HybridLM (native format, byte-level "
                                   "tokenizer) from a preset and/or a JSON/TOML model config.")
    p.add_argument("out", help="directory to write (must not exist or be empty, unless --force)")
    p.add_argument("--preset", choices=["tiny", "demo", "nemotron-nano-12b-v2"],
                   help="start from a named architecture")
    p.add_argument("--config", help="JSON or TOML file of ModelConfig fields (TOML may use a [model] table)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override one field, e.g. --set hidden_size=128 --set pattern='\"M-*\"'")
    p.add_argument("--seed", type=_count(0), default=0, help="random seed of the initialisation")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("info", formatter_class=fmt, help="describe a model directory",
                       description="Print a model directory's architecture and exact parameter count "
                                   "(of the model, and of a Subnet if given). Reads config.json only.")
    p.add_argument("model", help="native or Hugging Face (NemotronH, Mamba2, Llama, Qwen2, Qwen3, Qwen3-MoE) directory")
    p.add_argument("--subnet", help="JSON file describing a Subnet (hidden_size, layers)")
    p.add_argument("--layers", action="store_true", help="list every layer's widths")
    p.add_argument("--context", type=_count(1), default=4096, help="context length for the memory of each budget")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="weight / KV-cache dtype for the memory of each budget")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", formatter_class=fmt, help="generate text with cached decoding",
                       description="Generate a continuation of a prompt (greedy by default; temperature and "
                                   "top-p sampling), optionally with a nested sub-model (--subnet).")
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="native or Hugging Face (NemotronH, Mamba2, Llama, Qwen2, Qwen3, Qwen3-MoE) directory, or an "
                        "elastic checkpoint")
    p.add_argument("--budget", help="run this budget of an elastic checkpoint (nested: no copy), e.g. 0.5; an "
                                    "untrained one (0.6) is placed by the router and said so")
    p.add_argument("--think-budget", help="think small, answer big: this budget writes the reasoning trace, and "
                                          "--budget (default: the full model) the answer from --switch on (greedy)")
    p.add_argument("--switch", default="\\nA:", help="the text that ends the thinking phase (\\n and \\t as "
                                                      "typed are a new line and a tab)")
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=_count(1), default=64, help="upper bound on generated tokens")
    p.add_argument("--temperature", type=_number(0.0, None), default=0.0, help="0 means greedy decoding")
    p.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), default=1.0,
                   help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--seed", type=_count(0), default=0, help="sampling seed")
    p.add_argument("--subnet", help="JSON file describing the Subnet to run (default: the full model)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: as stored)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("extract", formatter_class=fmt, help="slice trained budgets out as standalone models",
                       description="Write one trained budget (or all) of an elastic checkpoint as standalone "
                                   "model directories: weights, config, tokenizer and a model card, no training. "
                                   "Sub-models are written in the parent's Hugging Face class (NemotronH, Llama, "
                                   "Qwen2, Qwen3; transformers and vLLM load them without remote code), per-layer "
                                   "FFN widths, head counts and expert sizes zero-padded to the widest layer, which "
                                   "computes exactly the same function (the cost is printed); per-layer Mamba widths "
                                   "have no exact padded form and are written natively.")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint (final/ of `elasticlm train`)")
    p.add_argument("--budget", required=True,
                   help="a budget (0.5, 50%%, 780K; one never trained, e.g. 0.6, is placed by the router and marked "
                        "as untrained) or 'all' (the trained ones)")
    p.add_argument("--out", required=True, help="output directory (with 'all': one budget-<label>/ per budget)")
    p.add_argument("--format", choices=["auto", "hf", "native", "gguf"], default="auto",
                   help="auto: hf when the sub-model can be written so (no per-layer Mamba widths; Llama family: "
                        "whole decoder layers), else native; gguf: one llama.cpp file per budget (nemotron_h with "
                        "per-layer FFN widths; llama / qwen2 / qwen3 padded)")
    p.add_argument("--gguf-type", choices=["auto", "f32", "f16", "bf16", "q8_0"], default="auto",
                   help=GGUF_TYPE_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("quantize", formatter_class=fmt, help="one int8 copy that holds every budget",
                       description="Store the weight matrices of a model (an elastic checkpoint: every budget) in "
                                   "int8 with one scale per output row. Every budget's slice of the int8 copy is "
                                   "exactly the slice of its dequantized weights, so all budgets stay nested in one "
                                   "copy of about a quarter of the fp32 size; generate, eval, serve and extract read "
                                   "the result like any checkpoint (matrix products in torch's int8 weight-only "
                                   "kernel on CPU). Norms, biases, the Mamba convolution and SSM parameters and MoE "
                                   "routers stay in float.")
    p.add_argument("--checkpoint", required=True, help="model directory (elastic final/ or any native / HF one)")
    p.add_argument("--to", choices=["int8"], default="int8", help="weight format")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert", formatter_class=fmt,
                       help="convert between native, Hugging Face and GGUF formats",
                       description="Convert a model directory, or import a .gguf file (transformers' GGUF "
                                   "loader dequantizes it; any verb's --model also takes one). --to native (the "
                                   "default) writes elasticlm's format; --to hf writes a directory of the model's "
                                   "Hugging Face class (NemotronH, Mamba2, Llama, Qwen2, Qwen3, Qwen3-MoE) that "
                                   "transformers loads "
                                   "without trust_remote_code (per-layer widths zero-padded, exactly; Mamba widths "
                                   "shared by every layer); native allows any per-layer widths; --to gguf writes "
                                   "model.gguf for llama.cpp (nemotron_h, llama, qwen2, qwen3).")
    p.add_argument("src", help="source model directory (native or Hugging Face), or a .gguf file (llama, qwen2, "
                               "qwen3, qwen3moe; dequantized by transformers' GGUF loader, tokenizer included)")
    p.add_argument("dst", help="destination directory (must not exist or be empty, unless --force)")
    p.add_argument("--to", choices=["hf", "native", "gguf"], default="native",
                   help="output format (gguf: model.gguf for llama.cpp, with the tokenizer inside)")
    p.add_argument("--gguf-type", choices=["auto", "f32", "f16", "bf16", "q8_0"], default="auto",
                   help=GGUF_TYPE_HELP)
    p.add_argument("--dtype", choices=DTYPES, help="convert the weights to this dtype")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pretrain", formatter_class=fmt, help="train a parent model from scratch",
                       description="Train a HybridLM parent from a TOML run config ([model], [tokenizer], [data], "
                                   "[train], [eval]); checkpoints, metrics.jsonl and final/ go under train.out.")
    p.add_argument("--config", help="TOML (or JSON) run config, e.g. configs/demo-parent.toml")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a field, e.g. --set train.steps=200 --set train.lr=1e-3")
    p.add_argument("--out", help="shortcut for --set train.out=DIR")
    p.add_argument("--val-data", metavar="PATH", help="validation text / JSONL file or folder (shortcut for --set "
                                                      "data.val_path=PATH); training then reads all of data.path")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in train.out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the checkpoint's in fields a resume must keep "
                        "(architecture, budgets, stages, data, …); without it such a resume is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and metrics only)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", formatter_class=fmt, help="elastic training: every budget of one model at once",
                       description="Elastic training (knowledge distillation from the frozen parent, router, "
                                   "budgets, stages) from a TOML config with [parent] path = an importance-ordered "
                                   "parent (`elasticlm reorder`), [elastic] budgets and choice sets, [distill], "
                                   "[data], [train], [eval] and [[stages]]. Multi-process: torchrun "
                                   "--nproc_per_node N -m elasticlm train ... (DDP, or train.parallel=fsdp).")
    p.add_argument("--config", help="TOML (or JSON) run config, e.g. configs/demo-elastic.toml")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a field, e.g. --set elastic.budgets='[1.0,0.5]' --set stages[0].tokens=100000")
    p.add_argument("--parent", help="shortcut for --set parent.path=DIR")
    p.add_argument("--out", help="shortcut for --set train.out=DIR")
    p.add_argument("--val-data", metavar="PATH", help="validation text / JSONL file or folder (shortcut for --set "
                                                      "data.val_path=PATH); training then reads all of data.path")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in train.out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the checkpoint's in fields a resume must keep "
                        "(architecture, budgets, stages, data, …); without it such a resume is refused")
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

    data_help = ("calibration data: 'synthetic' (the embedded blend), a .jsonl file (field 'text'), a text "
                 "file or folder, or hf:NAME[:CONFIG]; a file or folder is used whole (hold it out yourself)")
    separator_help = ("text data: cut each file into documents at this string (\\n\\n: paragraphs); default: "
                      "each file is one document")

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
                                 "runs/demo-FAMILY with --family, runs/demo-seedN with --seed N)")
    p.add_argument("--family", choices=["nemotron_h", "nemotron_h_moe", "llama", "qwen3"], default="nemotron_h",
                   help="the parent's architecture: the Nemotron-H hybrid (Mamba-2 + attention + MLP), the hybrid "
                        "with mixture-of-experts layers instead of MLPs (8 experts, top 2, a shared expert), or a "
                        "Llama- or Qwen3-shaped transformer (rotary attention + gated SiLU MLP) of about the same "
                        "size; the rest of the recipe is the same")
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
                   help="comma list: ppl, reasoning (add, vars, sort), recall, or single families")
    p.add_argument("--difficulty", default="default,hard", help="difficulty levels to score: default, hard")
    p.add_argument("--n", type=_count(1), default=100, help="examples per family and difficulty")
    p.add_argument("--baseline", action="append", metavar="[LABEL=]DIR",
                   help="another model directory to score and plot alongside (repeatable), e.g. a pruned model")
    p.add_argument("--subnet", help="JSON Subnet of a plain model to evaluate (default: the full model)")
    p.add_argument("--data", default="synthetic", help=data_help.replace("calibration", "validation"))
    p.add_argument("--separator", help=separator_help)
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

    p = sub.add_parser("importance", formatter_class=fmt, help="score every width axis and layer (calibration)",
                       description="Forward passes on calibration data score hidden channels, FFN neurons, "
                                   "attention heads, Mamba heads and head channels (DESIGN 2.3), and rank layers by "
                                   "the normalized MSE of the logits when each is removed (iterative and one-shot) "
                                   "and by cosine block importance. Writes scores.safetensors + importance.json.")
    p.add_argument("--model", required=True, help="parent model directory (with tokenizer.json)")
    p.add_argument("--data", default="synthetic", help=data_help)
    p.add_argument("--separator", help=separator_help)
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
    p.add_argument("--data", default="synthetic", help=data_help.replace("calibration", "validation"))
    p.add_argument("--separator", help=separator_help)
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
    return parser


def _check_memory(model: Any, rows: int, seq_len: int, knobs: str) -> None:
    from .train.plan import check_forward_memory

    check_forward_memory(model.config, rows, seq_len, model.device, knobs)


def _utf8(text: str, option: str) -> str:
    """``text`` as the OS gave it (undecodable bytes arrive surrogate-escaped), or a clear refusal."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate that is no escaped byte
        raise ConfigError(f"{option} cannot be encoded as UTF-8 ({exc.reason} at offset {exc.start})") from None
    except UnicodeDecodeError as bad:
        raise ConfigError(f"{option} is not valid UTF-8 (byte 0x{raw[bad.start]:02x} at offset {bad.start}); "
                          "pass UTF-8 text, or token ids with --prompt-ids") from None


def _count(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer >= ``low`` (and <= ``high``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value
    return parse


def _number(low: float | None, high: float | None, low_open: bool = False) -> Any:
    """An argparse type: a finite number in [low, high] (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    return parse


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    import logging

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed in one line)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("elasticlm").setLevel(logging.INFO)
    try:
        rc = args.func(args)
    except ElasticLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`elasticlm info … | head`): nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141
    except MemoryError:
        print("error: out of memory; lower the batch size or sequence length (or use a larger machine)",
              file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a case without its own message yet: one line, the rest in a file
        if args.debug:
            raise
        report = _write_traceback(exc)
        where = f"full traceback in {report}" if report else "the traceback could not be saved"
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)} ({where}; --debug prints it; "
              "please report it)", file=sys.stderr)
        return 1
    return rc if isinstance(rc, int) else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _write_traceback(exc: BaseException) -> str | None:
    import tempfile
    import traceback

    try:
        fd, name = tempfile.mkstemp(prefix="elasticlm-error-", suffix=".txt")
        with open(fd, "w") as fh:
            fh.write(f"elasticlm {' '.join(sys.argv[1:])}\n\n")
            fh.write("".join(traceback.format_exception(exc)))
        return name
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
