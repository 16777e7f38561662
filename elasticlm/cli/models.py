"""Verbs on model directories: create, describe, generate, slice budgets out, quantize, convert."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import (
    DTYPES,
    GGUF_TYPE_HELP,
    HF_FAMILIES,
    _count,
    _device,
    _number,
    _read_mapping,
    _read_subnet,
    _torch_dtype,
    _utf8,
    format_label,
)


def cmd_init(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoint import check_output_path, save
    from ..config import PRESETS, ModelConfig, overlay_tables, parse_value
    from ..model.hybrid import HybridLM
    from ..tokenizer import byte_level_tokenizer, save_tokenizer

    check_output_path(args.out, args.force)
    fields: dict[str, Any] = PRESETS[args.preset] if args.preset else {}
    if args.config:
        fields = overlay_tables(fields, _read_mapping(args.config))
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        section, _, name = key.strip().rpartition(".")  # sliding_attention.window=8: a field of a kind's section
        if section and not isinstance(fields.get(section, {}), dict):
            raise ConfigError(f"--set {key.strip()}: {section!r} is not a section")
        fields = overlay_tables(fields, {section: {name: parse_value(value)}} if section else
                                {name: parse_value(value)})
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
    from ..checkpoint import read_config
    from ..config import LAYER_NAMES, count_parameters
    from ..kinds import kind_of
    from ..model.hf import hf_label

    config, kind = read_config(args.model)
    subnet = _read_subnet(args.subnet)
    print(f"{args.model}  ({hf_label(config.family) if kind == 'hf' else 'elasticlm native'}, "
          f"family {config.family})")
    print(f"pattern      {config.pattern}  ({config.num_layers} layers: "
          + ", ".join(f"{config.count(k)} {n}" for k, n in LAYER_NAMES.items() if config.count(k)) + ")")
    print(f"hidden       {config.hidden_size}   vocab {config.vocab_size}   tied head {config.tie_word_embeddings}")
    if any(kind_of(c).attends for c in config.pattern):
        rope = config.rope_parameters
        position = ("none" if rope is None
                    else f"rotary ({rope.get('rope_type', 'default')}, theta {rope['rope_theta']:g})")
        biases = "q/k/v" * config.attention_bias + (", o" if config.attention_out_bias else "") or "none"
        print(f"attention    {config.num_key_value_heads} KV heads × head_dim {config.attention_head_dim}; positions "
              f"{position}; biases {biases}; q/k norm {'yes' if config.qk_norm else 'no'}")
    if config.count("-"):
        print(f"mlp          {'gated SiLU' if config.mlp_type == 'swiglu' else 'squared ReLU'}")
    if config.count("E"):
        from ..config import count_active_parameters

        print(f"active       {count_active_parameters(config):,} parameters per token (top-k routed experts)")
    for name, section in config.sections.items():  # the settings of kinds that keep their own
        if name in {kind_of(c).name for c in config.pattern}:
            print(f"{name:<12} " + "; ".join(f"{k} {v}" for k, v in dataclasses.asdict(section).items()
                                             if v is not None))
    print(f"parameters   {count_parameters(config):,}")
    if kind == "native":
        from ..checkpoint import read_json

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
    from ..checkpoint import read_routing

    routing = read_routing(args.model)
    if routing is not None:
        from ..config import Subnet
        from ..elastic.deploy import budget_report

        budgets = {b["budget"]: Subnet.from_dict(b["subnet"]) for b in routing["budgets"]}
        for subnet in budgets.values():
            subnet.validate(config)
        print(budget_report(config, budgets, args.context, args.dtype))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from ..elastic.deployment import Deployment

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    device = _device(args.device)
    deployment = Deployment.load(args.model, device=device, dtype=_torch_dtype(args.dtype), serving=True)
    model = deployment.model
    subnet = _read_subnet(args.subnet)
    if args.budget is not None:
        if subnet is not None:
            raise ConfigError("give --budget or --subnet, not both")
        if args.budget.strip().lower() == "all":
            raise ConfigError("--budget all is for `elasticlm extract`; generate runs one budget")
        subnet = deployment.subnet(args.budget)
    tok = None
    if args.prompt is not None:
        from ..tokenizer import load_tokenizer

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
        from ..generate import generate_think_answer

        if tok is None:
            raise ConfigError("--think-budget needs --prompt TEXT (the switch marker is text)")
        if args.temperature > 0:
            raise ConfigError("--think-budget decodes greedily; drop --temperature")
        think = deployment.subnet(args.think_budget)
        switch = args.switch.replace("\\n", "\n").replace("\\t", "\t")  # as typed in a shell
        new = generate_think_answer(model, [ids], switch_ids=tok.encode(switch).ids, think=think, answer=subnet,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=eos)[0]
    else:
        out = deployment.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, eos_token_id=eos, subnet=subnet,
                                  generator=gen)
        new = out[0, len(ids):].tolist()
    seconds = time.perf_counter() - start
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    print(f"[{len(new)} tokens in {seconds:.2f}s]", file=sys.stderr)


def cmd_extract(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output_path
    from ..config import count_parameters, subnet_config
    from ..elastic.deploy import extract_budgets
    from ..elastic.deployment import Deployment
    from ..model.padding import padding_note

    check_output_path(args.out, args.force, "extract", [args.checkpoint])
    deployment = Deployment.load(args.checkpoint)
    config = deployment.config
    labels = deployment.labels(args.budget)
    for label, path, fmt in extract_budgets(deployment, labels, args.out, args.format, args.force,
                                            [args.checkpoint], gguf_type=args.gguf_type):
        n = count_parameters(config, deployment.budgets[label])
        note = padding_note(subnet_config(config, deployment.budgets[label])) if fmt == "hf" else ""
        print(f"budget {label}: {path} ({format_label(fmt, config.family)}, {n:,} parameters{note})")


def cmd_quantize(args: argparse.Namespace) -> None:
    from ..config import count_parameters
    from ..elastic.deploy import quantize_checkpoint

    quantized, before, after = quantize_checkpoint(args.checkpoint, args.out, args.to, args.force)
    mib = 1024 ** 2
    print(f"wrote {quantized.source} ({args.to}: {after / mib:,.1f} MiB, {after / before:.2f}x the "
          f"{before / mib:,.1f} MiB of {str(quantized.model.dtype).removeprefix('torch.')} weights)")
    parent = count_parameters(quantized.config)
    for label, subnet in quantized.budgets.items():
        n = count_parameters(quantized.config, subnet)
        print(f"  budget {label}: {n:,} parameters ({n / parent:.1%}), nested in the one int8 copy")


def cmd_convert(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output_path, load, save
    from ..model.hf import hf_incompatibility, hf_label
    from ..model.padding import padding_note

    check_output_path(args.dst, args.force, "model", [args.src])
    model = load(args.src, dtype=_torch_dtype(args.dtype))
    if args.to == "hf":
        reason = hf_incompatibility(model.config)
        if reason:
            raise ConfigError(f"cannot convert {args.src} to {hf_label(model.config.family)}: {reason}")
    save(model, args.dst, args.to, tokenizer_dir=args.src, overwrite=args.force, inputs=[args.src],
         gguf_type=args.gguf_type)
    note = padding_note(model.config) if args.to == "hf" else ""
    print(f"wrote {args.dst} ({format_label(args.to, model.config.family)}, {model.num_parameters():,} "
          f"parameters{note})")


def add_parsers(sub: Any, fmt: type) -> None:
    """The verbs of this module on the ``elasticlm`` parser's subcommands."""
    p = sub.add_parser("init", formatter_class=fmt, help="create a randomly initialised model directory",
                       description="Create a randomly initialised HybridLM (native format, byte-level "
                                   "tokenizer) from a preset and/or a JSON/TOML model config.")
    p.add_argument("out", help="directory to write (must not exist or be empty, unless --force)")
    p.add_argument("--preset", choices=["tiny", "demo", "nemotron-nano-12b-v2"],
                   help="start from a named architecture")
    p.add_argument("--config", help="JSON or TOML file of ModelConfig fields (TOML may use a [model] table)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override one field, e.g. --set hidden_size=128 --set pattern='\"M-*\"'; a kind's section "
                        "field as SECTION.FIELD, e.g. --set moe.top_k=1 --set sliding_attention.window=512")
    p.add_argument("--seed", type=_count(0), default=0, help="random seed of the initialisation")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("info", formatter_class=fmt, help="describe a model directory",
                       description="Print a model directory's architecture and exact parameter count "
                                   "(of the model, and of a Subnet if given). Reads config.json only.")
    p.add_argument("model", help=f"native or Hugging Face ({HF_FAMILIES}) directory")
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
                   help=f"native or Hugging Face ({HF_FAMILIES}) directory, or an elastic checkpoint")
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
                                   f"Hugging Face class ({HF_FAMILIES}) that "
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
