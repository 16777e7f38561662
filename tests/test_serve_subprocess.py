"""`elasticlm serve` as a separate process, through the real `openai` client (issue 32's acceptance).

Two servers run the real CLI (tests/serve_with_faults.py: `elasticlm.cli.main` after wrapping the decoding batch
so that a marker in a prompt injects a fault in the engine thread): one keyed by ELASTICLM_API_KEY with 8 rows per
budget, one keyed by --api-key with one row per budget, one waiting request and a 1.5 s deadline. Each hostile
request gets a 4xx/5xx within a bound and the next request is answered exactly (greedy `generate` in this
process); a fault while admitting or decoding fails only the requests it touched; a killed engine thread is
restarted, and once restarts are used up /health turns 503 and the process exits 1; wrong or missing keys get
401, a full queue 429, a late request 504; seeded sampling is the same alone and in a batch. Each server ends
with SIGTERM and must exit 0 (SIGTERM while a stream runs: test_serve.py's `elasticlm serve` test)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from test_serve_faults import BODY, CONTEXT, HOSTILE, KEY, exact_next_request, greedy_reference, post  # noqa: E402

import elasticlm  # noqa: E402
from elasticlm.tokenizer import load_tokenizer  # noqa: E402

HELPER = Path(__file__).with_name("serve_with_faults.py")
BOUND = 5.0  # seconds: every refusal and every injected fault is answered within this
SMALL_KEY = "small-key-9876543210"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `serve_with_faults.py serve` subprocess; its stderr goes to a file (shown when a check fails)."""

    def __init__(self, ckpt: Path, log: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "serve", "--checkpoint", str(ckpt), "--port", str(self.port),
             "--max-context", str(CONTEXT), "--max-body-bytes", str(BODY), *args],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=os.environ | (env or {}))

    def stderr(self) -> str:
        return self.log.read_text()[-4000:]

    def health(self) -> tuple[int | None, dict]:
        """/health's status and body; (None, {}) when nothing listens."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return None, {}

    def wait_healthy(self, seconds: float = 90.0) -> None:
        deadline = time.monotonic() + seconds
        while self.health()[0] != 200:
            assert self.proc.poll() is None, f"the server exited {self.proc.returncode}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"the server did not become healthy:\n{self.stderr()}"
            time.sleep(0.1)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as r:
            return r.read().decode()

    def stop(self) -> int | None:
        """SIGTERM; the exit status (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_deploy import elastic_checkpoint

    return elastic_checkpoint(tmp_path_factory.mktemp("subprocess") / "tiny", name="final")  # served as "tiny"


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    """Both servers, started together (their start-ups overlap)."""
    logs = tmp_path_factory.mktemp("logs")
    main = Server(ckpt, logs / "main.log", ["--max-batch", "8", "--request-timeout", "30"],
                  env={"ELASTICLM_API_KEY": KEY})
    small = Server(ckpt, logs / "small.log", ["--max-batch", "1", "--max-queue", "1", "--request-timeout", "1.5",
                                              "--shutdown-timeout", "2", "--api-key", SMALL_KEY])
    try:
        main.wait_healthy()
        small.wait_healthy()
        yield main, small
    finally:
        codes = {s.log.stem: s.stop() for s in (main, small)}
    assert codes["main"] == 0, f"SIGTERM: exit {codes['main']}\n{main.stderr()}"
    assert codes["small"] in (0, 1), small.stderr()  # 1: its engine was killed for good (the last test)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small(servers):
    return servers[1]


@pytest.fixture(scope="module")
def reference(ckpt):
    return greedy_reference(ckpt)


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


@contextlib.contextmanager
def within(seconds: float = BOUND):
    t0 = time.monotonic()
    yield
    assert time.monotonic() - t0 < seconds, f"took {time.monotonic() - t0:.1f} s"


def background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_is_answered_within_a_bound_and_the_next_is_exact(server, reference, name):
    body, status, needle = HOSTILE[name]
    with within():
        got, answer, _ = post(server.url, body)
    assert got == status and needle in answer["error"]["message"], answer
    exact_next_request(server.url, reference)


def test_clients_that_leave_early_or_send_garbage(server, reference):
    """A stream abandoned after its first bytes (its row is freed), a body shorter than its Content-Length,
    bytes that are not HTTP."""
    def cancelled() -> int:
        key = 'elasticlm_cancelled_total{budget="1.0"}'
        return int(next(ln for ln in server.metrics().splitlines() if ln.startswith(key)).split()[-1])

    before = cancelled()
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as s:
        body = json.dumps({"model": "tiny@1.0", "prompt": "<<slow>> Q: 1+2", "max_tokens": 400,
                           "temperature": 0, "stream": True}).encode()  # 400 steps of 20 ms (no EOS on the way)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(12).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as s, within():
        s.sendall(b"\x00\xff GARBAGE \r\n\r\n")
        reply = s.recv(64)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply  # refused, or hung up on
    deadline = time.monotonic() + BOUND
    while cancelled() == before or sum(server.health()[1]["active"].values()):  # the abandoned row is freed
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)
    assert cancelled() == before + 1
    exact_next_request(server.url, reference)
    assert server.health()[0] == 200


