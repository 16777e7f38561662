"""``elasticlm serve``: one process, one copy of the weights (in the decoding layout), every budget of an elastic
checkpoint behind an OpenAI-compatible HTTP API.

    elasticlm serve --checkpoint runs/demo/elastic/final --port 8000
    # /v1/models lists NAME@<budget> for every budget, and NAME@auto
    # /v1/completions, /v1/chat/completions (streaming or not), /health, /metrics (Prometheus text)

The :class:`Engine` runs generation on one background thread. Requests of one budget share a
:class:`~elasticlm.generate.DecodeBatch`: a request that arrives while others decode is prefilled and joins the
running batch at the next step (continuous batching); a finished or abandoned one (client gone) leaves it. Each
row decodes exactly as it would alone (ragged batches are exact). Budgets run as separate batches, one step each
in turn: a Subnet's widths are fixed per forward, so rows of different budgets cannot share one.

``NAME@auto`` serves the largest budget whose predicted time per token, with the rows it would join, meets
``--target-latency-ms``; the prediction is a per-budget line (fixed cost + cost per row) fitted to step times
measured at start-up and updated while serving. The response's ``model`` field names the budget that served it.

The web layer (FastAPI + uvicorn) is an optional dependency: ``pip install elasticlm[serve]``.
"""


import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .generate import DecodeBatch, Request
from .model.hybrid import HybridLM

log = logging.getLogger("elasticlm.serve")

AUTO = "auto"


class RequestError(Exception):
    """A bad request: becomes an OpenAI-style JSON error with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Job:
    """A request in the engine: its decoding row, where its tokens go, and its timings."""

    budget: str
    request: Request
    sink: Any  # put(item): called on the engine thread with ("token", id) / ("done", reason) / ("error", text)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False


class StepModel:
    """Per-budget decode-step time as ``fixed + per_row · rows`` (least squares over recent measurements)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[int, float]]] = {}

    def add(self, budget: str, rows: int, seconds: float) -> None:
        s = self.samples.setdefault(budget, [])
        s.append((rows, seconds))
        del s[:-200]

    def predict(self, budget: str, rows: int) -> float:
        s = self.samples.get(budget) or [(1, 0.0)]
        n = len(s)
        mx = sum(r for r, _ in s) / n
        my = sum(t for _, t in s) / n
        var = sum((r - mx) ** 2 for r, _ in s)
        slope = sum((r - mx) * (t - my) for r, t in s) / var if var > 0 else 0.0
        return max(0.0, my + max(0.0, slope) * (rows - mx))


