"""One process, one kind of training step: measured peak memory and speed (used by bench_plan.py and
bench_memory.py, which run it in fresh processes, possibly against an older checkout on PYTHONPATH).

    python bench/step_probe.py '{"preset": "demo", "seq_len": 2048, "rows": 2, "budget": 0, ...}'

Prints one JSON line: ``peak_bytes`` (the rise of the process's peak resident memory, VmHWM, over its
resident memory before the models were built — reset with /proc/self/clear_refs before the measured
step), ``tok_s`` (median over the timed steps) and ``subnet`` (the routed sub-model, for the plan).
Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS and resident
memory follows live tensors (glibc otherwise keeps freed blocks of up to 32 MB in its heap).
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

import torch


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def free_port() -> int:
    """A free local TCP port for a gloo process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss() -> int:
    return proc_status("VmRSS")


def hwm() -> int:
    return proc_status("VmHWM")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def packed_batch(rows: int, seq_len: int, vocab: int, eos: int, doc_len: int, seed: int) -> torch.Tensor:
    """Random tokens with an EOS every ``doc_len`` tokens on average (several documents per row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len + 1), generator=g)
    ends = torch.rand(rows, seq_len + 1, generator=g) < 1.0 / doc_len
    return ids.masked_fill(ends, eos)


def main(spec: dict) -> dict:
    import elasticlm.train.elastic as E
    from elasticlm import HybridLM
    from elasticlm.config import ModelConfig, Subnet, preset
    from elasticlm.elastic.router import Router
    from elasticlm.elastic.space import ElasticConfig, ElasticSpace
    from elasticlm.model.documents import document_ids_from_eos

    torch.set_num_threads(spec.get("threads", 2))
    torch.manual_seed(0)
    cfg = preset(spec["preset"]) if "preset" in spec else ModelConfig.from_dict(spec["model"])
    if not cfg.depth_order:
        cfg.depth_order = list(range(cfg.num_layers))
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 2
    rows, t, budget = spec["rows"], spec["seq_len"], spec.get("budget", 0)
    batch = packed_batch(rows, t, cfg.vocab_size, eos, spec.get("doc_len", 300), 0)
    # Page in the code and runtime pools the step uses (resident too, but not tensors) with a 2-token run
    # of the same model shape at 1/8 width, so that the baseline below excludes them.
    small = dict(cfg.to_dict(), hidden_size=max(8, cfg.hidden_size // 8), vocab_size=cfg.vocab_size)
    warm = HybridLM(ModelConfig.from_dict(small))
    warm.activation_checkpointing = spec.get("checkpointing", False)
    w_ids = packed_batch(1, 64, cfg.vocab_size, eos, 20, 1)
    warm(w_ids, document_ids=document_ids_from_eos(w_ids, eos)).logsumexp(-1).mean().backward()
    del warm
    base = rss()
    teacher = HybridLM(cfg).requires_grad_(False)
    model = HybridLM(cfg)
    ckpt = spec.get("checkpointing", False)
    if ckpt:
        model.activation_checkpointing = True
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=spec.get("budgets", [1.0, 0.75, 0.5])))
    router = Router(space, 256)
    router.fit_budgets(spec.get("router_steps", 100), seed=0, scale=1.0, temperature=1.0)  # budgets near target
    student = E.ElasticStudent(model, router)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    router_opt = torch.optim.Adam(router.parameters(), lr=1e-3)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    keep = torch.ones(rows, t)
    doc = document_ids_from_eos(inputs, eos)
    new_api = hasattr(E, "teacher_hidden")
    pretrain = spec.get("pretrain", False)
    if pretrain:  # a parent pretraining step: no teacher, no router, next-token CE
        from elasticlm.train.pretrain import lm_loss

        del teacher
    times, peaks = [], []
    steps = spec.get("steps", 3)
    for step in range(steps):
        if step == steps - 1:  # the last step is the measured one: optimizer states exist by now
            reset_hwm()
        t0 = time.perf_counter()
        if pretrain:
            tgt = None
            loss = lm_loss(model, (batch, torch.ones_like(batch, dtype=torch.bool)), None, eos)
        else:
            with torch.no_grad():
                tgt = E.teacher_hidden(teacher, inputs, doc) if new_api else teacher(inputs, document_ids=doc)
            loss, _ = student(inputs, doc, keep, tgt, targets, [budget] * rows, step=0, seed=0, scale=1.0,
                              temperature=1.0, kd_temperature=1.0, ce_weight=0.0, budget_weight=1.0, amp=None)
        loss.backward()
        opt.step()
        router_opt.step()
        opt.zero_grad(set_to_none=True)
        router_opt.zero_grad(set_to_none=True)
        del tgt, loss
        times.append(time.perf_counter() - t0)
        if step == steps - 1:
            peaks.append(hwm() - base)
    subnet = Subnet.full(cfg) if pretrain else router.route(budget, 1.0, 1.0, 0, 0).subnet
    return {"peak_bytes": peaks[-1], "tok_s": rows * t / statistics.median(times[1:] or times),
            "subnet": subnet.to_dict(), "parameters": model.num_parameters(), "new_api": new_api}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