def test_missing_or_wrong_key_is_401(server, small):
    for s, key in ((server, KEY), (small, SMALL_KEY)):
        with within(), pytest.raises(openai.AuthenticationError, match="API key") as exc:
            client(s.url, key="wrong").completions.create(model="tiny@1.0", prompt="hi", max_tokens=2)
        assert exc.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(s.url, key=key + "x").models.list()
        status, answer, headers = post(s.url, b'{"model": "tiny@1.0", "prompt": "hi"}', key=None)
        assert status == 401 and answer["error"]["type"] == "authentication_error" and headers["www-authenticate"]
        assert [m.id for m in client(s.url, key=key).models.list().data][-1] == "tiny@auto"


@pytest.mark.parametrize("params", [
    {"temperature": 1e-300},  # the crash: below the floor, i.e. greedy
    {"temperature": 2.0, "top_p": 1e-9},  # a nucleus of one token: greedy too
    {"temperature": 5e-6, "top_p": 0.5, "seed": -2**70},
])
def test_extreme_but_valid_parameters_are_served(server, reference, params):
    with within():
        r = client(server.url).completions.create(model="tiny@0.7", prompt="Q: 4+4", max_tokens=8, **params)
    assert r.choices[0].text == reference("Q: 4+4", "0.7", 8)
    exact_next_request(server.url, reference)


def test_a_step_fault_fails_its_batch_only(server, reference):
    """A fault while decoding budget 0.7 fails that request (500, non-streaming and streaming); a request decoding
    at budget 1.0 meanwhile finishes exactly, and the server goes on."""
    c = client(server.url)
    other = "<<slow>> Q: 9+9"
    stream = iter(c.completions.create(model="tiny@1.0", prompt=other, max_tokens=60, temperature=0, stream=True))
    first = next(stream).choices[0].text
    t, out = background(lambda: first + "".join(ch.choices[0].text for ch in stream))
    with within(), pytest.raises(openai.InternalServerError, match="injected step fault") as exc:
        c.completions.create(model="tiny@0.7", prompt="Q: 1+2 <<step-fault>>", max_tokens=8, temperature=0)
    assert exc.value.status_code == 500
    with within(), pytest.raises(openai.APIError, match="injected step fault"):  # an error event in the stream
        for _ in c.completions.create(model="tiny@0.7", prompt="<<step-fault>>", max_tokens=8, stream=True):
            pass
    t.join(timeout=30)
    assert out.get("value") == reference(other, "1.0", 60), out
    assert server.health()[0] == 200
    exact_next_request(server.url, reference, budget="0.7")
    assert 'elasticlm_errors_total{status="500"}' in server.metrics()