class Engine:
    """Continuous batching per budget on one thread (see the module docstring)."""

    def __init__(self, model: HybridLM, tokenizer: Any, name: str, max_batch: int = 32,
                 target_latency_ms: float = 100.0, max_context: int = 4096) -> None:
        if not model.budgets:
            raise ConfigError("serve needs an elastic checkpoint (the final/ directory of `elasticlm train`, with "
                              "elastic.json); a plain model has no budgets to serve")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.budgets = dict(model.budgets)
        self.order = sorted(self.budgets, key=lambda b: model.budget_targets.get(b, 0.0))  # smallest first
        self.max_batch, self.target = max_batch, target_latency_ms / 1000
        self.max_context = max_context
        self.eos = model.config.eos_token_id
        self.batches = {b: DecodeBatch(model, s) for b, s in self.budgets.items()}
        self.jobs: dict[str, list[Job]] = {b: [] for b in self.budgets}
        self.incoming: queue.Queue[Job] = queue.Queue()
        self.steps = StepModel()
        self.metrics = Metrics(list(self.budgets))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the engine thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.calibrate()
        self._thread = threading.Thread(target=self._run, name="elasticlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @torch.inference_mode()
    def calibrate(self, rows: tuple[int, ...] = (1, 4)) -> None:
        """Measure a few decode steps per budget and batch size, for ``auto``."""
        prompt = [self.eos if self.eos is not None else 0] * 4
        for b in self.budgets:
            for n in rows:
                batch = DecodeBatch(self.model, self.budgets[b])
                batch.add([Request(prompt, 4) for _ in range(n)])
                batch.step()
                t0 = time.perf_counter()
                batch.step()
                self.steps.add(b, n, time.perf_counter() - t0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not any(self.jobs.values()))
            for b in self.order:
                if self.jobs[b]:
                    self._step(b)

    def _admit(self, block: bool) -> None:
        new: dict[str, list[Job]] = {}
        try:
            job = self.incoming.get(timeout=0.05) if block else self.incoming.get_nowait()
            while True:
                if not job.cancelled:
                    new.setdefault(job.budget, []).append(job)
                job = self.incoming.get_nowait()
        except queue.Empty:
            pass
        for b, jobs in new.items():
            room = self.max_batch - len(self.jobs[b])
            for late in jobs[max(room, 0):]:  # beyond the batch limit: back in the queue for a later step
                self.incoming.put(late)
            jobs = jobs[: max(room, 0)]
            if not jobs:
                continue
            try:
                self.batches[b].add([j.request for j in jobs])
            except Exception as exc:  # a bad prompt reaching the model: fail these requests, keep serving
                for j in jobs:
                    j.sink(("error", str(exc)))
                continue
            self.jobs[b].extend(jobs)
            for j in jobs:  # max_tokens 0: finished at admission
                if j.request.finished:
                    j.sink(("done", j.request.finished))
            self.jobs[b] = [j for j in self.jobs[b] if not j.request.finished]

    def _step(self, b: str) -> None:
        batch, jobs = self.batches[b], self.jobs[b]
        gone = [j for j in jobs if j.cancelled]
        if gone:  # clients that left: free their rows
            self.metrics.cancel(b, len(gone))
            batch.drop([j.request for j in gone], "cancelled")
            self.jobs[b] = jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                return
        rows = len(batch)
        t0 = time.perf_counter()
        produced = batch.step()
        self.steps.add(b, rows, time.perf_counter() - t0)
        by_request = {id(j.request): j for j in jobs}
        now = time.perf_counter()
        for req, tok in produced:
            job = by_request[id(req)]
            if job.first_token is None:
                job.first_token = now
            job.sink(("token", tok))
            if req.finished:
                job.sink(("done", req.finished))
                self.metrics.finished(b, len(req.tokens), now - job.submitted)
        self.jobs[b] = [j for j in jobs if not j.request.finished]

    # -- called from the web layer ------------------------------------------------------------------------
    def resolve(self, model: str) -> str:
        """The budget label a request's ``model`` names: ``NAME@0.5``, ``0.5``, ``NAME@auto`` or ``NAME``
        (the full model)."""
        label = model.split("@", 1)[1] if "@" in model else (model if model in self.budgets or model == AUTO
                                                            else None)
        if "@" in model and model.split("@", 1)[0] != self.name:
            raise RequestError(404, f"unknown model {model!r}; GET /v1/models lists them", "model")
        if label is None:
            if model != self.name:
                raise RequestError(404, f"unknown model {model!r}; GET /v1/models lists them", "model")
            return self.order[-1]
        if label == AUTO:
            return self.auto()
        if label not in self.budgets:
            raise RequestError(404, f"unknown budget {label!r}; this checkpoint serves {', '.join(self.order)} "
                                    "and auto", "model")
        return label

    def auto(self) -> str:
        """The largest budget whose predicted time per token, joining its current batch, meets the target."""
        for b in reversed(self.order):
            if self.steps.predict(b, len(self.jobs[b]) + 1) <= self.target:
                return b
        return self.order[0]

    def submit(self, budget: str, request: Request, sink: Any) -> Job:
        job = Job(budget, request, sink)
        self.metrics.submitted(budget)
        self.incoming.put(job)
        return job

    def queue_depth(self) -> int:
        return self.incoming.qsize()

    def active(self) -> dict[str, int]:
        return {b: len(j) for b, j in self.jobs.items()}


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self, budgets: list[str]) -> None:
        self.lock = threading.Lock()
        self.requests = dict.fromkeys(budgets, 0)
        self.completed = dict.fromkeys(budgets, 0)
        self.tokens = dict.fromkeys(budgets, 0)
        self.latency = {b: [0] * (len(self.BUCKETS) + 1) for b in budgets}
        self.latency_sum = dict.fromkeys(budgets, 0.0)
        self.cancelled = dict.fromkeys(budgets, 0)
        self.errors = 0

    def bad_request(self) -> None:
        with self.lock:
            self.errors += 1

    def cancel(self, budget: str, n: int = 1) -> None:
        with self.lock:
            self.cancelled[budget] += n

    def submitted(self, budget: str) -> None:
        with self.lock:
            self.requests[budget] += 1

    def finished(self, budget: str, tokens: int, seconds: float) -> None:
        with self.lock:
            self.completed[budget] += 1
            self.tokens[budget] += tokens
            self.latency_sum[budget] += seconds
            i = next((k for k, edge in enumerate(self.BUCKETS) if seconds <= edge), len(self.BUCKETS))
            self.latency[budget][i] += 1

    def text(self, queue_depth: int, active: dict[str, int]) -> str:
        out = ["# HELP elasticlm_requests_total Requests received, per budget",
               "# TYPE elasticlm_requests_total counter"]
        with self.lock:
            out += [f'elasticlm_requests_total{{budget="{b}"}} {v}' for b, v in self.requests.items()]
            out += ["# HELP elasticlm_generated_tokens_total Tokens generated, per budget",
                    "# TYPE elasticlm_generated_tokens_total counter"]
            out += [f'elasticlm_generated_tokens_total{{budget="{b}"}} {v}' for b, v in self.tokens.items()]
            out += ["# HELP elasticlm_request_seconds Time from submission to the last token, per budget",
                    "# TYPE elasticlm_request_seconds histogram"]
            for b, counts in self.latency.items():
                acc = 0
                for edge, c in zip((*self.BUCKETS, float("inf")), counts, strict=True):
                    acc += c
                    le = "+Inf" if edge == float("inf") else f"{edge:g}"
                    out.append(f'elasticlm_request_seconds_bucket{{budget="{b}",le="{le}"}} {acc}')
                out.append(f'elasticlm_request_seconds_sum{{budget="{b}"}} {self.latency_sum[b]:.6f}')
                out.append(f'elasticlm_request_seconds_count{{budget="{b}"}} {self.completed[b]}')
            out += ["# HELP elasticlm_cancelled_total Requests abandoned mid-generation (client gone, stop string)",
                    "# TYPE elasticlm_cancelled_total counter"]
            out += [f'elasticlm_cancelled_total{{budget="{b}"}} {v}' for b, v in self.cancelled.items()]
            out += ["# HELP elasticlm_bad_requests_total Requests refused with a 4xx",
                    "# TYPE elasticlm_bad_requests_total counter", f"elasticlm_bad_requests_total {self.errors}"]
        out += ["# HELP elasticlm_queue_depth Requests waiting to join a batch", "# TYPE elasticlm_queue_depth gauge",
                f"elasticlm_queue_depth {queue_depth}",
                "# HELP elasticlm_active_rows Sequences decoding, per budget", "# TYPE elasticlm_active_rows gauge"]
        out += [f'elasticlm_active_rows{{budget="{b}"}} {n}' for b, n in active.items()]
        return "\n".join(out) + "\n"


