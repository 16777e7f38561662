"""The elastic run's evaluation: per-budget validation CE and KD computed over token chunks equal the same losses
from whole logits (written out here), and no logits bigger than one chunk exist while it runs."""

from __future__ import annotations

import copy

import torch
from conftest import randomize_, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from elasticlm.elastic.router import Router
from elasticlm.elastic.space import ElasticConfig, ElasticSpace
from elasticlm.model.hybrid import HybridLM
from elasticlm.train import losses
from elasticlm.train.elastic import _evaluate


class LargestLogits(TorchDispatchMode):
    """The most rows of any ``[..., vocab]`` tensor an op allocates (views, such as the head weight transposed,
    allocate nothing)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def reference(model, teacher, subnet, tokens, mask):
    """CE and KL(teacher ‖ student) summed over kept tokens, from whole logits, by their definitions."""
    inputs, targets, keep = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].bool()
    s = model(inputs, subnet).double()
    t = teacher(inputs).double()
    log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
    ce = -log_s.gather(-1, targets[..., None])[..., 0][keep].sum()
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)[keep].sum()
    return ce.item(), kl.item(), keep.sum().item()


def test_chunked_evaluation_equals_whole_logits_and_holds_one_chunk(monkeypatch):
    cfg = tiny_config("M*-M-*", vocab_size=300)
    cfg.depth_order = [2, 4, 0, 1, 3, 5]
    torch.manual_seed(0)
    teacher = randomize_(HybridLM(cfg), seed=1).eval()
    model = randomize_(copy.deepcopy(teacher), seed=2).eval()
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.6]))
    router = Router(space, hidden=16)
    tokens = torch.randint(0, cfg.vocab_size, (3, 41))
    mask = torch.ones_like(tokens)
    mask[1, :10] = 0  # a prompt without loss
    batches = [(tokens, mask), (tokens.flip(1), torch.ones_like(tokens))]
    monkeypatch.setattr(losses, "KD_CHUNK_ELEMENTS", 16 * cfg.vocab_size)  # 16-token chunks of 120 tokens
    watch = LargestLogits(cfg.vocab_size)
    with torch.no_grad(), watch:
        out = _evaluate(model, router, space, teacher, batches, eos=cfg.eos_token_id, masking=False, amp=None,
                        tok=None, n=0)
    assert 0 < watch.rows <= 16
    with torch.no_grad():
        for b, label in enumerate(space.budgets):
            subnet = router.resolve(b)
            parts = [reference(model, teacher, subnet, t, m) for t, m in batches]
            count = sum(p[2] for p in parts)
            assert abs(out[f"val_loss_{label}"] - sum(p[0] for p in parts) / count) < 1e-4
            assert abs(out[f"val_kd_{label}"] - sum(p[1] for p in parts) / count) < 1e-4
            assert out[f"val_kd_{label}"] > 1e-3  # the student differs from the teacher: KD is not trivially 0