def test_an_admission_fault_leaves_running_requests_alone(server, reference):
    c = client(server.url)
    other = "<<slow>> Q: 7+7"
    stream = iter(c.completions.create(model="tiny@1.0", prompt=other, max_tokens=60, temperature=0, stream=True))
    first = next(stream).choices[0].text  # decoding: the new request joins its batch
    t, out = background(lambda: first + "".join(ch.choices[0].text for ch in stream))
    with within(), pytest.raises(openai.InternalServerError, match="injected admit fault"):
        c.completions.create(model="tiny@1.0", prompt="x <<admit-fault>>", max_tokens=4, temperature=0)
    t.join(timeout=30)
    assert out.get("value") == reference(other, "1.0", 60), out  # re-prefilled in a fresh batch, still right
    exact_next_request(server.url, reference)


def test_a_killed_engine_thread_is_restarted(server, reference):
    before = server.metrics()
    assert "elasticlm_engine_restarts_total 0" in before
    with within(), pytest.raises(openai.InternalServerError, match="restarted") as exc:
        client(server.url).completions.create(model="tiny@0.45", prompt="hi <<kill-engine>>", max_tokens=4)
    assert exc.value.status_code == 500
    deadline = time.monotonic() + BOUND
    while server.health()[0] != 200:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)
    assert "elasticlm_engine_restarts_total 1" in server.metrics()
    exact_next_request(server.url, reference, budget="0.45")
    exact_next_request(server.url, reference, budget="1.0")


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(server, reference):
    c = client(server.url)
    args = {"model": "tiny@1.0", "prompt": "Q: sort 3 1 2", "max_tokens": 16, "temperature": 0.9, "top_p": 0.8}
    alone = c.completions.create(seed=1234, **args).choices[0].text
    others = {c.completions.create(seed=s, **args).choices[0].text for s in range(5)}
    assert others - {alone}, "the seed makes no difference: this test could not tell batches apart"

    started = threading.Event()

    def neighbour(prompt, budget, n, started=None, **kw):  # decoding before, during and after the seeded ones
        stream = c.completions.create(model=f"tiny@{budget}", prompt=prompt, max_tokens=n, stream=True, **kw)
        times, text = [], []
        for ch in stream:
            times.append(time.monotonic())
            text.append(ch.choices[0].text)
            if started is not None:
                started.set()
        return times[0], times[-1], "".join(text)

    greedy = "<<slow>> x"
    threads = [background(lambda a=a, k=k: neighbour(*a, **k)) for a, k in [
        ((greedy, "1.0", 200), {"temperature": 0, "started": started}),  # 4 s at least: outlasts the seeded requests
        (("<<slow>> a longer prompt beside it", "1.0", 120), {"temperature": 1.0, "seed": 7}),
        (("<<slow>> Q: 5+5", "0.45", 120), {"temperature": 0.7})]]
    deadline = time.monotonic() + 10
    while server.health()[1]["active"]["1.0"] < 2 or not started.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    batched = [c.completions.create(seed=1234, **args).choices[0].text for _ in range(3)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(seed=1234, stream=True, **args))
    t1 = time.monotonic()
    for t, _ in threads:
        t.join(timeout=30)
    first, last, text = threads[0][1]["value"]
    assert first < t0 and last > t1, "the greedy neighbour did not decode beside the seeded requests"
    assert text == reference(greedy, "1.0", 200)  # and sampled rows beside it did not change it
    assert batched == [alone] * 3 and streamed == alone


