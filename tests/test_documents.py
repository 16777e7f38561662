"""Packed documents: a packed row with document_ids computes what each document computes alone."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import max_rel, random_subnet, randomize_, tiny_config

from elasticlm import HybridLM
from elasticlm.model import documents
from elasticlm.model.documents import document_ids_from_eos

EOS = 2


def _pack(docs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.cat([d, torch.tensor([EOS])]) for d in docs])


@pytest.fixture(params=["dense", "buckets"])
def attention_path(request, monkeypatch):
    """Run a test with the short-row dense mask and with the per-document buckets (long rows, GPUs)."""
    if request.param == "buckets":
        monkeypatch.setattr(documents, "DENSE_MASK_MAX_LEN", 0)
    return request.param


@pytest.mark.parametrize("pattern,groups", [("M-*M-M*", 2), ("MM*", 1), ("*M", 4)])
def test_packed_row_equals_separate_documents(pattern: str, groups: int, attention_path: str) -> None:
    cfg = tiny_config(pattern, groups=groups, chunk=8)
    model = randomize_(HybridLM(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    # lengths chosen so that documents start mid-chunk, on a chunk boundary and span chunks
    rows = [[torch.randint(3, 64, (n,), generator=g) for n in lens] for lens in ([5, 11, 1, 16], [7, 8, 16, 2])]
    packed = torch.stack([_pack(r) for r in rows])
    with torch.no_grad():
        out = model(packed, document_ids=document_ids_from_eos(packed, EOS))
        for b, docs in enumerate(rows):
            pos = 0
            for d in docs:
                alone = model(torch.cat([d, torch.tensor([EOS])])[None])[0]
                assert max_rel(out[b, pos:pos + len(d) + 1], alone) < 1e-5
                pos += len(d) + 1


def test_document_mask_with_a_subnet(attention_path: str) -> None:
    cfg = tiny_config("M-*M-M*", chunk=4)
    model = randomize_(HybridLM(cfg)).eval()
    subnet = random_subnet(cfg, random.Random(3), allow_drop=False)
    docs = [torch.randint(3, 64, (n,)) for n in (6, 9, 3)]
    packed = _pack(docs)[None]
    with torch.no_grad():
        out = model(packed, subnet, document_ids=document_ids_from_eos(packed, EOS))[0]
        second = model(torch.cat([docs[1], torch.tensor([EOS])])[None], subnet)[0]
    assert max_rel(out[7:17], second) < 1e-5


def test_without_document_ids_documents_do_see_each_other() -> None:
    """The mask matters: the same row without it differs after the first document."""
    model = randomize_(HybridLM(tiny_config("M*"))).eval()
    packed = _pack([torch.randint(3, 64, (n,)) for n in (6, 9)])[None]
    with torch.no_grad():
        masked = model(packed, document_ids=document_ids_from_eos(packed, EOS))
        plain = model(packed)
    assert torch.allclose(masked[:, :7], plain[:, :7], atol=1e-6)
    assert max_rel(masked[:, 7:], plain[:, 7:]) > 1e-2


def test_document_ids_from_eos() -> None:
    ids = torch.tensor([[5, 2, 2, 7, 8, 2], [2, 3, 4, 5, 6, 7]])
    assert document_ids_from_eos(ids, EOS).tolist() == [[0, 0, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1]]


def test_document_ids_are_rejected_with_a_cache_or_a_wrong_shape() -> None:
    model = HybridLM(tiny_config("M*"))
    ids = torch.randint(3, 64, (1, 5))
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.new_cache(), document_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="must match"):
        model(ids, document_ids=torch.zeros(1, 4, dtype=torch.long))
