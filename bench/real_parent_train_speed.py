"""Training speed and peak memory of one model directory, elasticlm against transformers, in one run.

    python bench/real_parent_train_speed.py /work/real/hf-smollm2 --batch 4 --seq 256 --steps 4

Both engines load the same Hugging Face directory and take the same optimizer step on the same random batch:
forward, next-token cross-entropy over every position, backward, AdamW (lr 1e-5), zero_grad. elasticlm computes
the loss the way its trainer does (the head applied over token chunks, recomputed in backward, so the full
``[tokens, vocab]`` logits never exist at once); transformers through ``model(input_ids, labels=...)``. Timing:
fp32 and, where the CPU has bf16 (AVX512-BF16 / AMX), bf16 autocast, the engines alternating step by step after
one warm-up step each, median per engine and dtype. Peak memory: each (engine, dtype) runs again in a child
process of its own, which reports its peak resident memory (``ru_maxrss``) after the model is loaded and after
``--steps`` steps; the difference is what training adds (gradients, AdamW state, activations, logits). The
children run first, before this process loads anything.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load(engine: str, directory: Path) -> torch.nn.Module:
    if engine == "elasticlm":
        import elasticlm

        return elasticlm.load(directory).train()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()


def stepper(engine: str, model: torch.nn.Module, ids: torch.Tensor, amp: torch.dtype | None):
    """One optimizer step as a closure; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)

    def step() -> float:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            if engine == "elasticlm":
                from elasticlm.train.losses import ce_loss_from_hidden

                loss = model(inputs, head=lambda h, w: ce_loss_from_hidden(h, w, targets, keep)) / keep.sum()
            else:
                logits = model(inputs).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peak_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would include the parent's peak from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = load(args.engine, args.directory)
    loaded = peak_mib()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    step = stepper(args.engine, model, ids, torch.bfloat16 if args.dtype == "bf16" else None)
    for _ in range(args.steps):
        step()
    print(json.dumps({"loaded_mib": loaded, "peak_mib": peak_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path, help="a Hugging Face model directory (both engines load it)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (the targets are the next tokens)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per engine and dtype (after one warm-up)")
    ap.add_argument("--dtypes", default="auto", help="fp32,bf16 | fp32 | auto (bf16 too where the CPU has it)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # child mode: one engine, one dtype, peak memory
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return child(args)
    dtypes = (["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]) if args.dtypes == "auto" else args.dtypes.split(",")
    engines = ("elasticlm", "transformers")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens; "
          f"AdamW; {args.steps} timed steps each")
    memory = {}
    for dt in dtypes:
        for e in engines:
            out = subprocess.run([sys.executable, __file__, str(args.directory), "--engine", e, "--dtype", dt,
                                  "--batch", str(args.batch), "--seq", str(args.seq), "--steps", "2"],
                                 check=True, capture_output=True, text=True).stdout
            memory[(e, dt)] = json.loads(out.strip().splitlines()[-1])
    models = {e: load(e, args.directory) for e in engines}
    vocab = models["elasticlm"].config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    results = []
    for dt in dtypes:
        amp = torch.bfloat16 if dt == "bf16" else None
        steps = {e: stepper(e, models[e], ids, amp) for e in engines}
        times: dict[str, list[float]] = {e: [] for e in engines}
        losses = {e: steps[e]() for e in engines}  # warm-up (and the first-step loss: same model, same batch)
        for _ in range(args.steps):
            for e in engines:
                t0 = time.perf_counter()
                steps[e]()
                times[e].append(time.perf_counter() - t0)
        row = {"dtype": dt, "first_loss": losses}
        for e in engines:
            row[f"{e}_tok_s"] = tokens / statistics.median(times[e])
            row[f"{e}_peak_mib"] = memory[(e, dt)]["peak_mib"]
            row[f"{e}_train_mib"] = memory[(e, dt)]["peak_mib"] - memory[(e, dt)]["loaded_mib"]
        results.append(row)
        # the AdamW steps moved the weights: reload so the next dtype starts from the same model
        models = {e: load(e, args.directory) for e in engines}
    print("| dtype | elasticlm tok/s | transformers tok/s | elasticlm ÷ transformers | peak MiB (elasticlm / "
          "transformers) | added by training MiB (elasticlm / transformers) | first-step loss (elasticlm / "
          "transformers) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['elasticlm_tok_s']:.0f} | {r['transformers_tok_s']:.0f} | "
              f"{r['elasticlm_tok_s'] / r['transformers_tok_s']:.2f} | {r['elasticlm_peak_mib']:.0f} / "
              f"{r['transformers_peak_mib']:.0f} | {r['elasticlm_train_mib']:.0f} / {r['transformers_train_mib']:.0f} "
              f"| {r['first_loss']['elasticlm']:.4f} / {r['first_loss']['transformers']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "seq": args.seq, "steps": args.steps,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
