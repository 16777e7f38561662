"""Memory-linear paths (long contexts): per-document attention, activation checkpointing, the KD loss
over token chunks, last-position prefill logits — each equal to the plain computation."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel, random_subnet, randomize_, tiny_config

from elasticlm import HybridLM
from elasticlm.elastic.router import Router
from elasticlm.elastic.space import ElasticConfig, ElasticSpace
from elasticlm.model import documents
from elasticlm.model.documents import document_attention, document_ids_from_eos
from elasticlm.train.elastic import ElasticStudent, kd_loss, kd_loss_from_hidden, teacher_hidden

EOS = 2


def _starts_lengths(lengths: list[list[int]]) -> tuple[list[int], list[int]]:
    flat = [n for row in lengths for n in row]
    starts = [sum(flat[:i]) for i in range(len(flat))]
    return starts, flat


def _dense_reference(q, k, v, doc_ids, scale):
    """SDPA with the dense [b, 1, t, t] same-document causal mask, as the model did before."""
    t = q.shape[2]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = (same & torch.ones(t, t, dtype=torch.bool).tril())[:, None]
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=scale)


@pytest.mark.parametrize("lengths", [[[5, 11, 1, 16], [7, 8, 16, 2]], [[33], [1] * 33], [[2, 31], [20, 13]]])
def test_document_attention_equals_the_dense_mask(lengths):
    g = torch.Generator().manual_seed(0)
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    b, t = doc_ids.shape
    q = torch.randn(b, 4, t, 8, generator=g, requires_grad=True)
    k = torch.randn(b, 2, t, 8, generator=g, requires_grad=True)
    v = torch.randn(b, 2, t, 8, generator=g, requires_grad=True)
    buckets = documents.document_buckets(*_starts_lengths(lengths), "cpu")
    ours = document_attention(q, k, v, buckets, 8**-0.5)
    ref = _dense_reference(q, k, v, doc_ids, 8**-0.5)
    assert max_rel(ours, ref) < 1e-5
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, r in zip(grads, ref_grads, strict=True):
        assert max_rel(a, r) < 1e-5


def test_buckets_cover_every_token_once_with_bounded_padding():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(60)]
    buckets = documents.document_buckets(*_starts_lengths([lengths]), "cpu")
    flat = torch.cat([bk.scatter for bk in buckets]).sort().values
    assert torch.equal(flat, torch.arange(sum(lengths)))
    padded = sum(bk.gather.numel() for bk in buckets)
    assert padded <= 2 * sum(lengths)
    assert len(buckets) <= 12  # a handful of kernel calls, not one per document


def _model(pattern="M-*M-M*"):
    return randomize_(HybridLM(tiny_config(pattern, chunk=8)))


@pytest.mark.parametrize("dense_max", [0, 4096])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(rng, monkeypatch, dense_max):
    monkeypatch.setattr(documents, "DENSE_MASK_MAX_LEN", dense_max)
    model = _model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 40), generator=g)
    ids[0, 9] = ids[1, 17] = ids[1, 30] = EOS
    doc = document_ids_from_eos(ids, EOS)
    subnet = random_subnet(model.config, rng)
    results = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        for sn in (None, subnet):
            loss = model(ids, sn, document_ids=doc).float().logsumexp(-1).mean()
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        assert max_rel(g1[name], g0[name]) < 1e-5, name


def test_kd_loss_over_chunks_equals_the_whole_logits():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(2, 13, 16, generator=g, requires_grad=True)
    w_s = torch.randn(50, 16, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(2, 13, 16, generator=g), torch.randn(50, 16, generator=g)
    keep = (torch.rand(2, 13, generator=g) > 0.3).float()
    for tau in (1.0, 2.0):
        whole = kd_loss(F.linear(h_s, w_s), F.linear(h_t, w_t), keep, tau)
        chunked = kd_loss_from_hidden(h_s, w_s, h_t, w_t, keep, tau, chunk=4)
        assert max_rel(chunked, whole) < 1e-6
        ga = torch.autograd.grad(whole, (h_s, w_s))
        gb = torch.autograd.grad(chunked, (h_s, w_s))
        for a, b in zip(ga, gb, strict=True):
            assert max_rel(b, a) < 1e-5


def test_student_loss_from_teacher_hidden_equals_teacher_logits():
    cfg = tiny_config("M-*M-", chunk=8)
    cfg.depth_order = [1, 3, 0, 2, 4]
    teacher = randomize_(HybridLM(cfg), seed=2).requires_grad_(False)
    student = ElasticStudent(randomize_(HybridLM(cfg)), Router(ElasticSpace.build(cfg, ElasticConfig()), hidden=16))
    ids = torch.randint(3, 64, (4, 25))
    ids[1, 7] = EOS
    inputs, targets, keep = ids[:, :-1], ids[:, 1:], torch.ones(4, 24)
    doc = document_ids_from_eos(inputs, EOS)
    out = []
    with torch.no_grad():
        forms = (teacher(inputs, document_ids=doc), teacher_hidden(teacher, inputs, doc))
    for t in forms:
        student.zero_grad()
        loss, _ = student(inputs, doc, keep, t, targets, [0, 1, 2, 1], step=0, seed=0, scale=1.0, temperature=1.0,
                          kd_temperature=1.0, ce_weight=0.0, budget_weight=0.0, amp=None)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in student.model.parameters() if p.grad is not None]))
    assert max_rel(out[1][0], out[0][0]) < 1e-6
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert max_rel(b, a) < 1e-5


def test_prefill_keeps_only_the_last_logits(rng):
    model = _model().eval()
    ids = torch.randint(3, 64, (2, 21))
    subnet = random_subnet(model.config, rng)
    with torch.no_grad():
        full = model(ids, subnet)
        last = model(ids, subnet, logits_to_keep=1)
        cached = model(ids, subnet, cache=model.new_cache(subnet), logits_to_keep=1)
    assert last.shape == (2, 1, 64)
    assert max_rel(last, full[:, -1:]) < 1e-6 and max_rel(cached, full[:, -1:]) < 1e-5


def test_tensor_file_reads_rows_like_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from elasticlm.train.sharded import TensorFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 3, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(4, 2, 5, generator=g), "s": torch.tensor(3.5)}
    save_file(tensors, tmp_path / "w.safetensors")
    ref = load_file(tmp_path / "w.safetensors")
    f = TensorFile(tmp_path / "w.safetensors")
    try:
        cases = [("a", 3, 6, torch.float32), ("a", 9, 10, torch.float32), ("b", 0, 7, torch.bfloat16),
                 ("b", 2, 5, torch.float32), ("c", 1, 3, torch.float64)]
        for key, start, stop, dtype in cases:
            out = torch.empty((stop - start, *ref[key].shape[1:]), dtype=dtype)
            f.read_rows_into(key, start, out)
            assert torch.equal(out, ref[key][start:stop].to(dtype)), key
        scalar = torch.empty(())
        f.read_rows_into("s", 0, scalar)
        assert scalar.item() == 3.5
    finally:
        f.close()


def test_ce_loss_over_chunks_equals_the_whole_logits():
    from elasticlm.train.losses import ce_loss_from_hidden

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 11, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (2, 11), generator=g)
    keep = (torch.rand(2, 11, generator=g) > 0.3).float()
    whole = (F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten(), reduction="none") * keep.flatten()).sum()
    whole_grads = torch.autograd.grad(whole, (h, w))
    for chunk in (3, 100):
        chunked = ce_loss_from_hidden(h, w, y, keep, chunk=chunk)
        assert max_rel(chunked, whole) < 1e-6
        for a, b in zip(whole_grads, torch.autograd.grad(chunked, (h, w)), strict=True):
            assert max_rel(b, a) < 1e-5
