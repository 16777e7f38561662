"""One int8 copy for every budget: quality against the float checkpoint, resident memory, and decode speed against
fp32 elasticlm, transformers and llama.cpp's q8_0 — per budget, in one run.

    python bench/bench_quantized.py --checkpoint /work/real/elastic/final --text /work/real/data/heldout.txt \\
        --llama-bench portable=PATH/build-portable/bin/llama-batched-bench \\
        --llama-bench native=PATH/build-native/bin/llama-batched-bench --json docs/bench/quantized-smollm2.json
    python bench/bench_quantized.py --checkpoint runs/demo/elastic/final --synthetic \\
        --json docs/bench/quantized-demo.json

``elasticlm quantize`` writes the int8 checkpoint; every budget is extracted from the float checkpoint as a
Hugging Face directory (for transformers) and, for llama.cpp, as a q8_0 GGUF (``elasticlm extract --format gguf
--gguf-type q8_0``; tensor for tensor what llama.cpp's own converter writes, docs/engines.md). Then:

* **quality**, int8 nested vs float nested, same windows: perplexity on held-out text (``--text``; ``--synthetic``:
  the demo's held-out task examples), top-1 agreement of the next-token prediction at every position
  (teacher-forced), and greedy agreement — how many of ``--prompts`` greedy continuations of ``--new-tokens`` are
  identical, and the mean length of their common prefix;
* **resident memory** of a fresh process that loads the checkpoint for serving and decodes a few tokens at every
  budget (its anonymous resident memory, RssAnon, minus that of a process that built a tiny model on the meta device
  and ran one — torch's one-time set-up; and the peak, VmHWM, which includes loading): fp32, bf16 and int8;
* **decode tokens/s** per budget at batch 1 and batch 8 (``--prompt-tokens`` prompt, ``--new-tokens`` greedy
  tokens, no EOS stop; the time of the new tokens = the whole call minus a prefill-only call, median of
  ``--repeats``): elasticlm fp32 nested, elasticlm int8 nested, transformers fp32 on the extracted budget, and
  llama.cpp's ``llama-batched-bench`` on the q8_0 file (its S_TG: generated tokens / generation time, prompt
  not shared). All with ``--threads`` threads, one engine at a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROBE = """
import sys, torch, elasticlm
torch.set_num_threads(int(sys.argv[3]))
path, dtype = sys.argv[1], sys.argv[2]
ids = torch.tensor([[5, 6, 7, 8]])
if dtype == "none":  # the baseline: torch's one-time set-up, no weights (loading builds the model on the meta
    # device first, and torch's first meta-device module costs ~70 MB of its own, once per process)
    cfg = elasticlm.ModelConfig(pattern="*-", vocab_size=16, hidden_size=16, num_attention_heads=2,
                                num_key_value_heads=1, attention_head_dim=8, intermediate_size=16)
    elasticlm.HybridLM(cfg, device="meta")
    with torch.inference_mode():
        elasticlm.generate(elasticlm.HybridLM(cfg), ids, max_new_tokens=4)
else:
    d = elasticlm.Deployment.load(path, serving=True, dtype=None if dtype == "stored" else getattr(torch, dtype))
    with torch.inference_mode():
        for b in d.budgets:
            d.generate(ids, budget=b, max_new_tokens=4)
# RssAnon: the process's own memory (file-backed pages of torch's libraries are shared and evictable); VmHWM: peak
status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
          if line.startswith(("RssAnon", "VmHWM"))}
