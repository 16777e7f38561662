"""Autoregressive generation with cached decoding (KV cache + conv/SSM state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import Subnet
from .errors import ConfigError
from .model.cache import HybridCache

if TYPE_CHECKING:
    from .model.hybrid import HybridLM
    from .model.slicing import SliceMemo

MIN_TEMPERATURE = 1e-5  # below this, sampling is decoded greedily (see sample_next)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[batch]`` from last-position logits ``[batch, vocab]``.

    temperature 0 is greedy; otherwise softmax(logits / T) restricted to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus sampling).

    Safe for every temperature > 0: a temperature below ``MIN_TEMPERATURE`` decodes greedily (it would put
    all the mass on the argmax anyway, unless two logits are within ~1e-4, and 1e-300 is 0 in float32, which
    would divide 0 by 0); above it, the logits are shifted so that their maximum is 0 before they are scaled
    (log space: nothing overflows to inf). NaN logits are never drawn; a row without one finite logit gets its
    argmax. The draw runs on the generator's device, so a CPU generator also serves a model on a GPU.
    """
    if not temperature >= MIN_TEMPERATURE:  # also NaN
        return logits.argmax(-1)
    x = torch.nan_to_num(logits.float(), nan=-torch.inf, posinf=torch.finfo(torch.float32).max, neginf=-torch.inf)
    top = x.amax(-1, keepdim=True)
    dead = ~torch.isfinite(top)  # [batch, 1]: every logit -inf or NaN, nothing to draw from
    x = torch.where(dead, 0.0, (x - torch.where(dead, 0.0, top)) / temperature)
    probs = torch.softmax(x, dim=-1)  # the top token has exp(0) = 1: the sum is >= 1, never 0 / 0
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    else:
        drawn = torch.multinomial(probs, 1, generator=generator)
    return torch.where(dead, logits.argmax(-1, keepdim=True), drawn).squeeze(-1)


def generate(model: HybridLM, input_ids: torch.Tensor, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | None = None, subnet: Subnet | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, memo: SliceMemo | None = None) -> torch.Tensor:
    """Continue ``input_ids`` ``[batch, prompt]`` by up to ``max_new_tokens`` tokens.

    Prefill runs the prompt once; each new token is then one recurrent step. Rows that emit
    ``eos_token_id`` keep emitting it; generation stops when every row has. Returns
    ``[batch, prompt + generated]``. ``memo`` keeps the sub-model's weight slices for later generations
    (:class:`~elasticlm.elastic.deployment.Deployment` passes its own).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise ConfigError("generate needs a non-empty prompt")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # ~10 % faster decoding than no_grad on CPU
            out = _decode(model, input_ids, max_new_tokens, temperature, top_p, eos_token_id, subnet, generator,
                          on_token, memo)
    finally:
        model.train(was_training)
    return out.clone()  # a normal tensor again, usable later in autograd (e.g. as training data)


def _decode(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
            eos_token_id: int | None, subnet: Subnet | None, generator: torch.Generator | None,
            on_token: Callable[[torch.Tensor], None] | None, memo: SliceMemo | None) -> torch.Tensor:
    cache = model.new_cache(subnet, memo)
    logits = model(input_ids, subnet=subnet, cache=cache, logits_to_keep=1)[:, -1]
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if eos_token_id is not None and bool(done.all()):
            break
        logits = model(nxt[:, None], subnet=subnet, cache=cache)[:, -1]
    return torch.cat(out, dim=1)


# -- ragged batches: prompts of different lengths, rows that join and leave ------------------------------------


@dataclass
class Request:
    """One sequence of a :class:`DecodeBatch`: its prompt, how to sample it and where it stands."""

    prompt: list[int]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: int | None = None
    generator: torch.Generator | None = None
    stop_ids: list[int] | None = None  # also finish ("switch") once the generated tokens end with these
    tokens: list[int] = field(default_factory=list)  # generated so far
    finished: str | None = None  # "stop" (EOS), "length" or "switch" (stop_ids)

    def answer_phase(self) -> Request:
        """Think-then-answer's second request, once this one finished with "switch": the prompt and the trace
        prefilled again (at the answering budget), the rest of the token allowance, the same sampling."""
        return Request(self.prompt + self.tokens, self.max_new_tokens - len(self.tokens), self.temperature,
                       self.top_p, self.eos_token_id, self.generator)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, longest]`` ids, each prompt right-aligned, and the padding length of each row.

    >>> ids, pad = left_pad([[5, 6, 7], [8]]); ids.tolist(), pad.tolist()
    ([[5, 6, 7], [0, 0, 8]], [0, 2])
    """
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)


