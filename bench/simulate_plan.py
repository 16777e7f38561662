"""An independent check of `elasticlm plan` at paper scale: one FSDP2 elastic training step of the Nano V2
12B parent at 49K tokens, simulated on this CPU with fake tensors and a fake process group, its memory
tracked by PyTorch's own FSDPMemTracker (what torchtitan's memory estimation uses).

    python bench/simulate_plan.py [--seq-len 49152] [--world 8] [--preset nemotron-nano-12b-v2] [--no-checkpointing]

No tensor holds data (FakeTensorMode), so a 12B model fits on a laptop; collectives go to the "fake"
backend. The step is the elastic trainer's (sharded student in fp32 master weights with a bf16
MixedPrecisionPolicy, sharded bf16 teacher, the teacher's hidden states, the KD loss over token chunks,
AdamW), with the full budget's Subnet and no router gates (the router is a few MB and needs real
numbers to route). Data-dependent steps are replaced by what they compute on a batch without
masked tokens and one document per row: the KD loss does not skip masked tokens, attention is plain
causal. Prints the tracker's peak next to the plan's figure for the same setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from elasticlm import HybridLM
from elasticlm.config import count_parameters, preset
from elasticlm.train.losses import kd_loss_from_hidden, teacher_hidden
from elasticlm.train.plan import Cluster, GiB, plan_stage

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nemotron-nano-12b-v2")
    ap.add_argument("--seq-len", type=int, default=49152)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "simulate_plan.json"))
    args = ap.parse_args()

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    cfg = preset(args.preset)
    ckpt = not args.no_checkpointing
    t0 = time.perf_counter()
    with FakeTensorMode():
        torch.set_default_device("cuda")
        student = HybridLM(cfg, device="meta")
        teacher = HybridLM(cfg, device="meta", dtype=torch.bfloat16)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for model, policy in ((student, mp), (teacher, MixedPrecisionPolicy())):
            for block in model.layers:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            model.to_empty(device="cuda")
            model.mark_sharded()
        student.activation_checkpointing = ckpt
        teacher.requires_grad_(False)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq_len), device="cuda")
        keep = torch.ones(args.rows, args.seq_len, device="cuda")
        tracker = FSDPMemTracker(student, opt)
        tracker.track_external(teacher)
        tracker.track_inputs((ids,))
        with tracker:
            for _ in range(2):  # the second step has the optimizer states
                with torch.no_grad():
                    target = teacher_hidden(teacher, ids, None)

                def head(h: torch.Tensor, w: torch.Tensor, target=target) -> torch.Tensor:
                    return kd_loss_from_hidden(h, w, *target, keep, 1.0, select=False)

                loss = student(ids, head=head)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del target, loss
        peak = sum(tracker.get_tracker_snapshot("peak")[torch.device("cuda", 0)]["Total"] for _ in [0])
    cluster = Cluster(args.world, 1, None, None, device="cuda")
    plan = plan_stage(cfg, name="sim", seq_len=args.seq_len, batch_size=args.rows * args.world, grad_accum=1,
                      cluster=cluster, sharded=True, amp=True, checkpointing=ckpt, teacher=True)
    result = {"command": "python bench/simulate_plan.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out",)),
              "parameters": count_parameters(cfg), "seq_len": args.seq_len, "rows": args.rows, "world": args.world,
              "checkpointing": ckpt, "simulated_peak_bytes": peak, "plan_peak_bytes": plan.peak,
              "ratio": peak / plan.peak, "plan_items": plan.items, "seconds": time.perf_counter() - t0}
    print(f"simulated peak {peak / GiB:.2f} GiB, plan {plan.peak / GiB:.2f} GiB, ratio {peak / plan.peak:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