print(status["RssAnon"], status["VmHWM"])
"""


def resident(path: str, dtype: str, threads: int) -> tuple[int, int]:
    """(resident, peak) bytes of a process that loaded ``path`` for serving and decoded at every budget."""
    out = subprocess.run([sys.executable, "-c", PROBE, path, dtype, str(threads)], capture_output=True, text=True,
                         check=True)
    rss, peak = out.stdout.strip().splitlines()[-1].split()
    return int(rss), int(peak)


def texts_and_prompts(args, tok) -> tuple[list[list[int]], list[list[int]]]:
    """Scoring windows and greedy prompts (token ids)."""
    if args.synthetic:
        from elasticlm.data.synthetic import MAKERS, eval_set

        examples = [ex for fam in MAKERS for ex in eval_set(fam, 3, args.windows // len(MAKERS) + 1, seed=7)]
        windows = [tok.encode(ex.text).ids for ex in examples][: args.windows]
        prompts = [tok.encode(ex.query).ids for ex in examples][: args.prompts]
        return windows, prompts
    ids = tok.encode(Path(args.text).read_text()).ids
    w = args.window
    windows = [ids[i: i + w] for i in range(0, len(ids) - w, w)][: args.windows]
    rng = random.Random(0)
    starts = sorted(rng.sample(range(len(ids) - args.prompt_tokens), args.prompts))
    return windows, [ids[s: s + 32] for s in starts]


@torch.inference_mode()
def quality(float_model, int8_model, label, windows, prompts, new_tokens) -> dict:
    """``float_model`` and ``int8_model``: the two checkpoints' Deployments."""
    nll = {"float": 0.0, "int8": 0.0}
    count = same = 0
    for w in windows:
        ids = torch.tensor([w])
        a = float_model.model(ids, subnet=float_model.subnet(label))[0, :-1].float()
        b = int8_model.model(ids, subnet=int8_model.subnet(label))[0, :-1].float()
        target = ids[0, 1:]
        nll["float"] += torch.nn.functional.cross_entropy(a, target, reduction="sum").item()
        nll["int8"] += torch.nn.functional.cross_entropy(b, target, reduction="sum").item()
        same += (a.argmax(-1) == b.argmax(-1)).sum().item()
        count += target.numel()
    identical, prefix = 0, []
    for p in prompts:
        ids = torch.tensor([p])
        x = float_model.generate(ids, budget=label, max_new_tokens=new_tokens)[0, len(p):].tolist()
        y = int8_model.generate(ids, budget=label, max_new_tokens=new_tokens)[0, len(p):].tolist()
        identical += x == y
        prefix.append(next((i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v), len(x)))
    return {"ppl_float": float(torch.tensor(nll["float"] / count).exp()),
            "ppl_int8": float(torch.tensor(nll["int8"] / count).exp()), "tokens": count,
            "top1_agreement": same / count, "greedy_identical": identical, "greedy_prompts": len(prompts),
            "greedy_common_prefix": statistics.mean(prefix)}


def tokens_per_second(run, batch: int, new_tokens: int) -> float:
    """Decode speed of one measurement: ``run(n)`` generates ``n`` tokens per row (a callable that times itself
    returns its own rate instead); the 1-token call is the prefill, subtracted."""
    if getattr(run, "rate", False):
        return run(new_tokens)
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(new_tokens)
    t2 = time.perf_counter()
    return batch * (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def ours(model, ids: torch.Tensor, label: str):
    """``model``: a Deployment (nested decoding, its slice memo kept across calls)."""
    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, budget=label, max_new_tokens=n)
    return run


def theirs(hf, ids: torch.Tensor):
    def run(n: int) -> None:
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return run


