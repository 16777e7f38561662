"""`elasticlm serve` through the real `openai` client: per-budget greedy completions equal `elasticlm generate`,
streaming equals non-streaming, concurrent ragged requests equal each alone, bad requests are 4xx with a message,
a client that disconnects mid-stream frees its row and the server keeps serving."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import elasticlm  # noqa: E402
from elasticlm.serve import Engine, TextStream, running  # noqa: E402
from elasticlm.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_deploy import elastic_checkpoint

    root = tmp_path_factory.mktemp("serve")
    path = elastic_checkpoint(root, name="final")
    engine = Engine(elasticlm.Deployment.load(path, serving=True), load_tokenizer(path), "tiny", max_batch=8,
                    max_context=8192)
    with running(engine, path) as url:
        yield url, engine, path


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(path, prompt, budget, n):
    """What `elasticlm generate` (greedy, the nested budget) returns for ``prompt``."""
    deployed = elasticlm.Deployment.load(path, serving=True)
    model = deployed.model
    tok = load_tokenizer(path)
    ids = tok.encode(prompt).ids
    out = deployed.generate(torch.tensor([ids]), budget=budget, max_new_tokens=n)[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    if eos in out:
        out = out[: out.index(eos)]
    return tok.decode(out)


PROMPTS = ["Q: 1+2", "a much longer prompt with several words in it", "x", "Q: sort 3 1 2"]


def test_models_health_metrics(server):
    url, engine, _ = server
    ids = [m.id for m in client(url).models.list().data]
    assert ids == [f"tiny@{b}" for b in engine.order] + ["tiny@auto"] and len(ids) == 4
    conn = http.client.HTTPConnection(urlparse(url).netloc)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'elasticlm_requests_total{budget="1.0"}' in text and "elasticlm_queue_depth" in text


@pytest.mark.parametrize("budget", ["1.0", "0.7", "0.45"])
def test_greedy_completion_per_budget_equals_generate(server, budget):
    url, _, path = server
    c = client(url)
    r = c.completions.create(model=f"tiny@{budget}", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == reference(path, PROMPTS[0], budget, 12) and r.model == f"tiny@{budget}"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=f"tiny@{budget}", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_chat_completion_plain_format_and_stream(server):
    url, _, path = server
    c = client(url)
    msgs = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model="tiny@0.7", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == reference(path, "user: hello\nassistant:", "0.7", 8)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny@0.7", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].message.content


def test_concurrent_ragged_requests_equal_each_alone(server):
    url, _, path = server
    jobs = [(p, b) for p in PROMPTS for b in ("1.0", "0.45")]
    results: dict[int, str] = {}

    def one(i, prompt, budget):
        r = client(url).completions.create(model=f"tiny@{budget}", prompt=prompt, max_tokens=10, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=one, args=(i, p, b)) for i, (p, b) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (p, b) in enumerate(jobs):
        assert results[i] == reference(path, p, b, 10), (p, b)


def test_auto_names_the_budget_that_served(server):
    """An idle server: with no latency target to meet, auto serves the largest budget; with one no budget can
    meet, the smallest. The text is that budget's own greedy output."""
    url, engine, path = server
    saved = engine.target
    try:
        for target, want in ((float("inf"), engine.order[-1]), (0.0, engine.order[0])):
            engine.target = target
            r = client(url).completions.create(model="tiny@auto", prompt="Q: 2+3", max_tokens=6, temperature=0)
            assert r.model == f"tiny@{want}"
            assert r.choices[0].text == reference(path, "Q: 2+3", want, 6)
    finally:
        engine.target = saved
    assert engine.order[0] != engine.order[-1]


