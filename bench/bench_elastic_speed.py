"""Student forward+backward time per budget: sliced execution (hard router) vs soft masks.

For each budget the router is fitted to its target (budget loss only, as the elastic trainer's
warm start does) and resolves to a Subnet. We time one training forward+backward of the student
(with the router's straight-through gates) at that Subnet, and the same in soft mode (full width
with nested masks), against the full model in the same process. Sliced execution should cost
about its parameter fraction: time ratio / fraction ≤ 1.15 is the target.

    python bench/bench_elastic_speed.py                      # Nano-shaped CPU model, batch 4 × 512
    python bench/bench_elastic_speed.py --budgets 0.75,0.5 --seq-len 1024 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from bench_model import timed  # bench/ is on sys.path when run as a script

from elasticlm import ModelConfig, count_parameters
from elasticlm.elastic.router import Router
from elasticlm.elastic.space import ElasticConfig, ElasticSpace
from elasticlm.model.hybrid import HybridLM

NANO_SHAPED = dict(pattern="M-M-M*-M-M-M*-", vocab_size=4096, hidden_size=256, mamba_num_heads=32, mamba_head_dim=16,
                   mamba_n_groups=2, ssm_state_size=64, chunk_size=128, num_attention_heads=8, num_key_value_heads=2,
                   attention_head_dim=32, intermediate_size=1024)


def step_time(model: HybridLM, ids: torch.Tensor, route, repeats: int) -> float:
    def once() -> None:
        routing = route()
        logits = model(ids, None if routing is None else routing.subnet,
                       modulation=None if routing is None else routing.modulation)
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    return timed(once, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="docs/bench/elastic_speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**NANO_SHAPED, "depth_order": list(range(len(NANO_SHAPED["pattern"])))})
    model = HybridLM(cfg)
    budgets = [1.0] + [float(b) for b in args.budgets.split(",")]
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=budgets))
    hard, soft = Router(space, mode="hard"), Router(space, mode="soft")
    hard.fit_budgets(300, lr=1e-2)
    soft.load_state_dict(hard.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    base = step_time(model, ids, lambda: None, args.repeats)
    rows = []
    for b, label in enumerate(space.budgets):
        subnet = hard.resolve(b)
        fraction = count_parameters(cfg, subnet) / count_parameters(cfg)
        # temperature 0.05, scale 10: the end of training, where the router's choices are settled
        t_hard = step_time(model, ids, lambda b=b: hard.route(b, 10.0, 0.05, 0, 0), args.repeats)
        t_soft = step_time(model, ids, lambda b=b: soft.route(b, 10.0, 0.05, 0, 0), args.repeats)
        rows.append({"budget": label, "param_fraction": fraction, "hard_time_ratio": t_hard / base,
                     "hard_ratio_over_fraction": t_hard / base / fraction, "soft_time_ratio": t_soft / base})
    print(f"full model forward+backward: {base * 1e3:.0f} ms (batch {args.batch} × {args.seq_len}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
    print("| budget | parameter fraction | sliced (hard) time / full | ÷ fraction | soft-mask time / full |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['param_fraction']:.3f} | {r['hard_time_ratio']:.3f} | "
              f"{r['hard_ratio_over_fraction']:.3f} | {r['soft_time_ratio']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"full_ms": base * 1e3, "batch": args.batch, "seq_len": args.seq_len,
                                           "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