# -- request parsing (no web framework needed: testable alone) --------------------------------------------------


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {kind} in [{low:g}, {high:g}], got {value!r}", key)
    return int(value) if integer else float(value)


def chat_prompt(messages: Any, tokenizer_dir: Path | None) -> str:
    """The prompt text of a chat: the tokenizer's chat template (``tokenizer_config.json``, rendered with Jinja2)
    when it has one, else the plain format ``<role>: <content>`` per message and a final ``assistant:``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(400, "each message must be an object with string 'role' and 'content'", "messages")
    template = None
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file():
        with contextlib.suppress(ValueError, OSError):
            template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, str):
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            return ImmutableSandboxedEnvironment().from_string(template).render(messages=messages,
                                                                                 add_generation_prompt=True)
        except ImportError:
            log.warning("the tokenizer has a chat template but jinja2 is not installed: using the plain format")
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class Completion:
    """A parsed completion request."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    stop: list[str]
    seed: int | None
    think_budget: str | None = None  # think small, answer big: this budget writes the trace
    think_stop: str = "\nA:"  # ...up to and including this text; the request's budget writes the rest


def parse_completion(body: Any, tokenizer: Any, max_context: int, chat: bool, tokenizer_dir: Path | None = None
                     ) -> Completion:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required (GET /v1/models lists them)", "model")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n = 1 is supported", "n")
    if chat:
        text = chat_prompt(body.get("messages"), tokenizer_dir)
        ids = tokenizer.encode(text).ids
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt).ids
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError(400, "'prompt' must be a non-empty string or a list of token ids "
                                    "(one prompt per request)", "prompt")
    if not ids:
        raise RequestError(400, "the prompt is empty after tokenization", "prompt")
    vocab = tokenizer.get_vocab_size()
    if any(not 0 <= t < vocab for t in ids):
        raise RequestError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, key, 16, 0, max_context, integer=True)
    if len(ids) + max_tokens > max_context:
        raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"context limit of {max_context} tokens", key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(400, "'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    think = body.get("think_budget")
    if think is not None and not isinstance(think, (str, int, float)):
        raise RequestError(400, "'think_budget' must be a budget label such as \"0.5\"", "think_budget")
    think_stop = body.get("think_stop", "\nA:")
    if not isinstance(think_stop, str) or not think_stop:
        raise RequestError(400, "'think_stop' must be a non-empty string", "think_stop")
    return Completion(model, ids, max_tokens, _number(body, "temperature", 1.0, 0.0, 2.0),
                      _number(body, "top_p", 1.0, 1e-9, 1.0), stream, stop, seed,
                      None if think is None else str(think), think_stop)


class TextStream:
    """Token ids → text pieces, holding back an incomplete UTF-8 character and anything that could still turn
    into a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                piece, self.sent = text[self.sent:at], at
                return piece
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:  # a stop string's beginning at the end: wait for the next token
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        piece = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


# -- the web layer ------------------------------------------------------------------------------------------------


def build_app(engine: Engine, tokenizer_dir: Path | None = None) -> Any:
    """The FastAPI application over ``engine``."""
    try:
        from fastapi import FastAPI
        from fastapi import Request as HTTPRequest
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    except ImportError:
        raise ConfigError("`elasticlm serve` needs FastAPI and uvicorn: pip install 'elasticlm[serve]'") from None

    app = FastAPI(title="elasticlm", description="every budget of one elastic checkpoint")

    def error(exc: RequestError) -> Any:
        engine.metrics.bad_request()
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": None}},
                            status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "budgets": engine.order, "active": engine.active(), "queued": engine.queue_depth()}

    @app.get("/metrics")
    def metrics() -> Any:
        return PlainTextResponse(engine.metrics.text(engine.queue_depth(), engine.active()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        created = int(time.time())
        ids = [f"{engine.name}@{b}" for b in engine.order] + [f"{engine.name}@{AUTO}"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "elasticlm"}
                                           for i in ids]}

    async def body_of(request: HTTPRequest) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None

    async def complete(request: HTTPRequest, chat: bool) -> Any:
        try:
            body = await body_of(request)
            c = parse_completion(body, engine.tokenizer, engine.max_context, chat, tokenizer_dir)
            budget = engine.resolve(c.model)
        except RequestError as exc:
            return error(exc)
        try:
            think = None if c.think_budget is None else engine.resolve(f"{engine.name}@{c.think_budget}")
        except RequestError as exc:
            return error(RequestError(exc.status, exc.message, "think_budget"))
        gen = torch.Generator().manual_seed(c.seed if c.seed is not None else int(uuid.uuid4().int % 2**63))
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        sink = lambda item: loop.call_soon_threadsafe(items.put_nowait, item)  # noqa: E731
        if think is not None:  # phase 1 at the thinking budget, up to the switch marker; its tokens are relayed
            req = Request(c.prompt_ids, c.max_tokens, c.temperature, c.top_p, engine.eos, gen,
                          stop_ids=engine.tokenizer.encode(c.think_stop).ids)
        else:
            req = Request(c.prompt_ids, c.max_tokens, c.temperature, c.top_p, engine.eos, gen)
        job = engine.submit(think or budget, req, sink)
        answer: dict[str, Any] = {}  # phase 2's request and job, once the switch marker was written
        served = f"{engine.name}@{budget}" if think is None else f"{engine.name}@{think}→{budget}"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        text = TextStream(engine.tokenizer, c.stop)

        async def events() -> AsyncIterator[tuple[str, str | None]]:
            """(text piece, finish reason or None) until the request ends."""
            try:
                while True:
                    kind, value = await items.get()
                    if kind == "token":
                        if value == engine.eos:
                            continue
                        piece = text.push(value)
                        if text.stopped:
                            job.cancelled = True
                            yield piece, "stop"
                            return
                        if piece:
                            yield piece, None
                    elif kind == "done" and value == "switch" and not answer:  # answer at the request's budget
                        rest = Request(c.prompt_ids + req.tokens, c.max_tokens - len(req.tokens), c.temperature,
                                       c.top_p, engine.eos, gen)
                        answer["request"], answer["job"] = rest, engine.submit(budget, rest, sink)
                        if rest.max_new_tokens <= 0:
                            yield text.flush(), "length"
                            return
                    elif kind == "done":
                        yield text.flush(), "stop" if value == "stop" else "length"
                        return
                    else:
                        raise RuntimeError(value)
            finally:
                job.cancelled = True  # a client that left (or a stop string): the engine frees the row
                if answer:
                    answer["job"].cancelled = True

        def usage() -> dict[str, int]:
            n = len(req.tokens) + (len(answer["request"].tokens) if answer else 0)
            return {"prompt_tokens": len(c.prompt_ids), "completion_tokens": n,
                    "total_tokens": len(c.prompt_ids) + n}

        def chunk(piece: str, finish: str | None) -> str:
            if chat:
                delta = {"content": piece} if piece else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served,
                       "choices": [choice]}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
                obj = {"id": rid, "object": "text_completion", "created": created, "model": served,
                       "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n"

        if c.stream:
            async def sse() -> AsyncIterator[str]:
                try:
                    if chat:
                        first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None, "logprobs": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    async for piece, finish in events():
                        if piece or finish:
                            yield chunk(piece, finish)
                    yield "data: [DONE]\n\n"
                finally:  # also when the client disconnects mid-stream: its row is freed at the next step
                    job.cancelled = True
                    if answer:
                        answer["job"].cancelled = True

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"x-elasticlm-budget": budget})

        parts, finish = [], "length"
        async for piece, why in events():
            parts.append(piece)
            finish = why or finish
        out = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish,
                      "logprobs": None}
            obj = {"id": rid, "object": "chat.completion", "created": created, "model": served, "choices": [choice],
                   "usage": usage()}
        else:
            obj = {"id": rid, "object": "text_completion", "created": created, "model": served,
                   "choices": [{"index": 0, "text": out, "finish_reason": finish, "logprobs": None}],
                   "usage": usage()}
        return JSONResponse(obj, headers={"x-elasticlm-budget": budget})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=True)

    return app


def load_engine(checkpoint: str | Path, device: str = "cpu", **kw: Any) -> tuple[Engine, Path]:
    from .checkpoint import load
    from .runtime import resolve_device
    from .tokenizer import load_tokenizer

    path = Path(checkpoint)
    model = load(path, device=resolve_device(device), serving=True)
    tok = load_tokenizer(path)
    return Engine(model, tok, path.resolve().parent.name if path.name == "final" else path.resolve().name, **kw), path


@contextlib.contextmanager
def running(engine: Engine, tokenizer_dir: Path | None, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread (tests, benchmarks); yields the base URL."""
    import uvicorn

    engine.start()
    config = uvicorn.Config(build_app(engine, tokenizer_dir), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the server did not start")
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
