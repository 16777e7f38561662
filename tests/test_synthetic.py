"""The synthetic reasoning tasks, checked by independent evaluators (Python's own arithmetic)."""

from __future__ import annotations

import re
import statistics

import pytest

from elasticlm.data import synthetic


def independent_answer(ex: synthetic.Example) -> str:
    """Recompute the answer from the prompt alone, without the generator's code."""
    if ex.family == "add":
        a, b = ex.prompt.split("+")
        return str(int(a) + int(b))
    if ex.family == "vars":
        *stmts, query = ex.prompt.split(";")
        env: dict[str, int] = {}
        for s in stmts:
            name, expr = s.split("=")
            env[name] = eval(expr, {}, dict(env))  # noqa: S307 - our own tiny expressions
        return str(env[query.rstrip("?")])
    if ex.family == "recall":
        pairs, queries = ex.prompt.split("; ")
        table = dict(p.split("=") for p in pairs.split())
        return " ".join(table[q.rstrip("?")] for q in queries.split())
    if ex.family == "sort":
        return " ".join(map(str, sorted(int(x) for x in ex.prompt.split()[1:])))
    raise AssertionError(ex.family)


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_answers_match_an_independent_evaluator(family):
    for level in (0, 1):
        d = synthetic.DIFFICULTY[family][level]
        for ex in synthetic.eval_set(family, d, 30, seed=3):
            assert ex.answer == independent_answer(ex), ex
    for i in range(200):
        ex = synthetic.example_at(7, i)
        assert ex.answer == independent_answer(ex), ex


def test_addition_scratchpad_is_consistent():
    for ex in synthetic.eval_set("add", 5, 20):
        carry = 0
        for step in ex.trace.split():
            x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", step).groups())
            assert c == carry and s == x + y + c
            carry = s // 10


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_difficulty_lengthens_the_reasoning(family):
    lengths = [statistics.mean(len(e.trace) for e in synthetic.eval_set(family, d, 30)) for d in range(1, 11)]
    assert all(a <= b for a, b in zip(lengths, lengths[1:], strict=False)), lengths
    default, hard = synthetic.DIFFICULTY[family]
    assert lengths[default - 1] < lengths[hard - 1] and lengths[0] < lengths[-1]


def test_streams_are_deterministic_and_never_yield_held_out_prompts():
    a = [synthetic.example_at(1, i) for i in range(300)]
    assert a == [synthetic.example_at(1, i) for i in range(300)]
    assert a != [synthetic.example_at(2, i) for i in range(300)]
    assert not any(synthetic.is_held_out(e.prompt) for e in a)
    assert all(synthetic.is_held_out(e.prompt) for e in synthetic.eval_set("vars", 3, 20))
    assert {e.family for e in a} == set(synthetic.FAMILIES)
    it = synthetic.blend(1, start=250)
    assert [next(it) for _ in range(50)] == a[250:]


def test_extract_answer():
    assert synthetic.extract_answer(" 1+2+0=3\nA: 3") == "3"
    assert synthetic.extract_answer(" x\nA:  12 07 \nQ: more") == "12 07"
    assert synthetic.extract_answer("no answer here") is None
