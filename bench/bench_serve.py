"""`elasticlm serve` under concurrent load, loopback only: throughput and p50 / p95 request latency per budget
with continuous batching vs one request at a time (``--max-batch 1``), and what ``NAME@auto`` picks as the
load rises.

    python bench/bench_serve.py [--checkpoint runs/demo/elastic/final] [--clients 8] [--seconds 20]

Without ``--checkpoint`` it first runs ``elasticlm demo --quick`` into a temporary directory and serves that
elastic checkpoint. Every client is a thread with the real ``openai`` client sending greedy completions of
synthetic-task prompts (``--max-tokens`` new tokens each) for ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[str]:
    from elasticlm.data.datasets import DataConfig, documents

    docs = documents(DataConfig(source="synthetic", seed=7, mask_prompt=True), "val")(0)
    return [next(docs)[0] for _ in range(n)]


def load(url: str, model: str, clients: int, seconds: float, max_tokens: int, texts: list[str]) -> dict:
    import openai

    latencies: list[float] = []
    served: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        k = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = c.completions.create(model=model, prompt=texts[k % len(texts)], max_tokens=max_tokens,
                                     temperature=0)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                served.append(r.model.split("@")[1])
                tokens[0] += r.usage.completion_tokens
            k += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"model": model, "clients": clients, "requests": len(lat), "tokens": tokens[0], "seconds": wall,
            "tok_s": tokens[0] / wall, "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            "served": {b: served.count(b) for b in sorted(set(served))}}


def step_seconds(deployment, subnet, rows: int, repeats: int = 20) -> float:
    """Median time of one decode step of ``rows`` sequences at ``subnet`` (the deployment's slice memo kept, as
    the server's batches keep it)."""
    from elasticlm.generate import DecodeBatch, Request

    batch = DecodeBatch(deployment.model, subnet, deployment.memo)
    batch.add([Request([1, 2, 3, 4], 10_000) for _ in range(rows)])
    batch.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def grouped_vs_mixed(deployment, order: list[str]) -> list[dict]:
    """One decode step for ``rows`` sequences of every budget: grouped (a step per budget, as the server does)
    against the least a mixed batch could cost (every row at the full budget's widths, one step)."""
    out = []
    for rows in (1, 4, 16):
        grouped = sum(step_seconds(deployment, deployment.budgets[b], rows) for b in order)
        mixed = step_seconds(deployment, deployment.budgets[order[-1]], rows * len(order))
        out.append({"rows_per_budget": rows, "grouped_s": grouped, "mixed_lower_bound_s": mixed,
                    "mixed_over_grouped": mixed / grouped})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="elastic checkpoint to serve (default: a fresh `elasticlm demo --quick`)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "serve.json"))
    ap.add_argument("--steps-only", action="store_true", help="only the grouped vs mixed step timing")
    args = ap.parse_args()

    import torch

    import elasticlm
    from elasticlm.serve import Engine, running
    from elasticlm.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    path = Path(args.checkpoint) if args.checkpoint else None
    if path is None:
        subprocess.run([sys.executable, "-m", "elasticlm", "demo", "--quick", "--out", tmp, "--no-progress"],
                       check=True, capture_output=True)
        path = Path(tmp) / "elastic" / "final"
    texts = prompts(64)
    deployment = elasticlm.Deployment.load(path, serving=True)
    tok = load_tokenizer(path)
    order = deployment.order  # smallest target first
    result: dict = {"command": "python bench/bench_serve.py " + " ".join(sys.argv[1:]), "checkpoint": str(path),
                    "budgets": order, "runs": []}
    result["grouped_vs_mixed"] = grouped_vs_mixed(deployment, order)
    print("one decode step, rows of every budget: grouped by budget vs one mixed batch at full width (its least cost)")
    print("\n| rows per budget | grouped ms | mixed ms (lower bound) | mixed / grouped |\n|---|---|---|---|")
    for r in result["grouped_vs_mixed"]:
        print(f"| {r['rows_per_budget']} | {1e3 * r['grouped_s']:.2f} | {1e3 * r['mixed_lower_bound_s']:.2f} | "
              f"{r['mixed_over_grouped']:.2f} |")
    if args.steps_only:
        return
    print(f"\nserving {path} (budgets {', '.join(order)}); {args.clients} clients × {args.seconds:.0f} s, "
          f"{args.max_tokens} new tokens per request")
    print("\n| mode | model | clients | requests | tok/s | p50 s | p95 s |\n|---|---|---|---|---|---|---|")
    for mode, max_batch in (("batched", 32), ("one at a time", 1)):
        engine = Engine(deployment, tok, "m", max_batch=max_batch, max_context=4096)
        with running(engine, path) as url:
            for b in order:
                r = load(url, f"m@{b}", args.clients, args.seconds, args.max_tokens, texts)
                r["mode"] = mode
                result["runs"].append(r)
                print(f"| {mode} | {b} | {r['clients']} | {r['requests']} | {r['tok_s']:.0f} | {r['p50_s']:.3f} | "
                      f"{r['p95_s']:.3f} |", flush=True)
    # auto: the target is the full budget's measured time per token with one row, so a busier server moves down
    engine = Engine(deployment, tok, "m", max_batch=32, max_context=4096)
    engine.calibrate()
    target_ms = 1.5e3 * engine.steps.predict(order[-1], 1)
    engine = Engine(deployment, tok, "m", max_batch=32, max_context=4096, target_latency_ms=target_ms)
    result["auto"] = {"target_latency_ms": target_ms, "levels": []}
    print(f"\nauto, target {target_ms:.2f} ms per token:\n\n| clients | requests | served by budget | p50 s |\n"
          "|---|---|---|---|")
    with running(engine, path) as url:
        for clients in (1, 4, 16):
            r = load(url, "m@auto", clients, args.seconds / 2, args.max_tokens, texts)
            result["auto"]["levels"].append(r)
            print(f"| {clients} | {r['requests']} | {r['served']} | {r['p50_s']:.3f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
