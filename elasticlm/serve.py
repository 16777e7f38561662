"""``elasticlm serve``: one process, one copy of the weights (in the decoding layout), every budget of an elastic
checkpoint behind an OpenAI-compatible HTTP API.

    elasticlm serve --checkpoint runs/demo/elastic/final --port 8000
    # /v1/models lists NAME@<budget> for every budget, and NAME@auto
    # /v1/completions, /v1/chat/completions (streaming or not), /health, /metrics (Prometheus text)

The :class:`Engine` runs generation on one background thread. Requests of one budget share a
:class:`~elasticlm.generate.DecodeBatch`: a request that arrives while others decode is prefilled and joins the
running batch at the next step (continuous batching); a finished or abandoned one (client gone) leaves it. Each
row decodes exactly as it would alone (ragged batches are exact). A batch that never empties (steady load) drops
the cache positions that all its rows have as padding (:meth:`HybridCache.drop_shared_padding`), so its memory and
step time follow its rows, not its age. Budgets run as separate batches, one step each in
turn: a Subnet's widths are fixed per forward, so rows of different budgets cannot share one.

``NAME@auto`` serves the largest budget whose predicted time per token, with the rows it would join, meets
``--target-latency-ms``; the prediction is a per-budget line (fixed cost + cost per row) fitted to step times
measured at start-up and updated while serving, summed over the budgets that have rows (they step in turn, so a
token of one budget waits for a step of each). The response's ``model`` field names the budget that served it.

No request can stop the server: an exception while admitting or decoding fails the requests it touched (an
OpenAI-style error, 4xx where their input was at fault, else 500) and the engine goes on with a fresh batch; if
the engine thread dies anyway, a watchdog fails its requests and restarts it (``max_restarts`` times a minute,
then ``/health`` answers 503 for good and :func:`serve_until_signalled` exits 1). Limits: an API key on every
``/v1`` route, a bounded queue (429 + ``Retry-After``), a deadline per request (504), a bound on the body size
(413, before parsing) and on the prompt (400, before tokenising); SIGTERM drains (see
:func:`serve_until_signalled`).

The web layer (FastAPI + uvicorn) is an optional dependency: ``pip install elasticlm[serve]``.
"""


import asyncio
import contextlib
import hmac
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .elastic.deployment import Deployment
from .errors import ConfigError, ElasticLMError
from .generate import DecodeBatch, Request

log = logging.getLogger("elasticlm.serve")

AUTO = "auto"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class RequestError(Exception):
    """A request that cannot be served: becomes an OpenAI-style JSON error with this HTTP status (and headers,
    e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages echo what a client sent, however long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Job:
    """A request in the engine: its decoding row, where its tokens go, and its timings."""

    budget: str
    request: Request
    # put(item): called on the engine thread with ("token", id) / ("done", reason) / ("error", (status, message))
    sink: Any
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False


class StepModel:
    """Per-budget decode-step time as ``fixed + per_row · rows`` (least squares over recent measurements).
    Written by the engine thread, read by request handlers: behind a lock."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[int, float]]] = {}
        self.lock = threading.Lock()

    def add(self, budget: str, rows: int, seconds: float) -> None:
        with self.lock:
            s = self.samples.setdefault(budget, [])
            s.append((rows, seconds))
            del s[:-200]

    def predict(self, budget: str, rows: int) -> float:
        with self.lock:
            s = list(self.samples.get(budget) or [(1, 0.0)])
        n = len(s)
        mx = sum(r for r, _ in s) / n
        my = sum(t for _, t in s) / n
        var = sum((r - mx) ** 2 for r, _ in s)
        slope = sum((r - mx) * (t - my) for r, t in s) / var if var > 0 else 0.0
        return max(0.0, my + max(0.0, slope) * (rows - mx))


