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
from elasticlm.model import mamba2
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    # Fake tensors on the "cpu" device: this machine has no CUDA, and a device mesh must be built outside
    # FakeTensorMode. The tracked sizes do not depend on the device.
    mesh = init_device_mesh("cpu", (args.world,))
    dev = torch.device("cpu")
    mamba2.scan_chunk_size = lambda config_chunk, device: config_chunk  # the scan tile a GPU runs (not CPU's 32)
    cfg = preset(args.preset)
    ckpt = not args.no_checkpointing
    t0 = time.perf_counter()
    with FakeTensorMode():
        student = HybridLM(cfg, device="meta")
        teacher = HybridLM(cfg, device="meta", dtype=torch.bfloat16)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for model, policy in ((student, mp), (teacher, MixedPrecisionPolicy())):
            for block in model.layers:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            model.to_empty(device=dev)
            model.mark_sharded()
        student.activation_checkpointing = ckpt
        teacher.requires_grad_(False)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq_len), device=dev)
        keep = torch.ones(args.rows, args.seq_len, device=dev)
        tracker = FSDPMemTracker(student, opt)
        tracker.track_external(teacher)
        tracker.track_inputs((ids,))
        with tracker:
            for i in range(2):  # the second step has the optimizer states
                with torch.no_grad():
                    target = teacher_hidden(teacher, ids, None)

                def head(h: torch.Tensor, w: torch.Tensor, target=target) -> torch.Tensor:
                    return kd_loss_from_hidden(h, w, *target, keep, 1.0, select=False)

                loss = student(ids, head=head)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del target, loss
                if i == 0:
                    tracker.reset_mod_stats()
        snapshot = tracker.get_tracker_snapshot("peak")[dev]
        # the tracker sees the student; the sharded bf16 teacher's parameters are added here
        teacher_bytes = 2 * count_parameters(cfg) / args.world
        snapshot = {**{str(k): v for k, v in snapshot.items()}, "teacher (sharded, added)": teacher_bytes}
        peak = snapshot.pop("Total") + teacher_bytes
    cluster = Cluster(args.world, 1, None, None, device="cuda")
    plan = plan_stage(cfg, name="sim", seq_len=args.seq_len, batch_size=args.rows * args.world, grad_accum=1,
                      cluster=cluster, sharded=True, amp=True, checkpointing=ckpt, teacher=True, documents=False)
    flags = [f"--preset {args.preset}", f"--seq-len {args.seq_len}", f"--rows {args.rows}", f"--world {args.world}"]
    result = {"command": "python bench/simulate_plan.py " + " ".join(flags + (["--no-checkpointing"] if not ckpt
                                                                              else [])),
              "parameters": count_parameters(cfg), "seq_len": args.seq_len, "rows": args.rows, "world": args.world,
              "checkpointing": ckpt, "simulated_peak_bytes": peak,
              "simulated_breakdown_bytes": snapshot, "plan_peak_bytes": plan.peak,
              "ratio": peak / plan.peak, "plan_items": plan.items, "seconds": time.perf_counter() - t0}
    for k, v in snapshot.items():
        print(f"  {k}: {v / GiB:.2f} GiB")
    print(f"simulated peak {peak / GiB:.2f} GiB, plan {plan.peak / GiB:.2f} GiB, ratio {peak / plan.peak:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
