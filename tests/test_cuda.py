"""Checks that need a CUDA GPU (`pytest -m cuda`; skipped elsewhere). scripts/gpu_check.sh runs them."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel, random_subnet, randomize_, tiny_config

from elasticlm import HybridLM
from elasticlm.model.documents import DocumentMask, document_attention, document_ids_from_eos

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
EOS = 2


def _packed(rows: int, t: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, t), generator=g)
    ids[torch.rand(rows, t, generator=g) < 0.05] = EOS
    return ids


def test_document_attention_on_cuda_equals_the_dense_mask():
    ids = _packed(2, 300, 64).cuda()
    doc = document_ids_from_eos(ids, EOS)
    mask = DocumentMask.from_ids(doc, 4)
    assert mask.dense is None and mask.buckets  # GPUs always take the flash-eligible buckets
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 32, device="cuda", generator=g) for h in (8, 2, 2))
    same = (doc[:, :, None] == doc[:, None, :]) & torch.ones(300, 300, dtype=torch.bool, device="cuda").tril()
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                         attn_mask=same[:, None], scale=32**-0.5)
    assert max_rel(document_attention(q, k, v, mask.buckets, 32**-0.5), ref) < 1e-4


def test_packed_documents_and_subnets_on_cuda_match_cpu():
    cfg = tiny_config("M-*M-M*", chunk=16)
    cpu = randomize_(HybridLM(cfg)).eval()
    gpu = randomize_(HybridLM(cfg)).cuda().eval()
    ids = _packed(2, 200, 64)
    subnet = random_subnet(cfg, random.Random(1))
    with torch.no_grad():
        for sn in (None, subnet):
            a = cpu(ids, sn, document_ids=document_ids_from_eos(ids, EOS))
            b = gpu(ids.cuda(), sn, document_ids=document_ids_from_eos(ids.cuda(), EOS)).cpu()
            assert max_rel(b, a) < 1e-4


def test_cached_decode_equals_recompute_on_cuda():
    cfg = tiny_config("M-*M-M*", chunk=8)
    model = randomize_(HybridLM(cfg)).cuda().eval()
    ids = _packed(2, 24, 64).cuda()
    subnet = random_subnet(cfg, random.Random(2))
    with torch.no_grad():
        full = model(ids, subnet)
        cache = model.new_cache(subnet)
        steps = [model(ids[:, :16], subnet, cache=cache)[:, -1]]
        for i in range(16, 23):
            steps.append(model(ids[:, i:i + 1], subnet, cache=cache)[:, -1])
    assert max_rel(torch.stack(steps, 1), full[:, 15:23]) < 1e-4


def test_bf16_autocast_training_step_is_close_to_fp32():
    cfg = tiny_config("M-*M-M*", chunk=16, hidden=64)
    model = randomize_(HybridLM(cfg)).cuda()
    ids = _packed(4, 128, 64).cuda()
    doc = document_ids_from_eos(ids, EOS)
    losses, grads = [], []
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(ids[:, :-1], document_ids=doc[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert abs(losses[1] / losses[0] - 1) < 0.02
    assert torch.isfinite(grads[1]).all() and F.cosine_similarity(grads[0], grads[1], dim=0) > 0.98


def test_activation_checkpointing_on_cuda_gives_the_same_gradients():
    cfg = tiny_config("M-*M-M*", chunk=16)
    model = randomize_(HybridLM(cfg)).cuda()
    ids = _packed(2, 200, 64).cuda()
    doc = document_ids_from_eos(ids, EOS)
    out = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        model(ids, document_ids=doc).float().logsumexp(-1).mean().backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert max_rel(out[1], out[0]) < 1e-5


def test_single_rank_fsdp2_step_matches_the_plain_model(tmp_path):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        cfg = tiny_config("M-*M-M*", chunk=16)
        plain = randomize_(HybridLM(cfg)).cuda()
        sharded = randomize_(HybridLM(cfg)).cuda()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in sharded.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(sharded, mp_policy=mp)
        sharded.mark_sharded()
        ids = _packed(2, 128, 64).cuda()
        doc = document_ids_from_eos(ids, EOS)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a = plain(ids, document_ids=doc).float().logsumexp(-1).mean()
        b = sharded(ids, document_ids=doc).float().logsumexp(-1).mean()
        assert abs(a.item() / b.item() - 1) < 0.02
        b.backward()
        assert all(p.grad is not None for p in sharded.parameters())
    finally:
        dist.destroy_process_group()