def llama_batched(binary: str, gguf: Path, args, batch: int):
    """llama.cpp's llama-batched-bench at one batch size; returns its S_TG (generated tokens / generation time)."""
    def run(n: int) -> float:
        ctx = max(1024, (args.prompt_tokens + n) * batch + 64)  # a small -c makes it skip every configuration
        cmd = [binary, "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", str(args.prompt_tokens), "-ntg", str(n), "-npl", str(batch), "-t", str(args.threads),
               "--output-format", "jsonl"]
        for _ in range(3):  # now and then (the demo's nemotron_h files) it prints the header and no row
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            if rows:
                return rows[0]["speed_tg"]
        return float("nan")
    run.rate = True
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="float elastic checkpoint (final/ of elasticlm train)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="held-out text file (quality windows and greedy prompts)")
    src.add_argument("--synthetic", action="store_true", help="the demo's held-out task examples instead")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--llama-bench", action="append", default=[], metavar="LABEL=BINARY",
                    help="llama.cpp's llama-batched-bench (several builds: one flag each)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--work", help="keep the int8 checkpoint and the extracted budgets here (default: a temp dir)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import elasticlm
    from elasticlm.elastic.deploy import extract_budgets, quantize_checkpoint
    from elasticlm.model.quantize import state_bytes
    from elasticlm.tokenizer import load_tokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-quantized-"))
    t0 = time.perf_counter()
    if not (work / "int8" / "config.json").exists():
        quantize_checkpoint(args.checkpoint, work / "int8")
    float_model = elasticlm.Deployment.load(args.checkpoint, serving=True)
    int8_model = elasticlm.Deployment.load(work / "int8", serving=True)
    labels = list(float_model.budgets)
    batches = [int(b) for b in args.batches.split(",")]
    hf_dirs, ggufs = {}, {}
    for label in labels:
        hf_dirs[label], ggufs[label] = work / f"hf-{label}", work / f"gguf-{label}"
        if not (hf_dirs[label] / "config.json").exists() and not args.no_transformers:
            extract_budgets(float_model, [label], hf_dirs[label], "hf")
        if args.llama_bench and not (ggufs[label] / "model.gguf").exists():
            extract_budgets(float_model, [label], ggufs[label], "gguf", gguf_type="q8_0")
    print(f"prepared in {time.perf_counter() - t0:.0f}s: {work}", file=sys.stderr)

    tok = load_tokenizer(args.checkpoint)
    windows, prompts = texts_and_prompts(args, tok)
    result = {"checkpoint": str(args.checkpoint), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "cpu_flags": cpu_flags(), "budgets": {}}
    for label in labels:
        q = quality(float_model, int8_model, label, windows, prompts, args.new_tokens)
        result["budgets"][label] = {"parameters": float_model.num_parameters(label),
                                    "quality": q}
        print(f"quality {label}: {q}", file=sys.stderr)

    base = resident(str(args.checkpoint), "none", args.threads)
    runs = {"fp32": resident(str(args.checkpoint), "float32", args.threads),
            "bf16": resident(str(args.checkpoint), "bfloat16", args.threads),
            "int8": resident(str(work / "int8"), "stored", args.threads)}
    result["memory"] = {"rss": {k: v[0] - base[0] for k, v in runs.items()},
                        "peak": {k: v[1] - base[1] for k, v in runs.items()},
                        "state_bytes": {"fp32": state_bytes(float_model.model),
                                        "int8": state_bytes(int8_model.model)}}
    print(f"memory: {result['memory']}", file=sys.stderr)

    gen = torch.Generator().manual_seed(0)
    for label in labels:
        hf = None
        if not args.no_transformers:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(hf_dirs[label], dtype=torch.float32).eval()
        speeds: dict[str, dict[int, float]] = {}
        for b in batches:
            ids = torch.randint(3, float_model.config.vocab_size, (b, args.prompt_tokens), generator=gen)
            engines = {"elasticlm fp32": ours(float_model, ids, label), "elasticlm int8": ours(int8_model, ids, label)}
            if hf is not None:
                engines["transformers fp32"] = theirs(hf, ids)
            for spec in args.llama_bench:
                name, binary = spec.split("=", 1)
                engines[f"llama.cpp q8_0 ({name})"] = llama_batched(binary, ggufs[label] / "model.gguf", args, b)
            runs: dict[str, list[float]] = {name: [] for name in engines}
            for run in engines.values():  # warm-up
                run(2)
            for _ in range(args.repeats):  # engines interleaved: the machine's drift hits each alike
                for name, run in engines.items():
                    runs[name].append(tokens_per_second(run, b, args.new_tokens))
            for name, values in runs.items():
                speeds.setdefault(name, {})[b] = statistics.median(values)
        del hf
        print(f"speed {label}: {speeds}", file=sys.stderr)
        result["budgets"][label]["decode_tok_s"] = speeds
    print_tables(result, batches)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"))


def print_tables(result: dict, batches: list[int]) -> None:
    mib = 1024 ** 2
    print("| budget | parameters | ppl float | ppl int8 | top-1 agreement | greedy identical | common prefix |")
    print("|---|---|---|---|---|---|---|")
    for label, r in result["budgets"].items():
        q = r["quality"]
        print(f"| {label} | {r['parameters']:,} | {q['ppl_float']:.3f} | {q['ppl_int8']:.3f} | "
              f"{q['top1_agreement']:.1%} | {q['greedy_identical']}/{q['greedy_prompts']} | "
              f"{q['greedy_common_prefix']:.1f} |")
    m = result["memory"]
    print("\n| weights | resident after decoding every budget | ÷ fp32 | peak (load included) | tensors held |")
    print("|---|---|---|---|---|")
    for k in ("fp32", "bf16", "int8"):
        held = m["state_bytes"].get(k)
        print(f"| {k} | {m['rss'][k] / mib:,.1f} MiB | {m['rss'][k] / m['rss']['fp32']:.2f} | "
              f"{m['peak'][k] / mib:,.1f} MiB | {'' if held is None else f'{held / mib:,.1f} MiB'} |")
    engines = list(next(iter(result["budgets"].values()))["decode_tok_s"])
    print("\n| budget | batch | " + " | ".join(engines) + " | int8 ÷ llama.cpp |")
    print("|---|---|" + "---|" * (len(engines) + 1))
    for label, r in result["budgets"].items():
        for b in batches:
            s = r["decode_tok_s"]
            cells = [f"{s[e][b]:.1f}" for e in engines]
            llama = [s[e][b] for e in engines if e.startswith("llama.cpp")]
            ratio = " / ".join(f"{s['elasticlm int8'][b] / v:.2f}" for v in llama) or "–"
            print(f"| {label} | {b} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