def test_full_queue_is_429_and_a_late_request_504(small, reference):
    c = client(small.url, key=SMALL_KEY)
    stream = iter(c.completions.create(model="tiny@1.0", prompt="<<slow>> Q: 1+2", max_tokens=400, temperature=0,
                                       stream=True))  # 400 steps of 20 ms: past the 1.5 s deadline
    next(stream)  # decoding: the only row of budget 1.0
    t, queued = background(lambda: c.completions.create(model="tiny@1.0", prompt="<<slow>> x", max_tokens=400,
                                                        temperature=0))  # waits, then cannot finish in time
    deadline = time.monotonic() + 10
    while small.health()[1]["queued"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with within(), pytest.raises(openai.RateLimitError, match="--max-queue") as exc:
        c.completions.create(model="tiny@1.0", prompt="x", max_tokens=4, temperature=0)
    assert exc.value.status_code == 429 and exc.value.response.headers["retry-after"] == "1"
    with within(), pytest.raises(openai.APIError, match="--request-timeout"):  # the error event of the stream
        for _ in stream:
            pass
    t.join(timeout=10)
    assert isinstance(queued.get("error"), openai.APIStatusError) and queued["error"].status_code == 504, queued
    deadline = time.monotonic() + 10
    while (h := small.health()[1]) and (sum(h["active"].values()) or h["queued"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client(small.url, key=SMALL_KEY).completions.create(model="tiny@0.7", prompt="Q: 1+2", max_tokens=6,
                                                            temperature=0)
    assert r.choices[0].text == reference("Q: 1+2", "0.7", 6)


def test_an_engine_killed_for_good_turns_health_503_and_exits_1(small):
    """The watchdog restarts a dead engine thread 3 times a minute; the 4th death within the minute ends the
    process (exit 1, for a supervisor to restart it), and /health says 503 until it stops listening."""
    c = client(small.url, key=SMALL_KEY)
    for i in range(4):
        if i:
            deadline = time.monotonic() + BOUND
            while small.health()[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with within(), pytest.raises(openai.InternalServerError) as exc:
            c.completions.create(model="tiny@0.7", prompt=f"{i} <<kill-engine>>", max_tokens=4)
        assert exc.value.status_code == 500
    seen = []  # /health until the port closes: 503 with the reason, never 200 again
    deadline = time.monotonic() + BOUND
    while (h := small.health())[0] is not None and time.monotonic() < deadline:
        seen.append(h)
        time.sleep(0.02)
    assert all(status == 503 for status, _ in seen), seen
    assert any("died 4 times" in body.get("reason", "") for _, body in seen) or not seen, seen
    with pytest.raises((openai.APIConnectionError, openai.InternalServerError)) as exc:  # 503, or nobody listens
        c.completions.create(model="tiny@1.0", prompt="hi", max_tokens=2)
    assert isinstance(exc.value, openai.APIConnectionError) or exc.value.status_code == 503
    assert small.proc.wait(timeout=BOUND + 2) == 1, small.stderr()


def test_a_batch_that_never_empties_keeps_a_bounded_cache_and_exact_rows(ckpt):
    """In process (what the servers above run for minutes under load): a request joins every 5 steps and lives 6-18,
    so the batch never drains; its cache timeline stays within twice its oldest row
    (`HybridCache.drop_shared_padding`, run by DecodeBatch when a row leaves) and every row
    equals greedy `generate` alone. Without compaction the timeline would be the batch's age (200 steps here)."""
    from elasticlm.generate import DecodeBatch, Request

    deployed, tok = elasticlm.Deployment.load(ckpt, serving=True), load_tokenizer(ckpt)
    prompts = [tok.encode(p).ids for p in ("Q: 1+2", "a longer prompt with several words", "x", "Q: sort 3 1 2")]
    batch = DecodeBatch(deployed.model, deployed.budgets["1.0"])
    requests, longest = [], 0
    for step in range(200):
        if step % 5 == 0:
            requests.append(Request(prompts[step // 5 % 4], max_new_tokens=6 + step % 13))
            batch.add(requests[-1:])
        batch.step()
        longest = max(longest, batch.cache.seq_len)
    cut = batch.cache.dropped
    assert len(batch) > 0 and cut > 150 and longest < 2 * (34 + 18) + 16
    finished = [r for r in requests if r.finished]
    assert len(finished) >= 35
    for req in finished:
        alone = deployed.generate(torch.tensor([req.prompt]), budget="1.0", max_new_tokens=req.max_new_tokens)
        assert req.tokens == alone[0, len(req.prompt):].tolist()