class Engine:
    """Continuous batching per budget on one thread, kept alive by a watchdog (see the module docstring)."""

    def __init__(self, deployment: Deployment, tokenizer: Any, name: str, max_batch: int = 32,
                 target_latency_ms: float = 100.0, max_context: int = 4096, max_queue: int = 256,
                 max_restarts: int = 3, stall_seconds: float = 120.0) -> None:
        if not deployment.budgets:
            raise ConfigError("serve needs an elastic checkpoint (the final/ directory of `elasticlm train`, with "
                              "elastic.json); a plain model has no budgets to serve")
        self.deployment, self.tokenizer, self.name = deployment, tokenizer, name
        model = self.model = deployment.model
        self.device = model.device  # where sampling happens: request generators live here
        self.budgets = dict(deployment.budgets)  # served: those loaded (untrained ones are not placed per request)
        self.order = deployment.order  # smallest first
        self.max_batch, self.target = max_batch, target_latency_ms / 1000
        self.max_context, self.max_queue = max_context, max_queue
        self.max_restarts, self.stall_seconds = max_restarts, stall_seconds
        self.eos = model.config.eos_token_id
        # the longest token, in characters: a text longer than max_context times this cannot fit the context,
        # which is known without tokenising it (a byte-level BPE token covers at least one character)
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.max_token_chars = max((len(t) for t in vocab), default=16)
        self.batches = {b: self.new_batch(b) for b in self.budgets}
        self.jobs: dict[str, list[Job]] = {b: [] for b in self.budgets}  # decoding now (the engine thread's)
        self._waiting: deque[Job] = deque()  # submitted, not yet admitted (at most max_queue)
        self._cv = threading.Condition()  # guards _waiting and accepting; wakes an idle engine
        self.steps = StepModel()
        self.metrics = Metrics(list(self.budgets))
        self.accepting = True  # False once draining for shutdown: new requests get 503
        self.fatal: str | None = None  # why the engine stopped for good (restarts used up)
        self.on_fatal: Callable[[], None] | None = None  # e.g. tell the web server to exit
        self.restarts: deque[float] = deque()  # when the watchdog restarted the engine thread (last minute)
        self._beat = time.monotonic()  # when the engine loop last began a round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None

    # -- the engine thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.calibrate()
        self._launch()
        self._watchdog = threading.Thread(target=self._watch, name="elasticlm-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for t in (self._thread, self._watchdog):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=10)

    def drain(self) -> None:
        """Stop admitting (new requests and /health get 503); what is decoding goes on."""
        with self._cv:
            self.accepting = False

    @torch.inference_mode()
    def calibrate(self, rows: tuple[int, ...] = (1, 4)) -> None:
        """Measure a few decode steps per budget and batch size, for ``auto``."""
        prompt = [self.eos if self.eos is not None else 0] * 4
        for b in self.budgets:
            for n in rows:
                batch = self.new_batch(b)
                batch.add([Request(prompt, 4) for _ in range(n)])
                batch.step()
                t0 = time.perf_counter()
                batch.step()
                self.steps.add(b, n, time.perf_counter() - t0)

    def _launch(self) -> None:
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="elasticlm-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                self._admit(block=not any(self.jobs.values()))
                for b in self.order:
                    if self.jobs[b]:
                        self._step(b)
        except BaseException:  # a bug outside the guarded steps (or an injected kill): the watchdog takes over
            log.exception("the engine thread died")

    def _watch(self) -> None:
        """Restart a dead engine thread, failing the requests it was decoding; give up after ``max_restarts``
        restarts within a minute (a fault that comes back at once would otherwise spin)."""
        while not self._stop.wait(0.1):
            thread = self._thread
            if thread is None or thread.is_alive():
                continue
            if self._stop.is_set():
                return
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > 60:
                self.restarts.popleft()
            restart = len(self.restarts) < self.max_restarts
            what = "was restarted; retry the request" if restart else "stopped serving (see /health)"
            why = (f"the engine thread died {len(self.restarts) + 1} times within a minute; the server stopped "
                   "serving (see its log for the tracebacks) and must be restarted")
            if not restart:  # recorded before anyone hears of the failure, so /health already says why
                with self._cv:
                    self.fatal = why
            for b in self.order:  # the thread is gone: its batches are ours now
                jobs, self.jobs[b] = self.jobs[b], []
                self.batches[b] = self.new_batch(b)
                self._fail(jobs, 500, f"the engine failed while decoding this request (budget {b}) and {what}")
            if not restart:
                self._give_up(why)
                return
            self.restarts.append(now)
            self.metrics.restarted()
            log.error("restarting the engine thread (%d restart(s) in the last minute)", len(self.restarts))
            self._launch()

    def _give_up(self, why: str) -> None:
        with self._cv:
            self.fatal = why
            waiting, self._waiting = list(self._waiting), deque()
        self._fail(waiting, 503, why)
        log.error(why)
        if self.on_fatal is not None:
            self.on_fatal()

    def _take(self, block: bool) -> dict[str, list[Job]]:
        """The waiting jobs that fit their budget's batch now, in arrival order (the rest keep their place)."""
        with self._cv:
            if block and not self._waiting:
                self._cv.wait(timeout=0.05)
            room = {b: self.max_batch - len(j) for b, j in self.jobs.items()}
            new: dict[str, list[Job]] = {}
            keep: deque[Job] = deque()
            for job in self._waiting:
                if job.cancelled:  # left (or timed out) while queued
                    self.metrics.cancel(job.budget)
                elif room[job.budget] > 0:
                    room[job.budget] -= 1
                    new.setdefault(job.budget, []).append(job)
                else:
                    keep.append(job)
            self._waiting = keep
        return new

    def _admit(self, block: bool) -> None:
        for b, jobs in self._take(block).items():
            batch = self.batches[b]
            had_rows = len(batch) > 0
            try:
                batch.add([j.request for j in jobs])
            except Exception as exc:  # these prompts could not be prefilled: fail them, keep serving the others
                status = 400 if isinstance(exc, (ElasticLMError, ValueError)) else 500
                if status == 500:
                    log.exception("admitting %d request(s) at budget %s failed", len(jobs), b)
                self._fail(jobs, status, f"the prompt could not be prefilled at budget {b}: "
                                         f"{type(exc).__name__}: {exc}")
                if had_rows:  # the failure may have come mid-merge: the running rows get a fresh batch
                    self._rebuild(b)
                continue
            self.jobs[b].extend(jobs)
            for j in jobs:  # max_tokens 0: finished at admission
                if j.request.finished:
                    self._send(j, ("done", j.request.finished))
            self.jobs[b] = [j for j in self.jobs[b] if not j.request.finished]

    def _rebuild(self, b: str) -> None:
        """Budget ``b``'s running requests in a fresh batch: each prompt and the tokens generated so far prefilled
        again (the old batch's cache may be half-updated). Their outputs stay correct continuations, though no
        longer bit-exact with decoding alone (a prefill is not bitwise a sequence of steps)."""
        jobs = [j for j in self.jobs[b] if not j.cancelled and not j.request.finished]
        self.jobs[b], self.batches[b] = [], self.new_batch(b)
        if not jobs:
            return
        requests = [j.request for j in jobs]
        prompts = [r.prompt for r in requests]
        try:
            for r in requests:  # prefill prompt + tokens; step() counts max_new_tokens on r.tokens, as before
                r.prompt = r.prompt + r.tokens
            self.batches[b].add(requests)
        except Exception as exc:
            log.exception("rebuilding budget %s's batch failed", b)
            self.batches[b] = self.new_batch(b)
            self._fail(jobs, 500, f"decoding failed at budget {b}: {type(exc).__name__}: {exc}; retry the request")
            return
        finally:
            for r, p in zip(requests, prompts, strict=True):
                r.prompt = p
        self.jobs[b] = jobs

    def _step(self, b: str) -> None:
        try:
            self._step_unguarded(b)
        except Exception as exc:  # the forward is shared, so every row of the batch is affected
            log.exception("decoding budget %s failed", b)
            jobs, self.jobs[b] = self.jobs[b], []
            self.batches[b] = self.new_batch(b)  # its cache may be half-advanced
            self._fail(jobs, 500, f"decoding failed at budget {b}: {type(exc).__name__}: {exc}; the request was "
                                  "dropped and the server goes on; retry it")

    def _step_unguarded(self, b: str) -> None:
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
            self._send(job, ("token", tok))
            if req.finished:
                self._send(job, ("done", req.finished))
                self.metrics.finished(b, len(req.tokens), now - job.submitted)
        self.jobs[b] = [j for j in jobs if not j.request.finished]

    def _send(self, job: Job, item: tuple[str, Any]) -> None:
        try:
            job.sink(item)
        except Exception:  # its event loop is gone (server stopping): nobody waits for this request any more
            job.cancelled = True

    def _fail(self, jobs: list[Job], status: int, message: str) -> None:
        for j in jobs:  # counted in the metrics where the web layer answers them
            self._send(j, ("error", (status, message)))

    # -- called from the web layer ------------------------------------------------------------------------
    def health(self) -> tuple[int, str]:
        """(200, "ok") while requests are being served, else (503, why)."""
        if self.fatal:
            return 503, self.fatal
        if not self.accepting:
            return 503, "shutting down: new requests are refused"
        if self._thread is None or not self._thread.is_alive():
            return 503, "the engine thread is not running (being restarted)"
        busy = time.monotonic() - self._beat
        if busy > self.stall_seconds:
            return 503, f"the engine has been in one round of decoding steps for {busy:.0f} s"
        return 200, "ok"

    def new_batch(self, budget: str) -> DecodeBatch:
        """An empty decoding batch of ``budget``, its weight slices kept by the deployment across batches."""
        return DecodeBatch(self.model, self.budgets[budget], self.deployment.memo)

    def resolve(self, model: str) -> str:
        """The budget label a request's ``model`` names: ``NAME@0.5``, ``0.5``, ``NAME@auto`` or ``NAME``
        (the full model)."""
        label = model.split("@", 1)[1] if "@" in model else (model if model in self.budgets or model == AUTO
                                                            else None)
        if "@" in model and model.split("@", 1)[0] != self.name:
            raise RequestError(404, f"unknown model {_short(model)}; GET /v1/models lists them", "model")
        if label is None:
            if model != self.name:
                raise RequestError(404, f"unknown model {_short(model)}; GET /v1/models lists them", "model")
            return self.order[-1]
        if label == AUTO:
            return self.auto()
        try:  # the lookup every verb uses: a label, or the same target written another way ("50%", "780K")
            return self.deployment.trained(label)
        except ConfigError:
            raise RequestError(404, f"unknown budget {_short(label)}; this checkpoint serves "
                                    f"{', '.join(self.order)} and auto", "model") from None

    def auto(self) -> str:
        """The largest budget whose predicted time per token, joining its current batch, meets the target.
        Budgets take turns, one step each, so a token of budget b costs a step of every budget with rows."""
        rows = self.active()
        for b in reversed(self.order):
            per_token = sum(self.steps.predict(c, rows[c] + (c == b)) for c in self.order if rows[c] or c == b)
            if per_token <= self.target:
                return b
        return self.order[0]

    def submit(self, budget: str, request: Request, sink: Any, continuation: bool = False) -> Job:
        """Queue a request; 503 when the engine is gone or draining, 429 when ``max_queue`` requests already wait.
        ``continuation``: the second phase of a request already admitted (think → answer), never refused for
        load."""
        job = Job(budget, request, sink)
        with self._cv:
            if self.fatal:
                raise RequestError(503, self.fatal)
            if not continuation and not self.accepting:
                raise RequestError(503, "the server is shutting down; retry on another replica",
                                   headers={"Retry-After": "5"})
            if not continuation and len(self._waiting) >= self.max_queue:
                raise RequestError(429, f"the server is busy: {len(self._waiting)} requests already wait for a "
                                        "decoding slot (--max-queue); retry in a moment",
                                   headers={"Retry-After": "1"})
            self._waiting.append(job)
            self._cv.notify()
        self.metrics.submitted(budget)
        return job

    def queue_depth(self) -> int:
        return len(self._waiting)

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
        self.by_status: dict[int, int] = {}
        self.restarts = 0

    def bad_request(self) -> None:
        with self.lock:
            self.errors += 1

    def failed(self, status: int) -> None:
        with self.lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def restarted(self) -> None:
        with self.lock:
            self.restarts += 1

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

    def text(self, queue_depth: int, active: dict[str, int], up: bool = True) -> str:
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
            out += ["# HELP elasticlm_cancelled_total Requests abandoned mid-generation (client gone, stop string, "
                    "deadline)", "# TYPE elasticlm_cancelled_total counter"]
            out += [f'elasticlm_cancelled_total{{budget="{b}"}} {v}' for b, v in self.cancelled.items()]
            out += ["# HELP elasticlm_bad_requests_total Requests refused with a 4xx",
                    "# TYPE elasticlm_bad_requests_total counter", f"elasticlm_bad_requests_total {self.errors}"]
            out += ["# HELP elasticlm_errors_total Requests answered with an error, per HTTP status",
                    "# TYPE elasticlm_errors_total counter"]
            out += [f'elasticlm_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.by_status.items())]
            out += ["# HELP elasticlm_engine_restarts_total Times the watchdog restarted a dead engine thread",
                    "# TYPE elasticlm_engine_restarts_total counter",
                    f"elasticlm_engine_restarts_total {self.restarts}"]
        out += ["# HELP elasticlm_up 1 while requests are being served (as /health)", "# TYPE elasticlm_up gauge",
                f"elasticlm_up {int(up)}",
                "# HELP elasticlm_queue_depth Requests waiting to join a batch", "# TYPE elasticlm_queue_depth gauge",
                f"elasticlm_queue_depth {queue_depth}",
                "# HELP elasticlm_active_rows Sequences decoding, per budget", "# TYPE elasticlm_active_rows gauge"]
        out += [f'elasticlm_active_rows{{budget="{b}"}} {n}' for b, n in active.items()]
        return "\n".join(out) + "\n"


# -- request parsing (no web framework needed: testable alone) --------------------------------------------------

MAX_STOP_CHARS = 256  # per stop string: the stream holds back up to this much text that might begin one


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    # ints of any size compare exactly with the bounds (float(10**400) would raise); floats must be finite
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or (math.isfinite(value) and (not integer or value.is_integer())))
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {kind} in [{low:g}, {high:g}], got {_short(value)}", key)
    return int(value) if integer else float(value)


def _encode(tokenizer: Any, text: str, max_chars: int | None, param: str) -> list[int]:
    """Token ids of a prompt text, refused unread when it is too long to fit the context whatever its tokens."""
    if max_chars is not None and len(text) > max_chars:
        raise RequestError(400, f"the prompt ({len(text)} characters) cannot fit the context (--max-context); "
                                "shorten it", param)
    try:
        return tokenizer.encode(text).ids
    except Exception as exc:  # e.g. lone surrogates, which JSON allows and the tokenizer refuses
        raise RequestError(400, f"the prompt could not be tokenised ({type(exc).__name__}: "
                                f"{_short(str(exc))})", param) from None


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
        except ImportError:
            log.warning("the tokenizer has a chat template but jinja2 is not installed: using the plain format")
        else:
            try:
                return ImmutableSandboxedEnvironment().from_string(template).render(messages=messages,
                                                                                     add_generation_prompt=True)
            except Exception as exc:  # templates raise on e.g. roles that do not alternate
                raise RequestError(400, f"the chat template refused these messages: {_short(str(exc), 200)}",
                                   "messages") from None
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


def parse_completion(body: Any, tokenizer: Any, max_context: int, chat: bool, tokenizer_dir: Path | None = None,
                     max_prompt_chars: int | None = None) -> Completion:
    """Validate a request body. ``max_prompt_chars``: longer prompt texts are refused before tokenising."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required (GET /v1/models lists them)", "model")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n = 1 is supported", "n")
    if chat:
        ids = _encode(tokenizer, chat_prompt(body.get("messages"), tokenizer_dir), max_prompt_chars, "messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = _encode(tokenizer, prompt, max_prompt_chars, "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError(400, "'prompt' must be a non-empty string or a list of token ids "
                                    "(one prompt per request)", "prompt")
    if not ids:
        raise RequestError(400, "the prompt is empty after tokenization", "prompt")
    if len(ids) > max_context:  # before looking at every id of a long list
        raise RequestError(400, f"the prompt ({len(ids)} tokens) exceeds the context limit of {max_context} "
                                "tokens (--max-context)", "messages" if chat else "prompt")
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
    if not isinstance(stop, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop) \
            or len(stop) > 4:
        raise RequestError(400, f"'stop' must be a string or a list of up to 4 non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(400, "'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    think = body.get("think_budget")
    if think is not None and (not isinstance(think, (str, int, float)) or isinstance(think, bool)):
        raise RequestError(400, "'think_budget' must be a budget label such as \"0.5\"", "think_budget")
    think_stop = body.get("think_stop", "\nA:")
    if not isinstance(think_stop, str) or not 0 < len(think_stop) <= MAX_STOP_CHARS:
        raise RequestError(400, f"'think_stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters",
                           "think_stop")
    return Completion(model, ids, max_tokens, _number(body, "temperature", 1.0, 0.0, 2.0),
                      _number(body, "top_p", 1.0, 1e-9, 1.0), stream, stop, seed,
                      None if think is None else str(think), think_stop)


class Detokenizer:
    """Token ids → text, incrementally: each token decodes a short window of recent ids, not the whole text (the
    way vLLM and TGI do), so a long completion costs constant work per token.

    The window begins one emitted piece back (``prefix``), so a tokenizer that decodes the first token of a text
    differently (SentencePiece drops its leading space) sees the new tokens mid-text, as in the full decode. A
    trailing U+FFFD (the bytes of an incomplete UTF-8 character) is held back until the character completes; the
    window then moves on. The pieces join to ``tokenizer.decode(all ids)`` for byte-level tokenizers; only a run
    of more than ``WINDOW`` tokens that never ends on a complete character is emitted as it decodes so far."""

    WINDOW = 32

    def __init__(self, tokenizer: Any) -> None:
        self.decode = tokenizer.decode
        self.ids: list[int] = []
        self.prefix = 0  # the window: ids[prefix:]; ids[prefix:read] were emitted already (context only)
        self.read = 0
        self.sent = 0  # characters of the window's text emitted so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids[self.prefix:])
        held = text.endswith("\ufffd") and len(self.ids) - self.prefix <= self.WINDOW
        end = len(text) - 1 if held else len(text)
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        if not held:  # a clean boundary: the window can start at the previous one
            self.prefix, self.read = self.read, len(self.ids)
            self.sent = len(self.decode(self.ids[self.prefix:])) if self.prefix < self.read else 0
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids[self.prefix:])
        piece, self.sent = text[self.sent:], len(text)
        return piece


class TextStream:
    """Token ids → text pieces (:class:`Detokenizer`), holding back anything that could still turn into a stop
    string and cutting the text at the first one, also when it spans pieces."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.text, self.stop = Detokenizer(tokenizer), stop
        self.held = ""  # decoded, not yet emitted: it might be the beginning of a stop string
        self.stopped = False

    def push(self, token: int) -> str:
        return self._emit(self.text.push(token))

    def flush(self) -> str:
        if self.stopped:
            return ""
        piece = self._emit(self.text.flush())
        rest, self.held = self.held, ""
        return piece if self.stopped else piece + rest

    def _emit(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self.held + piece
        hits = [at for at in (buf.find(s) for s in self.stop) if at >= 0]
        if hits:  # the earliest stop string ends the text
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0  # the longest end of buf that begins some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]


# -- the web layer ------------------------------------------------------------------------------------------------


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise RequestError(400, f"the number {_short(text)} is out of range")
    return value


def _no_constant(text: str) -> Any:
    # Python's json module accepts NaN and Infinity, which JSON does not: refuse them here, once for every field
    raise RequestError(400, f"{text} is not a valid JSON value; send finite numbers")


def build_app(engine: Engine, tokenizer_dir: Path | None = None, *, api_key: str | None = None,
              max_body_bytes: int = 2 << 20, request_timeout: float = 600.0) -> Any:
    """The FastAPI application over ``engine``. ``api_key``: required as ``Authorization: Bearer <key>`` on every
    ``/v1`` route (``/health`` and ``/metrics`` stay open). ``max_body_bytes``: larger bodies get 413 unparsed.
    ``request_timeout``: seconds from arrival to the last token (0: no deadline); later, the request is
    cancelled and answered 504."""
    try:
        from fastapi import APIRouter, Depends, FastAPI
        from fastapi import Request as HTTPRequest
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    except ImportError:
        raise ConfigError("`elasticlm serve` needs FastAPI and uvicorn: pip install 'elasticlm[serve]'") from None

    app = FastAPI(title="elasticlm", description="every budget of one elastic checkpoint")
    key = None if api_key is None else api_key.encode()

    @app.exception_handler(RequestError)
    async def refused(request: HTTPRequest, exc: RequestError) -> Any:
        if exc.status < 500:
            engine.metrics.bad_request()
        engine.metrics.failed(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: HTTPRequest, exc: Exception) -> Any:  # a bug: the message, not a bare 500
        log.error("request failed", exc_info=exc)
        engine.metrics.failed(500)
        return JSONResponse(RequestError(500, f"internal error: {type(exc).__name__}: {_short(str(exc), 200)}")
                            .body(), status_code=500)

    def check_key(request: HTTPRequest) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise RequestError(401, "missing or wrong API key: send the server's key (--api-key or "
                                    "ELASTICLM_API_KEY) as 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    def health() -> Any:
        status, why = engine.health()
        body = {"status": "ok" if status == 200 else "unavailable", "budgets": engine.order,
                "active": engine.active(), "queued": engine.queue_depth()}
        if status != 200:
            body["reason"] = why
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    def metrics() -> Any:
        return PlainTextResponse(engine.metrics.text(engine.queue_depth(), engine.active(), engine.health()[0] == 200),
                                 media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    def models() -> dict[str, Any]:
        created = int(time.time())
        ids = [f"{engine.name}@{b}" for b in engine.order] + [f"{engine.name}@{AUTO}"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "elasticlm"}
                                           for i in ids]}

    async def body_of(request: HTTPRequest) -> Any:
        """The parsed JSON body; 413 past ``max_body_bytes`` without parsing (or keeping) any of it."""
        too_big = RequestError(413, f"the request body exceeds {max_body_bytes} bytes (--max-body-bytes); send a "
                                    "shorter prompt")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks), parse_constant=_no_constant, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nested too deep
            raise RequestError(400, "the request body is not valid JSON") from None

    async def complete(request: HTTPRequest, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout if request_timeout > 0 else None
        body = await body_of(request)
        c = parse_completion(body, engine.tokenizer, engine.max_context, chat, tokenizer_dir,
                             max_prompt_chars=engine.max_context * engine.max_token_chars)
        budget = engine.resolve(c.model)
        try:
            think = None if c.think_budget is None else engine.resolve(f"{engine.name}@{c.think_budget}")
        except RequestError as exc:
            raise RequestError(exc.status, exc.message, "think_budget") from None
        seed = c.seed if c.seed is not None else uuid.uuid4().int
        gen = torch.Generator(device=engine.device).manual_seed(seed % 2**64)  # sampling runs on the model's device
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

        def cancel() -> None:  # the engine frees the rows at its next step (or drops the job from the queue)
            job.cancelled = True
            if answer:
                answer["job"].cancelled = True

        async def next_item() -> tuple[str, Any]:
            """The engine's next message for this request, or a RequestError once the deadline passed or the
            engine stopped for good; a non-streaming client that left ends it too (a stream notices by itself)."""
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                if wait <= 0:
                    raise RequestError(504, f"the request did not finish within {request_timeout:g} s "
                                            "(--request-timeout); ask for fewer tokens or retry later")
                try:
                    return await asyncio.wait_for(items.get(), wait)
                except TimeoutError:
                    if engine.fatal:
                        raise RequestError(503, engine.fatal) from None
                    if not c.stream and await request.is_disconnected():
                        raise RequestError(499, "the client closed the connection") from None

        async def events() -> AsyncIterator[tuple[str, str | None]]:
            """(text piece, finish reason or None) until the request ends."""
            try:
                while True:
                    kind, value = await next_item()
                    if kind == "token":
                        if value == engine.eos:
                            continue
                        piece = text.push(value)
                        if text.stopped:
                            yield piece, "stop"
                            return
                        if piece:
                            yield piece, None
                    elif kind == "done" and value == "switch" and not answer:  # answer at the request's budget
                        rest = req.answer_phase()
                        answer["request"] = rest
                        answer["job"] = engine.submit(budget, rest, sink, continuation=True)
                        if rest.max_new_tokens <= 0:
                            yield text.flush(), "length"
                            return
                    elif kind == "done":
                        yield text.flush(), "stop" if value == "stop" else "length"
                        return
                    else:  # ("error", (status, message)) from the engine
                        raise RequestError(*value)
            finally:
                cancel()  # a client that left, a stop string, a deadline: the engine frees the row

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
                except RequestError as exc:  # the status line is sent: the error goes in the stream (as OpenAI's)
                    engine.metrics.failed(exc.status)
                    yield f"data: {json.dumps(exc.body())}\n\n"
                except Exception as exc:
                    log.exception("a stream failed")
                    engine.metrics.failed(500)
                    yield f"data: {json.dumps(RequestError(500, f'internal error: {type(exc).__name__}').body())}\n\n"
                finally:  # also when the client disconnects mid-stream: its row is freed at the next step
                    cancel()

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

    @v1.post("/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=True)

    app.include_router(v1)
    return app


def load_engine(checkpoint: str | Path, device: str = "cpu", **kw: Any) -> tuple[Engine, Path]:
    from .runtime import resolve_device
    from .tokenizer import load_tokenizer

    path = Path(checkpoint)
    deployment = Deployment.load(path, device=resolve_device(device), serving=True)
    tok = load_tokenizer(path)
    name = path.resolve().parent.name if path.name == "final" else path.resolve().name
    return Engine(deployment, tok, name, **kw), path


def serve_until_signalled(engine: Engine, app: Any, host: str, port: int, shutdown_timeout: float = 30.0) -> int:
    """Run the server in this (the main) thread until SIGTERM or SIGINT, or until the engine fails for good.

    On a signal: ``/health`` and new requests get 503 at once, uvicorn stops listening, requests in flight get
    ``shutdown_timeout`` seconds to finish and are then cancelled; returns 0. Returns 1 when the engine failed
    for good (its watchdog gave up), so that a supervisor restarts the process. The engine must be started."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.drain()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=shutdown_timeout))
    engine.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it caught once it has shut down, which would kill the process (SIGTERM: exit
    # 143) after a clean shutdown; these no-op handlers take it instead
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.stop()
    return 1 if engine.fatal else 0


@contextlib.contextmanager
def running(engine: Engine, tokenizer_dir: Path | None, host: str = "127.0.0.1", port: int = 0,
            **app_options: Any) -> Iterator[str]:
    """Serve in a background thread (tests, benchmarks); yields the base URL. ``app_options`` go to
    :func:`build_app` (``api_key``, ``max_body_bytes``, ``request_timeout``)."""
    import uvicorn

    engine.start()
    config = uvicorn.Config(build_app(engine, tokenizer_dir, **app_options), host=host, port=port,
                            log_level="warning", timeout_graceful_shutdown=10)
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
        engine.drain()
        server.should_exit = True
        thread.join(timeout=15)
        engine.stop()
