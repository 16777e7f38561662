"""Training-step and decode throughput of HybridLM vs transformers' NemotronH, same process.

Both models hold the same weights (imported from the transformers one); transformers runs its
PyTorch path (no mamba_ssm / causal_conv1d on CPU). Reports medians of several timed repeats,
the ratios, and the model's FLOP/s as a fraction of a large fp32 matmul's FLOP/s measured in
the same run.

    python bench/bench_model.py                       # demo-size model, CPU defaults
    python bench/bench_model.py --preset tiny --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from elasticlm import ModelConfig, generate, preset
from elasticlm.model.hf import from_transformers, to_transformers
from elasticlm.model.hybrid import HybridLM

# Nemotron Nano V2 12B's proportions at CPU scale: d_inner = 2 × hidden, 16 Mamba heads per
# group, chunk 128, FFN = 4 × hidden, 4 query heads per KV head.
NANO_SHAPED = dict(pattern="M-M-M*-M-M-M*-", vocab_size=4096, hidden_size=256, mamba_num_heads=32, mamba_head_dim=16,
                   mamba_n_groups=2, ssm_state_size=64, chunk_size=128, num_attention_heads=8, num_key_value_heads=2,
                   attention_head_dim=32, intermediate_size=1024)


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb``, run alternately so that drift hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats)


def train_step_fn(model: torch.nn.Module, ids: torch.Tensor, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits = model(ids, use_cache=False).logits if is_hf else model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="a model preset, or 'nano-shaped' (Nano 12B proportions)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = ModelConfig.from_dict(NANO_SHAPED) if args.preset == "nano-shaped" else preset(args.preset)
    ours = HybridLM(config)
    hf = to_transformers(ours)
    ours = from_transformers(hf)  # identical weights
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        assert (ours(ids[:2, :64]) - hf(ids[:2, :64], use_cache=False).logits).abs().max() < 1e-4

    peak = matmul_flops()
    with FlopCounterMode(display=False) as counter:
        ours(ids).sum().backward()
    ours.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()  # forward + backward, as torch counts them

    prompt = torch.randint(3, config.vocab_size, (1, args.prompt))
    n = args.new_tokens

    def dec_ours():
        generate(ours, prompt, max_new_tokens=n)

    def dec_hf():
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        d_ours, d_hf = timed_pair(dec_ours, dec_hf, args.steps)

    ours.train()
    hf.train()
    t_ours, t_hf = timed_pair(train_step_fn(ours, ids, False), train_step_fn(hf, ids, True), args.steps)

    tokens = args.batch * args.seq
    res = {
        "preset": args.preset,
        "parameters": ours.num_parameters(),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "train_batch": [args.batch, args.seq],
        "train_tok_s_elasticlm": tokens / t_ours,
        "train_tok_s_transformers": tokens / t_hf,
        "train_speedup": t_hf / t_ours,
        "decode_tok_s_elasticlm": n / d_ours,
        "decode_tok_s_transformers": n / d_hf,
        "decode_speedup": d_hf / d_ours,
        "matmul_gflops": peak / 1e9,
        "train_gflops_elasticlm": step_flops / t_ours / 1e9,
        "train_fraction_of_matmul": step_flops / t_ours / peak,
    }
    for k, v in res.items():
        print(f"{k:28s} {v:,.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
