"""Ragged batches: prompts of different lengths decoded together, rows joining and leaving a running batch —
each row must produce exactly the tokens it produces alone (attention, sliding-window attention and Mamba layers,
full model and Subnet)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_subnet, randomize_, tiny_config

from elasticlm.generate import DecodeBatch, Request, generate, generate_ragged
from elasticlm.model.hybrid import HybridLM


def alone(model, prompt, n, subnet=None):
    out = generate(model, torch.tensor([prompt]), max_new_tokens=n, subnet=subnet)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["hybrid", "sliding-window"])
def model(request):
    """A Mamba + attention hybrid, and one whose attention is partly sliding-window (window 3: its state forgets)."""
    torch.manual_seed(0)
    if request.param == "hybrid":
        config = tiny_config("M*M-*M", vocab_size=64, chunk=4)
    else:
        config = tiny_config("MW*-W", vocab_size=64, chunk=4, sections={"sliding_attention": {"window": 3}})
    return randomize_(HybridLM(config), seed=3).eval()


PROMPTS = [[5, 9, 3], list(range(1, 12)), [7], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]]


@pytest.mark.parametrize("use_subnet", [False, True])
def test_ragged_batch_equals_each_prompt_alone(model, use_subnet):
    subnet = random_subnet(model.config, random.Random(1)) if use_subnet else None
    got = generate_ragged(model, PROMPTS, max_new_tokens=10, subnet=subnet)
    want = [alone(model, p, 10, subnet) for p in PROMPTS]
    assert got == want
    # and the logits, not only the argmax: the first step's logits of every row equal the row alone
    batch = DecodeBatch(model, subnet)
    batch.add([Request(p, 5) for p in PROMPTS])
    for r, p in enumerate(PROMPTS):
        ref = model(torch.tensor([p]), subnet=subnet)[0, -1]
        assert torch.allclose(batch.logits[r], ref, rtol=1e-4, atol=1e-5)


def test_rows_join_and_leave_a_running_batch(model):
    """Continuous batching: two requests run, two more join after 3 steps, rows finish at different lengths."""
    batch = DecodeBatch(model)
    first = [Request(PROMPTS[0], 4), Request(PROMPTS[1], 12)]
    batch.add(first)
    for _ in range(3):
        batch.step()
    later = [Request(PROMPTS[2], 9), Request(PROMPTS[3], 2)]
    batch.add(later)
    while len(batch):
        batch.step()
    for req in first + later:
        assert req.tokens == alone(model, req.prompt, req.max_new_tokens) and req.finished == "length"


def test_eos_ends_a_row_and_the_others_continue(model):
    ref = alone(model, PROMPTS[1], 6)
    eos = ref[2]  # the third token the row produces becomes its end
    reqs = [Request(PROMPTS[1], 6, eos_token_id=eos), Request(PROMPTS[0], 6)]
    batch = DecodeBatch(model)
    batch.add(reqs)
    while len(batch):
        batch.step()
    assert reqs[0].tokens == ref[: ref.index(eos) + 1] and reqs[0].finished == "stop"
    assert reqs[1].tokens == alone(model, PROMPTS[0], 6)


def test_think_small_answer_big_is_the_two_phases_run_by_hand(model):
    """The think Subnet writes up to and including the switch marker; the answer Subnet continues from the
    prompt and that trace, as if it had been given them as its prompt."""
    from elasticlm.generate import generate_think_answer

    small = random_subnet(model.config, random.Random(4), allow_drop=False)
    prompt = PROMPTS[1]
    trace = alone(model, prompt, 12, small)
    switch = trace[3:5]  # a marker the small model certainly writes
    end = next(i for i in range(2, len(trace) + 1) if trace[i - 2:i] == switch)
    want = trace[:end] + alone(model, prompt + trace[:end], 12 - end)
    got = generate_think_answer(model, [prompt, PROMPTS[0]], switch_ids=switch, think=small, answer=None,
                                max_new_tokens=12)
    assert got[0] == want and want != trace  # the answer phase changed what followed
    row2 = alone(model, PROMPTS[0], 12, small)  # the other row: the same rule, whatever it writes
    hit = next((i for i in range(2, len(row2) + 1) if row2[i - 2:i] == switch), None)
    assert got[1] == (row2 if hit is None else row2[:hit] + alone(model, PROMPTS[0] + row2[:hit], 12 - hit))
