"""`elasticlm serve` on a network: no request stops it, only keyed clients get in, it says when it is sick.

Hostile requests (non-finite numbers, bad types, huge prompts and bodies, extreme but valid parameters) each get
an answer within a bound and the next request is answered exactly; a fault injected in a decoding step fails the
requests of that step and nothing else; a dead engine thread is restarted, or /health and new requests turn 503;
wrong or missing keys get 401, a full queue 429, a late request 504; seeded sampling
is the same alone and in a batch; the incremental detokenizer equals the full decode. (SIGTERM mid-stream, exit
0: test_serve.py's `elasticlm serve` subprocess test.)"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import elasticlm  # noqa: E402
from elasticlm.generate import sample_next  # noqa: E402
from elasticlm.serve import Detokenizer, Engine, TextStream, running  # noqa: E402
from elasticlm.tokenizer import byte_level_tokenizer, load_tokenizer  # noqa: E402

KEY = "test-key-0123456789"
CONTEXT = 512
BODY = 1 << 20


def _engine(path, **kw) -> Engine:
    # a model of its own: engines of different tests never share a model between threads
    return Engine(elasticlm.Deployment.load(path, serving=True), load_tokenizer(path), "tiny", max_context=CONTEXT,
                  **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_deploy import elastic_checkpoint

    return elastic_checkpoint(tmp_path_factory.mktemp("faults"), name="final")


@pytest.fixture(scope="module")
def server(ckpt):
    engine = _engine(ckpt, max_batch=8)
    with running(engine, ckpt, api_key=KEY, max_body_bytes=BODY, request_timeout=30) as url:
        yield url, engine


@pytest.fixture(scope="module")
def reference(ckpt):
    return greedy_reference(ckpt)


def greedy_reference(ckpt):
    """What greedy `elasticlm generate` returns, as text (EOS and after cut off): computed in the test process,
    not by a server."""
    deployed, tok = elasticlm.Deployment.load(ckpt, serving=True), load_tokenizer(ckpt)

    def text(prompt: str, budget: str, n: int) -> str:
        ids = tok.encode(prompt).ids
        out = deployed.generate(torch.tensor([ids]), budget=budget, max_new_tokens=n)[0, len(ids):].tolist()
        eos = deployed.config.eos_token_id
        return tok.decode(out[: out.index(eos)] if eos in out else out)

    return text


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def post(url, body: bytes, path="/v1/completions", key=KEY, timeout=30):
    conn = http.client.HTTPConnection(urlparse(url).netloc, timeout=timeout)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data.startswith(b"{") else data), dict(resp.getheaders())


def get(url, path):
    conn = http.client.HTTPConnection(urlparse(url).netloc, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def exact_next_request(url, reference, budget="1.0", prompt="Q: 1+2"):
    r = client(url).completions.create(model=f"tiny@{budget}", prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == reference(prompt, budget, 6)


def wait_until(check, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


OK = b'"model": "tiny@1.0", "prompt": "hi", "max_tokens": 4'
HOSTILE = {
    "NaN": (b'{' + OK + b', "temperature": NaN}', 400, "not a valid JSON value"),
    "Infinity": (b'{' + OK + b', "top_p": Infinity}', 400, "not a valid JSON value"),
    "-Infinity": (b'{' + OK + b', "temperature": -Infinity}', 400, "not a valid JSON value"),
    "1e999": (b'{' + OK + b', "temperature": 1e999}', 400, "out of range"),
    "huge int": (b'{"model": "tiny@1.0", "prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}", 400, "max_tokens"),
    "string max_tokens": (b'{"model": "tiny@1.0", "prompt": "hi", "max_tokens": "5"}', 400, "max_tokens"),
    "string temperature": (b'{' + OK + b', "temperature": "hot"}', 400, "temperature"),
    "list top_p": (b'{' + OK + b', "top_p": [1]}', 400, "top_p"),
    "bool stream": (b'{' + OK + b', "stream": "yes"}', 400, "stream"),
    "stop type": (b'{' + OK + b', "stop": 5}', 400, "stop"),
    "long stop": (b'{' + OK + b', "stop": "' + b"x" * 1000 + b'"}', 400, "stop"),
    "float seed": (b'{' + OK + b', "seed": 1.5}', 400, "seed"),
    "n": (b'{' + OK + b', "n": [2]}', 400, "n = 1"),
    "model type": (b'{"model": 5, "prompt": "hi"}', 400, "model"),
    "long model": (b'{"model": "' + b"m" * 100_000 + b'", "prompt": "hi"}', 404, "unknown model"),
    "prompt object": (b'{"model": "tiny@1.0", "prompt": {"a": 1}}', 400, "prompt"),
    "prompt batch": (b'{"model": "tiny@1.0", "prompt": [[1, 2]]}', 400, "prompt"),
    "lone surrogate": (b'{"model": "tiny@1.0", "prompt": "a\\ud800b"}', 400, "tokenised"),
    "long id list": (b'{"model": "tiny@1.0", "prompt": [' + b"5," * CONTEXT + b'5]}', 400, "context limit"),
    "huge prompt": (b'{"model": "tiny@1.0", "prompt": "' + b"ab" * (BODY // 4) + b'"}', 400, "cannot fit"),
    "huge body": (b'{"model": "tiny@1.0", "prompt": "' + b"a" * BODY + b'"}', 413, "--max-body-bytes"),
    "deep nesting": (b"[" * 100_000, 400, "not valid JSON"),
    "not utf-8": (b"\xff\xfe{}", 400, "not valid JSON"),
    "not an object": (b'"hello"', 400, "JSON object"),
    "think_budget type": (b'{' + OK + b', "think_budget": true}', 400, "think_budget"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_gets_an_error_and_the_next_is_exact(server, reference, name):
    url, engine = server
    body, status, needle = HOSTILE[name]
    t0 = time.monotonic()
    got, answer, _ = post(url, body)
    assert got == status and needle in answer["error"]["message"], answer
    assert len(answer["error"]["message"]) < 300  # what the client sent is not echoed back at length
    assert time.monotonic() - t0 < 10
    if name == "huge body":  # refused before parsing, and before reading more than the limit
        assert engine.metrics.by_status[413] >= 1
    exact_next_request(url, reference)


def test_hostile_chat_messages(server, reference):
    url, _ = server
    for messages in (b'"x"', b"[]", b'[{"role": "user", "content": ["parts"]}]', b'[{"role": 1, "content": "a"}]'):
        status, answer, _ = post(url, b'{"model": "tiny@1.0", "messages": ' + messages + b"}",
                                 path="/v1/chat/completions")
        assert status == 400 and "message" in answer["error"]["message"]
    exact_next_request(url, reference)


@pytest.mark.parametrize("params", [
    {"temperature": 1e-300},  # the crash: now below the floor, i.e. greedy
    {"temperature": 2.0, "top_p": 1e-9},  # a nucleus of one token: greedy too
    {"temperature": 5e-6, "top_p": 0.5, "seed": -2**70},  # any integer seed
])
def test_extreme_but_valid_parameters_are_served(server, reference, params):
    url, _ = server
    r = client(url).completions.create(model="tiny@0.7", prompt="Q: 4+4", max_tokens=8, **params)
    assert r.choices[0].text == reference("Q: 4+4", "0.7", 8)
    r = client(url).completions.create(model="tiny@1.0", prompt="Q: 4+4", max_tokens=40, temperature=2.0, seed=3)
    assert r.usage.completion_tokens > 0
    exact_next_request(url, reference)


def test_api_key_is_required_on_v1_only(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(url, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(url, key=KEY + "x").completions.create(model="tiny@1.0", prompt="hi", max_tokens=2)
    status, answer, headers = post(url, b"{" + OK + b"}", key=None)
    assert status == 401 and answer["error"]["type"] == "authentication_error" and headers["www-authenticate"]
    status, answer, _ = post(url, b"{" + OK + b"}", path="/v1/chat/completions", key="")
    assert status == 401
    assert get(url, "/health")[0] == 200 and get(url, "/metrics")[0] == 200  # probes need no key
    assert [m.id for m in client(url).models.list().data][-1] == "tiny@auto"


def inject_fault(batch, at_call: int) -> None:
    """``batch.step`` raises at its ``at_call``-th call (a fresh batch replaces it then)."""
    original, calls = batch.step, []

    def faulty():
        calls.append(1)
        if len(calls) == at_call:
            raise RuntimeError("injected fault")
        return original()

    batch.step = faulty


def test_a_fault_in_a_step_fails_its_requests_and_the_server_goes_on(server, reference):
    url, engine = server
    batch = engine.batches["0.7"]
    inject_fault(batch, 3)
    with pytest.raises(openai.InternalServerError, match="injected fault") as exc:
        client(url).completions.create(model="tiny@0.7", prompt="Q: 1+2", max_tokens=8, temperature=0)
    assert exc.value.status_code == 500
    assert engine.batches["0.7"] is not batch  # a fresh batch replaced the one whose cache may be half-advanced
    inject_fault(engine.batches["0.7"], 3)  # now a stream meets the same fault: an error event, then the end
    with pytest.raises(openai.APIError, match="injected fault"):
        for _ in client(url).completions.create(model="tiny@0.7", prompt="Q: 1+2", max_tokens=8, temperature=0,
                                                stream=True):
            pass
    assert get(url, "/health")[0] == 200
    exact_next_request(url, reference, budget="0.7")
    exact_next_request(url, reference, budget="1.0")
    assert 'elasticlm_errors_total{status="500"}' in get(url, "/metrics")[1].decode()


def test_a_fault_admitting_a_request_leaves_running_requests_alone(server, reference):
    url, engine = server
    batch = engine.batches["1.0"]
    original = batch.add
    out: dict[str, object] = {}

    def long_stream():
        stream = client(url).completions.create(model="tiny@1.0", prompt="Q: 9+9", max_tokens=60, temperature=0,
                                                stream=True)
        out["text"] = "".join(ch.choices[0].text for ch in stream)

    t = threading.Thread(target=long_stream)
    t.start()
    wait_until(lambda: engine.active()["1.0"] == 1)
    batch.add = lambda requests: (_ for _ in ()).throw(RuntimeError("injected prefill fault"))
    try:
        with pytest.raises(openai.InternalServerError, match="injected prefill fault"):
            client(url).completions.create(model="tiny@1.0", prompt="x", max_tokens=4, temperature=0)
    finally:
        batch.add = original
    t.join(timeout=30)
    assert out["text"] == reference("Q: 9+9", "1.0", 60)  # re-prefilled in a fresh batch, still right
    exact_next_request(url, reference)


class Kill(BaseException):
    """Not an Exception: escapes every guard and ends the engine thread."""


def test_a_dead_engine_thread_is_restarted(server, reference):
    url, engine = server
    before = engine.metrics.restarts
    batch = engine.batches["0.45"]
    batch.step = lambda: (_ for _ in ()).throw(Kill())
    with pytest.raises(openai.InternalServerError, match="restarted"):
        client(url).completions.create(model="tiny@0.45", prompt="hi", max_tokens=4, temperature=0)
    wait_until(lambda: get(url, "/health")[0] == 200)
    assert engine.metrics.restarts == before + 1 and engine.batches["0.45"] is not batch
    exact_next_request(url, reference, budget="0.45")


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(server):
    url, engine = server
    args = {"model": "tiny@1.0", "prompt": "Q: sort 3 1 2", "max_tokens": 16, "temperature": 0.9, "top_p": 0.8}
    alone = client(url).completions.create(seed=1234, **args).choices[0].text
    others = {client(url).completions.create(seed=s, **args).choices[0].text for s in range(5)}
    assert others - {alone}, "the seed makes no difference: this test could not tell batches apart"
    stop = threading.Event()

    def neighbour(prompt, budget, **kw):  # rows of the same batch (and of another budget) while it decodes
        c = client(url)
        while not stop.is_set():
            c.completions.create(model=f"tiny@{budget}", prompt=prompt, max_tokens=24, **kw)

    threads = [threading.Thread(target=neighbour, args=a, kwargs=k) for a, k in [
        (("a longer prompt beside it", "1.0"), {"temperature": 1.0, "seed": 7}),
        (("x", "1.0"), {"temperature": 0}),
        (("Q: 5+5", "0.45"), {"temperature": 0.7})]]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: engine.active()["1.0"] >= 2)
        batched = [client(url).completions.create(seed=1234, **args).choices[0].text for _ in range(3)]
        shared = engine.metrics.completed["1.0"]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert shared > 0 and batched == [alone] * 3
    streamed = "".join(ch.choices[0].text for ch in client(url).completions.create(seed=1234, stream=True, **args))
    assert streamed == alone


def test_auto_counts_the_budgets_that_step_in_turn(ckpt):
    engine = _engine(ckpt, target_latency_ms=4.0)  # not started: its step model is set by hand
    cost = {"0.45": 0.001, "0.7": 0.002, "1.0": 0.003}
    engine.steps.samples = {b: [(1, t), (4, t)] for b, t in cost.items()}
    assert engine.auto() == "1.0"  # alone, 3 ms per token
    engine.jobs["0.45"] = [None]  # rows at 0.45 and 0.7: a token of 1.0 now waits for their steps too
    engine.jobs["0.7"] = [None]
    assert engine.auto() == "0.7"  # 2 + 1 ms; 1.0 would be 3 + 2 + 1 = 6 ms


@pytest.fixture
def small(ckpt):
    """One row per budget, one waiting request, 1.5 s per request: limits reached at once."""
    engine = _engine(ckpt, max_batch=1, max_queue=1, max_restarts=0)
    with running(engine, ckpt, request_timeout=1.5) as url:
        yield url, engine


def test_full_queue_is_429_and_late_requests_504_and_a_dead_engine_503(small, reference):
    url, engine = small
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    engine.batches["1.0"].step = lambda _step=engine.batches["1.0"].step: time.sleep(0.01) or _step()
    stream = c.completions.create(model="tiny@1.0", prompt="Q: 1+2", max_tokens=400, temperature=0, stream=True)
    next(iter(stream))  # decoding: the only row of 1.0
    queued: dict[str, Exception] = {}

    def waits():
        try:
            c.completions.create(model="tiny@1.0", prompt="x", max_tokens=400, temperature=0)
        except openai.APIStatusError as exc:
            queued["error"] = exc

    t = threading.Thread(target=waits)
    t.start()
    wait_until(lambda: engine.queue_depth() == 1)
    with pytest.raises(openai.RateLimitError, match="--max-queue") as exc:
        c.completions.create(model="tiny@1.0", prompt="x", max_tokens=4, temperature=0)
    assert exc.value.response.headers["retry-after"] == "1"
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="--request-timeout"):  # 400 tokens at 10 ms: past the deadline
        for _ in stream:
            pass
    t.join(timeout=10)
    assert queued["error"].status_code == 504 and time.monotonic() - t0 < 5  # never got the row in time
    wait_until(lambda: engine.active()["1.0"] == 0 and engine.queue_depth() == 0)
    exact_next_request(url, reference, budget="0.7")
    # no restarts allowed: a dead engine thread turns /health and new requests to 503 for good
    engine.batches["0.7"].step = lambda: (_ for _ in ()).throw(Kill())
    with pytest.raises(openai.InternalServerError, match="stopped serving") as died:  # not "restarted; retry"
        c.completions.create(model="tiny@0.7", prompt="hi", max_tokens=4, temperature=0)
    assert "restarted" not in str(died.value)
    wait_until(lambda: get(url, "/health")[0] == 503)
    assert "died" in json.loads(get(url, "/health")[1])["reason"]
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as exc:
        c.completions.create(model="tiny@1.0", prompt="hi", max_tokens=4, temperature=0)
    assert exc.value.status_code == 503 and time.monotonic() - t0 < 5
    assert "elasticlm_up 0" in get(url, "/metrics")[1].decode()


def test_detokenizer_equals_the_full_decode_with_bounded_windows():
    tok = byte_level_tokenizer()
    windows: list[int] = []

    class Counting:
        def decode(self, ids):
            windows.append(len(ids))
            return tok.decode(ids)

    rng = random.Random(0)
    texts = ["a€😀 b" * 50, "plain ascii text " * 100]
    ids_lists = [tok.encode(t).ids for t in texts] + [[rng.randrange(3, 259) for _ in range(2000)] for _ in range(3)]
    for ids in ids_lists:
        d = Detokenizer(Counting())
        windows.clear()
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert max(windows) <= 2 * Detokenizer.WINDOW  # constant work per token, not the whole text
    half = [d.push(i) for d in [Detokenizer(tok)] for i in tok.encode("€").ids]
    assert half[:-1] == ["", ""] and half[-1] == "€"  # an incomplete character is held back


def test_stop_strings_across_tokens_cut_at_the_earliest():
    tok = byte_level_tokenizer()
    s = TextStream(tok, ["xyz", "b€"])
    pieces = [s.push(i) for i in tok.encode("aab€cxyz").ids]
    assert "".join(pieces) == "aa" and s.stopped and s.flush() == ""
    s = TextStream(tok, ["END"])
    out = "".join(s.push(i) for i in tok.encode("abcENxEN").ids) + s.flush()
    assert out == "abcENxEN" and not s.stopped  # a partial match at the end is text after all


def test_sampling_is_safe_at_any_temperature():
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0], [float("nan"), 0.0, 1.0, float("-inf")],
                           [float("-inf")] * 4, [float("inf"), 0.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    for t in (1e-300, 1e-6, 1e-5, 1e-3, 1.0, 2.0):
        for p in (1e-9, 0.5, 1.0):
            out = sample_next(logits, t, p, gen).tolist()
            assert out[3] == 0 and 0 <= out[2] < 4  # +inf wins; a row of -inf gets its argmax
            assert p == 1.0 or out[0] == 0  # token 0 holds over half the mass up to T = 2
            assert t < 1e-5 or out[1] in (1, 2)  # NaN is never drawn (greedy rows keep argmax's semantics)
    assert sample_next(logits[:1], 1e-300, 1.0, gen).item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_draws_from_generators_on_the_device(ckpt):
    """Request generators used to be made on the CPU while the model sampled on the GPU: every sampled request
    failed there."""
    engine = Engine(elasticlm.Deployment.load(ckpt, device="cuda", serving=True), load_tokenizer(ckpt), "tiny",
                    max_context=CONTEXT)
    assert engine.device.type == "cuda"
    with running(engine, ckpt) as url:
        args = {"model": "tiny@0.7", "prompt": "Q: 1+2", "max_tokens": 12, "temperature": 0.9, "top_p": 0.8,
                "seed": 5}
        first, again = (client(url).completions.create(**args).choices[0].text for _ in range(2))
        streamed = "".join(ch.choices[0].text for ch in client(url).completions.create(stream=True, **args))
    assert first == again == streamed and engine.metrics.completed["0.7"] == 3
