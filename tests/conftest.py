"""Shared helpers: tiny random models, transformers twins, random Subnets."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

from elasticlm import ModelConfig, Subnet
from elasticlm.kinds import MAMBA_KIND, MOE_KIND, kind_of

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker and every process it starts gets one
# thread: two workers of two threads each on two cores slow every torch op down far more than 2x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `elasticlm demo --quick` run shared by the tests that read its outputs (it trains a parent, importance,
    an elastic run, extraction and evaluation: the slowest step of the suite, so it runs once). Returns the demo
    directory and what it printed. Tests that write into a demo copy it first."""
    import contextlib
    import io

    from elasticlm.cli import main

    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, printed.getvalue()

# transformers' layer-type names (independent of elasticlm's exporter, which writes the pattern string)
HF_LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def tiny_config(pattern: str = "M-*M-M*", *, groups: int = 2, heads: int = 8, head_dim: int = 8,
                q_heads: int = 4, kv_heads: int = 2, hidden: int = 32, chunk: int = 8, **kw) -> ModelConfig:
    # through from_dict, as a config file is read: kinds' sections by name, and the flat moe_* keys of older configs
    sections = kw.pop("sections", {})
    return ModelConfig.from_dict(dict(
        pattern=pattern, vocab_size=kw.pop("vocab_size", 64), hidden_size=hidden, mamba_num_heads=heads,
        mamba_head_dim=head_dim, mamba_n_groups=groups, ssm_state_size=16, chunk_size=chunk,
        num_attention_heads=q_heads, num_key_value_heads=kv_heads, attention_head_dim=8, intermediate_size=48,
        **kw, **sections))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter an O(1)-effect random value, so that any wiring mistake shows in
    the logits (the default init makes mixers nearly silent)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            v = 1 + 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith("A_log"):
            v = 0.7 * torch.randn(p.shape, generator=g)
        elif name.endswith("dt_bias"):
            v = torch.randn(p.shape, generator=g) - 1
        elif name.endswith(".D"):
            v = torch.randn(p.shape, generator=g)
        else:
            v = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        p.copy_(v.to(p.dtype))
    return model


def hf_twin(config: ModelConfig, seed: int = 0):
    """A randomly initialised transformers NemotronHForCausalLM with ``config``'s architecture."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    assert config.is_homogeneous
    moe = config.section(MOE_KIND)
    hc = NemotronHConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        layers_block_type=[HF_LAYER_TYPES[k] for k in config.pattern],
        mamba_num_heads=MAMBA_KIND.heads(config)[0] if config.count("M") else 8,
        mamba_head_dim=MAMBA_KIND.head_dims(config)[0] if config.count("M") else 8,
        n_groups=config.mamba.n_groups, ssm_state_size=config.mamba.state_size, chunk_size=config.mamba.chunk_size,
        conv_kernel=config.mamba.conv_kernel,
        num_attention_heads=config.attention_heads_list()[0] if config.count("*") else 4,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.attention_head_dim,
        intermediate_size=config.intermediate_sizes_list()[0] if config.count("-") else 48,
        tie_word_embeddings=config.tie_word_embeddings, use_bias=config.mamba.use_bias, mlp_bias=config.mlp_bias,
        n_routed_experts=MOE_KIND.experts(config)[0] if config.count("E") else 8,
        moe_intermediate_size=MOE_KIND.expert_ffns(config)[0] if config.count("E") else 48,
        moe_shared_expert_intermediate_size=moe.shared_intermediate_size,
        num_experts_per_tok=moe.top_k, n_group=moe.n_group, topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob, routed_scaling_factor=moe.routed_scaling_factor,
    )
    torch.manual_seed(seed)
    return randomize_(NemotronHForCausalLM(hc), seed).eval()


def random_subnet(config: ModelConfig, rng: random.Random, allow_drop: bool = True) -> Subnet:
    """A random valid Subnet with per-layer (heterogeneous) widths and possibly dropped layers: every width field
    of every layer drawn between its kind's minimum and the parent's width."""
    layers = []
    for i in range(config.num_layers):
        full, kind = config.layer_widths(i), kind_of(config.pattern[i])
        if allow_drop and rng.random() < 0.2:
            layers.append(None)
            continue
        layers.append(dataclasses.replace(full, **{f: rng.randint(kind.minimum(config, f), v)
                                                   for f, v in dataclasses.asdict(full).items()}))
    if all(w is None for w in layers):
        layers[0] = config.layer_widths(0)
    return Subnet(rng.randint(max(1, config.hidden_size // 4), config.hidden_size), tuple(layers))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test sees the same random stream, whatever ran before it."""
    torch.manual_seed(0)


def llama_cpp_logits(gguf_file, ids: list[int], texts: tuple[str, ...] = ()) -> tuple[torch.Tensor, list[list[int]]]:
    """llama.cpp's logits for ``ids`` (one row) from a GGUF file, and its own tokenization of ``texts``; skips the
    test where llama-cpp-python is not installed. f32 KV cache: its default f16 cache alone moves logits by ~1e-3."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        logits = torch.tensor(np.array(llm.scores[: len(ids)]))
        return logits, [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    finally:
        llm.close()
