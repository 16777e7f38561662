"""Speed of ``elasticlm importance``'s depth metrics on a SmolLM2-135M-shaped parent: the whole-model-forward
reference (one forward per remaining layer per round, every round) against the suffix sweep over cached hidden
states with the automatic round limit, in one process.

    python bench/importance_speed.py                      # measures a little, extrapolates (≈ 2-4 min, 2 cores)
    python bench/importance_speed.py --run-default        # also runs the new default depth metrics end to end

The parent is random (timing does not depend on the weights): Llama, 30 decoder layers (60 blocks), hidden 576,
9 query / 3 KV heads of 64, FFN 1536 (SwiGLU), vocabulary 49,152, tied embeddings. Calibration as the issue's run:
``--samples`` × ``--seq-len`` tokens for the width pass, ``--depth-samples`` of them for the depth metrics.

Both depth costs are linear in the number of depth sequences and in the number of layer evaluations, so each is
timed on a few sequences and on part of its work, then extrapolated; the report says which figures are measured
and which extrapolated.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from elasticlm import HybridLM, ModelConfig, Subnet
from elasticlm.elastic.importance import (
    auto_depth_rounds,
    depth_evaluations,
    depth_mse_rounds,
    estimate,
    width_importance,
)
from elasticlm.model.documents import document_ids_from_eos

EOS = 2


def smollm2_135m_config() -> ModelConfig:
    return ModelConfig(pattern="*-" * 30, vocab_size=49152, hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3, attention_head_dim=64, intermediate_size=1536, mlp_type="swiglu",
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                       norm_eps=1e-5, family="llama", eos_token_id=EOS)


def batches(n: int, b: int, t: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random packed rows with a document boundary every ~100 tokens (as packed calibration text has)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 49152, (b, t), generator=g)
        ids[torch.rand(b, t, generator=g) < 0.01] = EOS
        out.append((ids, document_ids_from_eos(ids, EOS)))
    return out


@torch.no_grad()
def seconds(fn, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depth-samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--probe-samples", type=int, default=2, help="sequences the depth timings are measured on")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--run-default", action="store_true",
                    help="run the new default depth metrics end to end on --depth-samples (not extrapolated)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = smollm2_135m_config()
    model = HybridLM(config).eval()
    n = config.num_layers
    rounds = auto_depth_rounds(config)
    t = args.seq_len
    probe = batches(1, args.probe_samples, t, seed=1)
    print(f"SmolLM2-135M shape: {model.num_parameters():,} parameters, {n} blocks; {torch.get_num_threads()} "
          f"threads; {platform.processor() or platform.machine()}")

    # width pass (unchanged by this work): one forward of every calibration sequence with activation hooks
    width_batch = batches(1, args.batch_size, t, seed=2)
    width_s = seconds(lambda: width_importance(model, width_batch, progress=False)) \
        * args.samples / args.batch_size

    # the reference: a whole-model forward costs the same whichever layers it drops, to first order
    # (dropping one of 60 blocks); old importance = one-shot (n + 1 forwards) + iterative (Σ_{m=2..n} m + 1)
    ids, doc = probe[0]
    forward_s = seconds(lambda: model(ids, Subnet.uniform(config, drop_layers=(3,)), document_ids=doc).float(),
                        repeat=2) / args.probe_samples
    old_forwards = (n + 1) + sum(m + 1 for m in range(2, n + 1))
    old_depth_s = old_forwards * forward_s * args.depth_samples

    # the sweep: one round over every decoder layer (the costliest round), per sequence and block evaluation
    unit = config.depth_unit
    start = time.perf_counter()
    depth_mse_rounds(model, probe, 1, unit=unit)
    round_s = time.perf_counter() - start
    per_eval = round_s / (depth_evaluations(n, 1, unit=unit) * args.probe_samples)
    new_evals = depth_evaluations(n, rounds, unit=unit)
    new_depth_s = new_evals * per_eval * args.depth_samples
    all_rounds_s = depth_evaluations(n, n // unit - 1, unit=unit) * per_eval * args.depth_samples
    block_rounds = auto_depth_rounds(config, unit=1)
    blocks_s = depth_evaluations(n, block_rounds) * per_eval * args.depth_samples

    figures = {
        "config": {"samples": args.samples, "seq_len": t, "depth_samples": args.depth_samples,
                   "threads": torch.get_num_threads(), "probe_samples": args.probe_samples},
        "width_pass_s": round(width_s, 1),
        "whole_model_forward_per_sequence_s": round(forward_s, 4),
        "old_depth_forwards_per_sequence": old_forwards,
        "old_depth_s": round(old_depth_s, 1),
        "new_rounds": rounds,
        "new_layer_evaluations_per_sequence": new_evals,
        "new_layer_evaluation_per_sequence_s": round(per_eval, 6),
        "new_depth_s": round(new_depth_s, 1),
        "new_all_rounds_depth_s": round(all_rounds_s, 1),
        "new_block_level_rounds": block_rounds,
        "new_block_level_depth_s": round(blocks_s, 1),
    }
    print(f"width pass ({args.samples} × {t}, timed on one batch of {args.batch_size}): {width_s:.0f} s")
    print(f"old depth metrics: {old_forwards} whole-model forwards per sequence × {forward_s:.3f} s × "
          f"{args.depth_samples} sequences = {old_depth_s / 60:.1f} min (forward timed on {args.probe_samples} "
          "sequences, extrapolated)")
    print(f"new depth metrics: {rounds} of {n // unit - 1} rounds over decoder layers = {new_evals:,} block "
          f"evaluations per sequence × {per_eval * 1e3:.2f} ms × {args.depth_samples} sequences = "
          f"{new_depth_s / 60:.1f} min (one full round timed on {args.probe_samples} sequences, extrapolated); "
          f"every round: {all_rounds_s / 60:.1f} min; blocks one by one (--depth-blocks, {block_rounds} rounds): "
          f"{blocks_s / 60:.1f} min")
    old_total, new_total = width_s + old_depth_s, width_s + new_depth_s
    print(f"importance with default flags: old {old_total / 60:.1f} min, new {new_total / 60:.1f} min "
          f"({old_total / new_total:.1f}× faster; depth alone {old_depth_s / new_depth_s:.1f}×)")
    figures.update(old_total_s=round(old_total, 1), new_total_s=round(new_total, 1),
                   speedup=round(old_total / new_total, 2))

    if args.run_default:
        depth = batches(-(-args.depth_samples // args.batch_size), args.batch_size, t, seed=3)
        start = time.perf_counter()
        estimate(model, iter(depth), depth_batches=len(depth), depth_rounds=rounds, depth_unit=unit, progress=True)
        measured = time.perf_counter() - start
        print(f"measured: width pass on the {args.depth_samples} depth sequences + {rounds} depth rounds: "
              f"{measured / 60:.1f} min")
        figures["measured_depth_run_s"] = round(measured, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
