"""Sampling and stopping rules of generate()."""

from __future__ import annotations

import torch
from conftest import randomize_, tiny_config

from elasticlm import HybridLM, generate
from elasticlm.generate import sample_next


def model():
    return randomize_(HybridLM(tiny_config("M-*M")), seed=3).eval()


def test_greedy_equals_argmax_of_full_recomputation():
    m = model()
    ids = torch.randint(0, 64, (2, 4))
    out = generate(m, ids, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_stops_at_eos_and_pads_finished_rows():
    m = model()
    ids = torch.randint(0, 64, (1, 3))
    free = generate(m, ids, max_new_tokens=8)
    eos = free[0, 5].item()  # the 3rd generated token becomes "EOS"
    out = generate(m, ids, max_new_tokens=8, eos_token_id=eos)
    first = (out[0, 3:] == eos).nonzero()[0].item()
    assert out.shape[1] == 3 + first + 1 and out[0, -1].item() == eos


def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.5, gen).item() for _ in range(50)}
    assert draws == {0}  # token 0 alone holds > 50 % of the mass
    draws = {sample_next(logits, 1.0, 0.9, gen).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample_next(logits, 0.0).item() == 0


def test_sampling_is_reproducible_by_seed():
    m = model()
    ids = torch.randint(0, 64, (1, 3))
    a = generate(m, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(m, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_generated_ids_can_feed_training():
    m = model()
    out = generate(m, torch.randint(0, 64, (1, 3)), max_new_tokens=3)
    m.train()
    m(out).sum().backward()  # inference-mode tensors would refuse this
    assert m.embeddings.weight.grad is not None
