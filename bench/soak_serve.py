"""Soak and fault bench for `elasticlm serve`, loopback only and bounded in time: many clients, mixed budgets,
streaming and not, with a share of hostile requests; then SIGTERM and the exit status.

    python bench/soak_serve.py [--checkpoint runs/demo/elastic/final] [--clients 32] [--seconds 60]

The server is a real `elasticlm serve` subprocess (with an API key). Without ``--checkpoint`` it serves the tests'
tiny random elastic checkpoint (budgets 1.0 / 0.7 / 0.45): what is measured here is robustness, not quality.
Every client thread loops until the time is up, drawing one kind of request at a time:

- ``greedy`` / ``greedy-stream``: a prompt of a fixed set at a random budget (or ``auto``), 1-32 new tokens;
  the answer must equal greedy ``generate`` in this process (at the budget the response names);
- ``seeded``: temperature 0.8, top_p 0.9, one of 4 seeds: every answer must equal the first one for that seed
  (reproducible under any load);
- ``tiny-temperature``: temperature 1e-300 (the crash of issue 32): must equal greedy;
- hostile: ``nan`` (raw JSON NaN), ``bad-type``, ``huge-prompt`` (longer than the context), ``huge-body`` (past
  ``--max-body-bytes``), ``wrong-key``, ``disconnect`` (a stream abandoned after its first bytes).

Reported: requests per kind and outcome (HTTP status, or ``mismatch`` / ``connection`` errors), p50 / p99 latency
of the well-formed ones, the server's RSS over the run (every ``--rss-every`` seconds; after warm-up and at the
end), /health at the end, SIGTERM → exit status.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
PROMPTS = ["Q: 1+2", "Q: sort 3 1 2", "a longer prompt with several words in it", "x", "Q: 12+7\nA:",
           "recall: k=4 v=9; k?", "hello world", "The quick brown fox"]
KINDS = {"greedy": 30, "greedy-stream": 20, "seeded": 15, "tiny-temperature": 5, "nan": 5, "bad-type": 5,
         "huge-prompt": 5, "huge-body": 3, "wrong-key": 7, "disconnect": 5}
WELL_FORMED = ("greedy", "greedy-stream", "seeded", "tiny-temperature")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def raw(port: int, body: bytes, key: str | None = KEY, read: int | None = None) -> int:
    """POST /v1/completions with a raw body; the status (reads ``read`` bytes and hangs up when given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if read is not None:
            resp.read(read)
            conn.sock.close()  # gone, mid-stream
        else:
            resp.read()
        return resp.status
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="elastic checkpoint (default: the tests' tiny random one)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
    ap.add_argument("--rss-every", type=float, default=15.0, help="seconds between samples of the server's RSS")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()

    import openai
    import torch

    import elasticlm
    from elasticlm.tokenizer import load_tokenizer

    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_deploy import elastic_checkpoint

        path = elastic_checkpoint(Path(tempfile.mkdtemp(prefix="soak-")), name="final")
    name = path.resolve().parent.name if path.name == "final" else path.resolve().name
    deployment, tok = elasticlm.Deployment.load(path, serving=True), load_tokenizer(path)
    eos = deployment.config.eos_token_id
    budgets = deployment.order  # smallest target first
    greedy: dict[tuple[str, str], list[int]] = {}  # (prompt, budget) -> 32 greedy tokens
    for p in PROMPTS:
        ids = tok.encode(p).ids
        for b in budgets:
            out = deployment.generate(torch.tensor([ids]), budget=b, max_new_tokens=32)
            greedy[p, b] = out[0, len(ids):].tolist()
    del deployment

    def expected(prompt: str, budget: str, n: int) -> str:
        out = greedy[prompt, budget][:n]
        return tok.decode(out[: out.index(eos)] if eos in out else out)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "elasticlm", "serve", "--checkpoint", str(path), "--port",
                             str(port), "--max-body-bytes", str(args.max_body_bytes), "--max-context", "4096",
                             "--shutdown-timeout", "10"], env=os.environ | {"ELASTICLM_API_KEY": KEY},
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None and time.time() < deadline, "the server did not start"
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                break
        except OSError:
            time.sleep(0.2)

    outcomes: Counter[tuple[str, str]] = Counter()
    latencies: list[float] = []
    seeded: dict[tuple[str, int], str] = {}
    lock = threading.Lock()
    huge_prompt = json.dumps({"model": f"{name}@1.0", "prompt": "ab" * 20_000}).encode()
    huge_body = b'{"model": "x", "prompt": "' + b"a" * (args.max_body_bytes + 1) + b'"}'

    def one(kind: str, rng: random.Random, c: openai.OpenAI) -> str:
        prompt, budget = rng.choice(PROMPTS), rng.choice([*budgets, "auto"])
        n = rng.randint(1, 32)
        if kind in ("greedy", "greedy-stream", "tiny-temperature"):
            temperature = 1e-300 if kind == "tiny-temperature" else 0
            if kind == "greedy-stream":
                text, served = "", None
                for ch in c.completions.create(model=f"{name}@{budget}", prompt=prompt, max_tokens=n,
                                               temperature=temperature, stream=True):
                    text += ch.choices[0].text
                    served = ch.model
            else:
                r = c.completions.create(model=f"{name}@{budget}", prompt=prompt, max_tokens=n,
                                         temperature=temperature)
                text, served = r.choices[0].text, r.model
            return "200" if text == expected(prompt, served.split("@")[1], n) else "mismatch"
        if kind == "seeded":
            seed = rng.randrange(4)
            r = c.completions.create(model=f"{name}@0.7", prompt=PROMPTS[seed], max_tokens=24, temperature=0.8,
                                     top_p=0.9, seed=seed)
            with lock:
                first = seeded.setdefault((PROMPTS[seed], seed), r.choices[0].text)
            return "200" if r.choices[0].text == first else "mismatch"
        if kind == "nan":
            return str(raw(port, f'{{"model": "{name}@1.0", "prompt": "hi", "temperature": NaN}}'.encode()))
        if kind == "bad-type":
            return str(raw(port, f'{{"model": "{name}@0.45", "prompt": "hi", "max_tokens": "many"}}'.encode()))
        if kind == "huge-prompt":
            return str(raw(port, huge_prompt))
        if kind == "huge-body":
            return str(raw(port, huge_body))
        if kind == "wrong-key":
            return str(raw(port, b'{"model": "x", "prompt": "hi"}', key=rng.choice([None, "soak-kez", KEY * 2])))
        if kind == "disconnect":
            body = json.dumps({"model": f"{name}@{budget}", "prompt": prompt, "max_tokens": 2000, "stream": True})
            return f"{raw(port, body.encode(), read=20)}+hangup"
        raise ValueError(kind)

    stop = time.monotonic() + args.seconds
    warm = threading.Event()

    def client(i: int) -> None:
        rng = random.Random(i)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        while time.monotonic() < stop:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            t0 = time.perf_counter()
            try:
                outcome = one(kind, rng, c)
            except openai.APIStatusError as exc:
                outcome = str(exc.status_code)
            except (openai.APIConnectionError, OSError, http.client.HTTPException) as exc:
                outcome = f"connection ({type(exc).__name__})"
            dt = time.perf_counter() - t0
            with lock:
                outcomes[kind, outcome] += 1
                if kind in WELL_FORMED and outcome == "200":
                    latencies.append(dt)
            warm.set()

    rss_over_time: list[tuple[float, float]] = []  # (seconds since the clients started, MiB)

    def sample_rss() -> None:
        while True:
            rss_over_time.append((round(time.monotonic() - t_start, 1), round(rss_kib(proc.pid) / 1024, 1)))
            if time.monotonic() + args.rss_every > stop:
                return
            time.sleep(args.rss_every)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    warm.wait(60)
    time.sleep(min(5.0, args.seconds / 4))
    rss_start = rss_kib(proc.pid)
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    rss_end = rss_kib(proc.pid)
    sampler.join(timeout=args.rss_every + 1)
    rss_over_time.append((round(wall, 1), round(rss_end / 1024, 1)))
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        health = json.loads(r.read())
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        restarts = [ln for ln in r.read().decode().splitlines() if ln.startswith("elasticlm_engine_restarts_total")]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    exit_s = time.monotonic() - t0

    lat = sorted(latencies)
    kinds = sorted({k for k, _ in outcomes})
    result = {
        "command": "python bench/soak_serve.py " + " ".join(sys.argv[1:]), "checkpoint": str(path),
        "clients": args.clients, "seconds": round(wall, 1), "requests": sum(outcomes.values()),
        "outcomes": {k: {o: n for (kk, o), n in sorted(outcomes.items()) if kk == k} for k in kinds},
        "well_formed_ok": len(lat), "mismatches": sum(n for (_, o), n in outcomes.items() if o == "mismatch"),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "rss_mib_after_warmup": round(rss_start / 1024, 1), "rss_mib_end": round(rss_end / 1024, 1),
        "rss_mib_over_time": rss_over_time,
        "health_at_end": health["status"], "restarts": restarts, "sigterm_exit": rc,
        "sigterm_seconds": round(exit_s, 1)}
    print(json.dumps(result, indent=2))
    print(f"\n{result['requests']} requests from {args.clients} clients in {wall:.0f} s; well-formed answered "
          f"{len(lat)}, wrong answers {result['mismatches']}; p50 {result['p50_s']} s, p99 {result['p99_s']} s; "
          f"RSS {result['rss_mib_after_warmup']} → {result['rss_mib_end']} MiB; /health {health['status']}; "
          f"SIGTERM → exit {rc} in {exit_s:.1f} s")
    print("RSS over the run (s: MiB): " + ", ".join(f"{t:g}: {m:g}" for t, m in rss_over_time))
    print("\n| kind | outcomes |\n|---|---|")
    for k in kinds:
        print(f"| {k} | " + ", ".join(f"{o}: {n}" for o, n in result["outcomes"][k].items()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
