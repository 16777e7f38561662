"""Exact-match accuracy of greedy generation on the synthetic reasoning tasks.

The model gets ``Q: <prompt>\\nT:`` and must write the trace, then ``A: <answer>`` and EOS; the
first ``A:`` line of its completion is compared with the reference answer as a string.
Prompts of equal token length are decoded together in one batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..config import Subnet
from ..data import synthetic
from ..generate import generate, generate_think_answer
from ..model.hybrid import HybridLM
from ..model.slicing import SliceMemo


@torch.no_grad()
def task_accuracy(model: HybridLM, tokenizer: Any, family: str, difficulty: int | None = None, n: int = 50,
                  subnet: Subnet | None = None, seed: int = 0, max_batch: int = 64,
                  think: Subnet | None = None, memo: SliceMemo | None = None) -> float:
    """Fraction of ``n`` held-out ``family`` examples at ``difficulty`` (default: the family's
    default difficulty) whose generated answer matches exactly. ``think``: the trace is written by this
    Subnet and the answer (from the ``A:`` marker on) by ``subnet`` (think small, answer big). ``memo``: the
    deployment's kept weight slices (:class:`~elasticlm.model.slicing.SliceMemo`)."""
    difficulty = difficulty or synthetic.DIFFICULTY[family][0]
    examples = synthetic.eval_set(family, difficulty, n, seed)
    device = model.device
    eos = model.config.eos_token_id
    groups: dict[int, list[tuple[list[int], synthetic.Example]]] = defaultdict(list)
    for ex in examples:
        ids = tokenizer.encode(ex.query).ids
        groups[len(ids)].append((ids, ex))
    correct = 0
    for items in groups.values():
        for start in range(0, len(items), max_batch):
            chunk = items[start:start + max_batch]
            budget = max(len(tokenizer.encode(ex.text).ids) - len(ids_) for ids_, ex in chunk) + 8
            if think is not None:
                news = generate_think_answer(model, [ids for ids, _ in chunk], switch_ids=answer_marker(tokenizer),
                                             think=think, answer=subnet, max_new_tokens=budget, eos_token_id=eos,
                                             memo=memo)
            else:
                prompt = torch.tensor([ids for ids, _ in chunk], device=device)
                out = generate(model, prompt, max_new_tokens=budget, eos_token_id=eos, subnet=subnet, memo=memo)
                news = [row[len(ids):] for row, (ids, _) in zip(out.tolist(), chunk, strict=True)]
            for new, (_, ex) in zip(news, chunk, strict=True):
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                correct += synthetic.extract_answer(tokenizer.decode(new)) == ex.answer
    return correct / len(examples)


def answer_marker(tokenizer: Any) -> list[int]:
    """The token ids of the synthetic tasks' answer marker (a new line, then ``A:``): where thinking ends."""
    return tokenizer.encode(ANSWER_MARKER).ids


ANSWER_MARKER = "\nA:"


def task_table(model: HybridLM, tokenizer: Any, n: int = 50, hard: bool = True,
               subnet: Subnet | None = None) -> dict[str, dict[str, float]]:
    """Accuracy per family at the default (and hard) difficulty, plus their means."""
    table: dict[str, dict[str, float]] = {}
    levels = ("default", "hard") if hard else ("default",)
    for level, column in zip(levels, (0, 1), strict=False):
        row = {f: task_accuracy(model, tokenizer, f, synthetic.DIFFICULTY[f][column], n, subnet)
               for f in synthetic.FAMILIES}
        row["mean"] = sum(row.values()) / len(row)
        table[level] = row
    return table
