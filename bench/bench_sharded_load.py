"""Host memory per rank while loading a model for FSDP2 training: whole-model load on every rank (what the
trainer did before) vs meta-device construction + per-rank safetensors slices (elasticlm.train.sharded).

    python bench/bench_sharded_load.py [--world 2] [--hidden 1024] [--layers 12]

Each variant runs in fresh gloo processes; every rank reports the rise of its peak resident memory (VmHWM)
over its resident memory before loading. Run with MALLOC_MMAP_THRESHOLD_=65536 (set here for the children)
so that resident memory follows live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from step_probe import free_port, proc_status

MiB = 2**20


def _worker(rank: int, world: int, port: int, directory: str, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from elasticlm.checkpoint import load, read_config
    from elasticlm.model.hybrid import HybridLM
    from elasticlm.train.sharded import fill_shards, shard_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = read_config(directory)[0]
    HybridLM(config, device="meta")  # import-time and first-use allocations before the baseline
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = proc_status("VmRSS")
    if mode == "whole":  # every rank loads the whole model, then shards it
        model = load(directory, dtype=torch.float32)
        shard_model(model)
    else:
        model = HybridLM(config, device="meta")
        shard_model(model)
        model.to_empty(device="cpu")
        fill_shards(model, directory)
    peak = proc_status("VmHWM") - base
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps({"peak_bytes": peak}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench" / "sharded_load.json"))
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    import elasticlm
    from elasticlm import HybridLM, ModelConfig

    pattern = ("M-*-" * args.layers)[: args.layers]
    d = args.hidden
    cfg = ModelConfig(pattern=pattern, vocab_size=32768, hidden_size=d, num_attention_heads=d // 64,
                      num_key_value_heads=4, attention_head_dim=64, intermediate_size=4 * d,
                      sections={"mamba": {"num_heads": d // 32, "head_dim": 64, "n_groups": 4, "state_size": 64}})
    with tempfile.TemporaryDirectory() as tmp:
        model = HybridLM(cfg)
        n = model.num_parameters()
        elasticlm.save(model, Path(tmp) / "model")
        del model
        block = max(sum(p.numel() for p in b.parameters()) for b in HybridLM(cfg, device="meta").layers)
        result = {"command": "python bench/bench_sharded_load.py", "parameters": n, "world": args.world,
                  "model_bytes_fp32": 4 * n, "largest_block_bytes_fp32": 4 * block}
        for mode in ("whole", "sharded"):
            torch.multiprocessing.spawn(_worker, args=(args.world, free_port(), str(Path(tmp) / "model"), mode, tmp),
                                        nprocs=args.world, join=True)
            peaks = [json.loads(Path(tmp, f"{mode}-{r}.json").read_text())["peak_bytes"] for r in range(args.world)]
            result[mode] = peaks
        print(f"model {n / 1e6:.0f} M parameters = {4 * n / MiB:,.0f} MiB fp32; largest block {4 * block / MiB:,.0f} "
              f"MiB; {args.world} ranks")
        for mode in ("whole", "sharded"):
            print(f"  {mode:8s} peak host memory per rank while loading: "
                  + ", ".join(f"{p / MiB:,.0f} MiB ({p / (4 * n):.2f} of the model)" for p in result[mode]))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