def test_a_budget_written_another_way_is_the_same_budget(server):
    """The server looks budgets up as every verb does (`find_budget`): "70%" is the 0.7 budget."""
    url, engine, path = server
    r = client(url).completions.create(model="tiny@70%", prompt="Q: 2+3", max_tokens=6, temperature=0)
    assert r.model == "tiny@0.7" and r.choices[0].text == reference(path, "Q: 2+3", "0.7", 6)


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"model": "tiny@0.33"}, "NotFoundError", "unknown budget"),
    ({"model": "other@1.0"}, "NotFoundError", "unknown model"),
    ({"max_tokens": -1}, "BadRequestError", "max_tokens"),
    ({"max_tokens": 100_000}, "BadRequestError", "max_tokens"),
    ({"max_tokens": 8191}, "BadRequestError", "context limit"),
    ({"temperature": 5}, "BadRequestError", "temperature"),
    ({"prompt": ""}, "BadRequestError", "prompt"),
    ({"prompt": [1, 2, 99999]}, "BadRequestError", "token ids"),
])
def test_bad_requests_are_4xx_with_a_message(server, kwargs, error, needle):
    url, _, _ = server
    args = {"model": "tiny@1.0", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(getattr(openai, error)) as exc:
        client(url).completions.create(**args)
    assert needle in str(exc.value)


def test_malformed_json_is_400(server):
    url, _, _ = server
    conn = http.client.HTTPConnection(urlparse(url).netloc)
    conn.request("POST", "/v1/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and "not valid JSON" in json.loads(resp.read())["error"]["message"]


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    url, engine, path = server
    conn = http.client.HTTPConnection(urlparse(url).netloc)
    before = engine.metrics.cancelled["1.0"]
    body = json.dumps({"model": "tiny@1.0", "prompt": "Q: 1+2", "max_tokens": 8000, "temperature": 0,
                       "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(6) == b"data: "  # the first event has begun
    conn.sock.close()  # gone, mid-stream
    conn.close()
    deadline = time.time() + 30
    while sum(engine.active().values()) and time.time() < deadline:
        time.sleep(0.05)
    assert sum(engine.active().values()) == 0
    assert engine.metrics.cancelled["1.0"] == before + 1  # freed because it left, not because it finished
    r = client(url).completions.create(model="tiny@1.0", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert r.choices[0].text == reference(path, PROMPTS[1], "1.0", 6)


def test_stop_strings_hold_back_a_partial_match():
    class Chars:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    s = TextStream(Chars(), ["END"])
    pieces = [s.push(ord(ch)) for ch in "abcENxEND"]
    assert "".join(pieces) == "abcENx" and s.stopped and pieces[3] == "" and pieces[4] == ""


def test_plain_model_is_refused():
    from conftest import tiny_config

    with pytest.raises(elasticlm.ConfigError, match="elastic checkpoint"):
        Engine(elasticlm.Deployment(elasticlm.HybridLM(tiny_config())), None, "x")


def test_cli_serve_answers_the_openai_client_and_drains_on_sigterm(tmp_path):
    """`elasticlm serve` as the README runs it: a subprocess with its API key in the environment, polled until
    healthy, one completion; then SIGTERM while a stream runs: /health turns 503 (or the port closes), in-flight
    work is cut at --shutdown-timeout, and the process exits 0."""
    import contextlib
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    from test_deploy import elastic_checkpoint

    path = elastic_checkpoint(tmp_path, name="final")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "elasticlm", "serve", "--checkpoint", str(path), "--port",
                             str(port), "--shutdown-timeout", "0.5"], stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"ELASTICLM_API_KEY": "k3y"})
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        c = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        name = c.models.list().data[0].id.split("@")[0]  # the run's directory name (final/'s parent)
        assert name == tmp_path.name
        r = c.completions.create(model=f"{name}@0.7", prompt="Q: 1+2", max_tokens=5, temperature=0)
        assert r.choices[0].text == reference(path, "Q: 1+2", "0.7", 5)
        chunks = iter(c.completions.create(model=f"{name}@1.0", prompt="Q: 1+2", max_tokens=4000, temperature=0,
                                           stream=True))
        next(chunks)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        with contextlib.suppress(OSError):  # OSError: it has stopped listening already
            with pytest.raises(urllib.error.HTTPError, match="503"):
                urllib.request.urlopen(f"{url}/health", timeout=1)
        with contextlib.suppress(Exception):  # the stream ends: finished, or cut at the shutdown timeout
            for _ in chunks:
                pass
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.isdir(path)


def test_cli_serve_refuses_a_plain_model(tmp_path, capsys):
    from elasticlm.cli import main

    assert main(["init", str(tmp_path / "plain"), "--preset", "tiny"]) == 0
    capsys.readouterr()
    assert main(["serve", "--checkpoint", str(tmp_path / "plain"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "elastic checkpoint" in err and len(err.strip().splitlines()) == 1
    import socket

    with socket.socket() as busy:  # a port another process listens on: one line, before loading anything
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path / "plain"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on" in err and len(err.strip().splitlines()) == 1


def test_think_budget_request_field(server):
    """think small, answer big through the API: the response equals generate_think_answer's tokens."""
    from elasticlm.generate import generate_think_answer

    url, engine, path = server
    deployed, model, tok = engine.deployment, engine.model, engine.tokenizer
    ids = tok.encode(PROMPTS[0]).ids
    small = deployed.budgets["0.45"]
    trace = deployed.generate(torch.tensor([ids]), budget="0.45", max_new_tokens=10)[0, len(ids):].tolist()
    stop = tok.decode(trace[2:4])  # text the small budget certainly writes: the switch point
    want_ids = generate_think_answer(model, [ids], switch_ids=tok.encode(stop).ids, think=small,
                                     answer=deployed.budgets["1.0"], max_new_tokens=10,
                                     eos_token_id=model.config.eos_token_id)[0]
    eos = model.config.eos_token_id
    want = tok.decode([t for t in want_ids if t != eos])
    r = client(url).completions.create(model="tiny@1.0", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                       extra_body={"think_budget": "0.45", "think_stop": stop})
    assert r.choices[0].text == want and r.model == "tiny@0.45→1.0"
    with pytest.raises(openai.NotFoundError, match="unknown budget"):
        client(url).completions.create(model="tiny@1.0", prompt="x", max_tokens=2, extra_body={"think_budget": "0.3"})


def naive_think_answer(model, ids: list[int], switch: list[int], think, answer, new: int) -> list[int]:
    """Think-then-answer by a cache-free loop: every token the argmax of a whole forward pass, under the think
    budget until the generated tokens end with ``switch``, then under the answer budget."""
    out: list[int] = []
    subnet = think
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids + out]), subnet)[0, -1]
            out.append(int(logits.argmax()))
            if subnet is think and out[-len(switch):] == switch:
                subnet = answer
    return out


def test_cli_generate_think_budget(server, capsys):
    from elasticlm.cli import main

    _, engine, path = server
    deployed, model, tok = engine.deployment, engine.model, engine.tokenizer
    ids = tok.encode("Q: 4+4").ids
    trace = deployed.generate(torch.tensor([ids]), budget="0.45", max_new_tokens=8)[0, len(ids):].tolist()
    # a marker the think budget writes early, whose text encodes back to the same tokens (the CLI takes text)
    k = next(k for k in range(1, 6) if tok.encode(tok.decode(trace[k:k + 2])).ids == trace[k:k + 2])
    stop = tok.decode(trace[k:k + 2])
    think, answer = deployed.budgets["0.45"], deployed.budgets["0.7"]
    want = naive_think_answer(model, ids, tok.encode(stop).ids, think, answer, 8)
    assert want != naive_think_answer(model, ids, tok.encode(stop).ids, think, think, 8), \
        "the switch must change the answer here"
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--prompt", "Q: 4+4", "--budget", "0.7", "--think-budget",
                 "0.45", "--switch", stop, "--max-new-tokens", "8", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(want)


def test_chat_prompt_uses_the_tokenizers_template_when_it_has_one(tmp_path):
    from elasticlm.serve import RequestError, chat_prompt

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(msgs, None) == "system: be brief\nuser: hi\nassistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    assert chat_prompt(msgs, tmp_path) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    with pytest.raises(RequestError, match="each message"):
        chat_prompt([{"role": "user"}], None)
