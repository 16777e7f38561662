"""Autoregressive generation with cached decoding (KV cache + conv/SSM state)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import Subnet
from .errors import ConfigError
from .model.hybrid import HybridLM


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[batch]`` from last-position logits ``[batch, vocab]``.

    temperature 0 is greedy; otherwise softmax(logits / T) restricted to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus sampling).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: HybridLM, input_ids: torch.Tensor, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | None = None, subnet: Subnet | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue ``input_ids`` ``[batch, prompt]`` by up to ``max_new_tokens`` tokens.

    Prefill runs the prompt once; each new token is then one recurrent step. Rows that emit
    ``eos_token_id`` keep emitting it; generation stops when every row has. Returns
    ``[batch, prompt + generated]``.
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
                          on_token)
    finally:
        model.train(was_training)
    return out.clone()  # a normal tensor again, usable later in autograd (e.g. as training data)


def _decode(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
            eos_token_id: int | None, subnet: Subnet | None, generator: torch.Generator | None,
            on_token: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    cache = model.new_cache(subnet)
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