class DecodeBatch:
    """Sequences of one Subnet decoded together, one token per row per :meth:`step`. New requests join between
    steps (their prompts are prefilled as one left-padded batch and their cache merged into the running one);
    finished rows leave. Padding is never read (see :class:`~elasticlm.model.cache.HybridCache`), so every row
    produces exactly the tokens it would produce alone."""

    def __init__(self, model: HybridLM, subnet: Subnet | None = None, memo: SliceMemo | None = None) -> None:
        self.model, self.subnet, self.memo = model, model.check_subnet(subnet), memo
        self.rows: list[Request] = []
        self.cache: HybridCache | None = None
        self.logits: torch.Tensor | None = None  # [rows, vocab]: the next token's logits of every row

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> None:
        for req in requests:
            if not req.prompt:
                raise ConfigError("generate needs a non-empty prompt")
            if req.max_new_tokens < 0:
                raise ConfigError(f"max_new_tokens must be >= 0, got {req.max_new_tokens}")
        device = self.model.device
        ids, pad = left_pad([r.prompt for r in requests])
        cache = self.model.new_cache(self.subnet, self.memo)
        cache.pad = pad.to(device) if bool(pad.any()) else None
        logits = self.model(ids.to(device), subnet=self.subnet, cache=cache, logits_to_keep=1)[:, -1]
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            self.cache.merge(cache)
            self.cache.drop_shared_padding()  # the merge may have padded every older row
            self.logits = torch.cat([self.logits, logits])
        self.rows.extend(requests)
        self.drop([r for r in requests if r.max_new_tokens == 0], "length")

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Sample one token for every row, advance the model, drop finished rows; returns (request, token) pairs
        (a row's last pair is the one where ``request.finished`` is set)."""
        if not self.rows:
            return []
        assert self.logits is not None and self.cache is not None
        nxt = sample_rows(self.logits, self.rows)
        out = []
        done = []
        for req, tok in zip(self.rows, nxt.tolist(), strict=True):
            req.tokens.append(tok)
            if req.eos_token_id is not None and tok == req.eos_token_id:
                req.finished = "stop"
            elif req.stop_ids and req.tokens[-len(req.stop_ids):] == req.stop_ids:
                req.finished = "switch"
            elif len(req.tokens) >= req.max_new_tokens:
                req.finished = "length"
            out.append((req, tok))
            if req.finished:
                done.append(req)
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) < len(self.rows):
            self._keep(keep)
            nxt = nxt[keep]
        if self.rows:
            self.logits = self.model(nxt[:, None], subnet=self.subnet, cache=self.cache)[:, -1]
        return out

    def drop(self, requests: list[Request], reason: str) -> None:
        """End ``requests`` now (e.g. their client left) and free their rows."""
        for r in requests:
            r.finished = reason
        if requests:
            self._keep([i for i, r in enumerate(self.rows) if not r.finished])

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.logits = None, None
            return
        index = torch.tensor(keep, device=self.logits.device)
        self.cache.reorder(index)
        self.cache.drop_shared_padding()  # a row left: the others may share more padding now
        self.logits = self.logits[index]


def sample_rows(logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
    """The next token of each row under its own temperature, top-p and generator (greedy rows in one argmax).
    A row draws from its own generator only, one draw per step, so a seeded row samples the same tokens whatever
    the other rows of the batch are."""
    out = logits.argmax(-1)
    for i, r in enumerate(rows):
        if r.temperature > 0:
            out[i] = sample_next(logits[i:i + 1], r.temperature, r.top_p, r.generator)[0]
    return out


def generate_ragged(model: HybridLM, prompts: list[list[int]], *, max_new_tokens: int = 32,
                    eos_token_id: int | None = None, subnet: Subnet | None = None,
                    memo: SliceMemo | None = None) -> list[list[int]]:
    """Greedy continuations of prompts of different lengths, decoded as one batch (each row exactly as alone).
    Generation stops at ``eos_token_id`` (included) or ``max_new_tokens``."""
    was = model.training
    model.eval()
    try:
        batch = DecodeBatch(model, subnet, memo)
        requests = [Request(list(p), max_new_tokens, eos_token_id=eos_token_id) for p in prompts]
        batch.add(requests)
        while len(batch):
            batch.step()
    finally:
        model.train(was)
    return [r.tokens for r in requests]


def generate_think_answer(model: HybridLM, prompts: list[list[int]], *, switch_ids: list[int],
                          think: Subnet | None, answer: Subnet | None, max_new_tokens: int = 64,
                          eos_token_id: int | None = None, memo: SliceMemo | None = None) -> list[list[int]]:
    """Think small, answer big: greedy decoding at the ``think`` Subnet until a row's generated tokens end with
    ``switch_ids`` (e.g. the tokens of ``"\\nA:"``, the answer marker of the synthetic tasks), then the prompt
    and that trace are prefilled again at the ``answer`` Subnet, which writes the rest. Rows that end (EOS or
    ``max_new_tokens``) before the marker keep what the thinking budget wrote. Returns the generated tokens of
    each prompt (both phases)."""
    if not switch_ids:
        raise ConfigError("think-then-answer needs a non-empty switch marker")
    was = model.training
    model.eval()
    try:
        first = [Request(list(p), max_new_tokens, eos_token_id=eos_token_id, stop_ids=list(switch_ids))
                 for p in prompts]
        batch = DecodeBatch(model, think, memo)
        batch.add(first)
        while len(batch):
            batch.step()
        second = [r.answer_phase() for r in first if r.finished == "switch" and len(r.tokens) < max_new_tokens]
        if second:
            batch = DecodeBatch(model, answer, memo)
            batch.add(second)
            while len(batch):
                batch.step()
        rest = iter(second)
        return [r.tokens + (next(rest).tokens if r.finished == "switch" and len(r.tokens) < max_new_tokens else [])
                for r in first]
    finally:
        model.train(was)
