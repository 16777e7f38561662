"""GGUF export of transformer budgets (llama.cpp's llama / qwen2 / qwen3): read back with the gguf library and
checked against independent computations — attention scores under llama.cpp's interleaved rotary convention
from the file's q/k rows equal transformers' rotate-half scores from ours; per-layer FFN widths and query heads
zero-padded to the widest layer; the tokenizer's split pattern named as llama.cpp knows it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import llama_cpp_logits, randomize_, tiny_config

import elasticlm
from elasticlm.cli import main
from elasticlm.config import AttentionWidth, MlpWidth, Subnet
from elasticlm.model.hybrid import HybridLM
from elasticlm.tokenizer import save_tokenizer, train_bpe

gguf = pytest.importorskip("gguf")

ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}


def transformer(family: str, q_heads: int = 6, kv_heads: int = 2, **kw) -> HybridLM:
    cfg = tiny_config("*-*-*-", q_heads=q_heads, kv_heads=kv_heads, hidden=48, vocab_size=300,
                      rope_parameters=dict(ROPE), mlp_type="swiglu", family=family,
                      attention_bias=family == "qwen2", qk_norm=family == "qwen3", **kw)
    return randomize_(HybridLM(cfg), seed=5).eval()


def rotate(x: torch.Tensor, theta: float, pairs: str) -> torch.Tensor:
    """Rotary positions on ``x`` [tokens, heads, head_dim]: frequency ``j`` turns the pair of channels
    (j, j + head_dim/2) ("half", transformers) or (2j, 2j + 1) ("interleaved", llama.cpp's llama)."""
    t, _, d = x.shape
    angle = torch.arange(t, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x = x.double()
    a, b = (x[..., : d // 2], x[..., d // 2:]) if pairs == "half" else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if pairs == "half":
        return torch.cat([ra, rb], -1)
    return torch.stack([ra, rb], -1).reshape(x.shape)


def scores(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, head_dim: int, pairs: str) -> torch.Tensor:
    """q·k of every query head with its KV head (``repeat_kv`` order), [heads, tokens, tokens]."""
    q = rotate((x @ wq.T).reshape(len(x), -1, head_dim), ROPE["rope_theta"], pairs)
    k = rotate((x @ wk.T).reshape(len(x), -1, head_dim), ROPE["rope_theta"], pairs)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("thd,shd->hts", q, k)


@pytest.fixture
def tokenizer(tmp_path):
    docs = ["the cat sat on the mat 12345. " * 20, "a dog and a cat met the other cat. " * 20]
    save_tokenizer(train_bpe(docs, vocab_size=300), tmp_path / "tok")
    return tmp_path / "tok"


def test_llama_budget_metadata_padded_widths_and_rotary_layout(tmp_path, tokenizer, capsys):
    parent = transformer("llama")
    layers = (AttentionWidth(1), MlpWidth(20), AttentionWidth(3), MlpWidth(48), AttentionWidth(2), MlpWidth(7))
    small = elasticlm.extract(parent, Subnet(48, layers))
    (tokenizer / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    elasticlm.save(small, tmp_path / "native", "native", tokenizer_dir=tokenizer)
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "g"), "--to", "gguf",
                 "--gguf-type", "f32"]) == 0
    assert "GGUF" in capsys.readouterr().out
    fields, tensors = read(tmp_path / "g" / "model.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 3
    assert fields["llama.feed_forward_length"] == 48  # padded: llama.cpp sizes every layer by one width
    assert fields["llama.attention.head_count"] == 6 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 8 and fields["llama.attention.key_length"] == 8
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.context_length"] == small.config.max_position_embeddings
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == "{% for m in messages %}{{ m.content }}{% endfor %}"
    sd = small.state_dict()
    x = torch.randn(7, 48, dtype=torch.float64)
    for k in range(3):
        a, m = f"layers.{2 * k}.", f"layers.{2 * k + 1}."
        f = layers[2 * k + 1].intermediate_size  # real neurons first, then zero rows / columns
        gate, down = tensors[f"blk.{k}.ffn_gate.weight"], tensors[f"blk.{k}.ffn_down.weight"]
        np.testing.assert_array_equal(gate[:f], sd[m + "mixer.gate_proj.weight"].numpy())
        np.testing.assert_array_equal(down[:, :f], sd[m + "mixer.down_proj.weight"].numpy())
        assert not gate[f:].any() and not down[:, f:].any() and gate.shape == (48, 48)
        np.testing.assert_array_equal(tensors[f"blk.{k}.ffn_norm.weight"], sd[m + "norm.weight"].numpy())
        np.testing.assert_array_equal(tensors[f"blk.{k}.attn_v.weight"], sd[a + "mixer.v_proj.weight"].numpy())
        ours = scores(x, sd[a + "mixer.q_proj.weight"].double(), sd[a + "mixer.k_proj.weight"].double(), 8, "half")
        wq = torch.from_numpy(tensors[f"blk.{k}.attn_q.weight"]).double()
        wk = torch.from_numpy(tensors[f"blk.{k}.attn_k.weight"]).double()
        theirs = scores(x, wq, wk, 8, "interleaved")  # 6 heads: each KV group's real heads first, then zeros
        real = layers[2 * k].heads_per_kv_group
        keep = [g * 3 + j for g in range(2) for j in range(real)]
        torch.testing.assert_close(theirs[keep], ours, rtol=1e-9, atol=1e-9)
        assert not wq.reshape(2, 3, 8, 48)[:, real:].any()
        o = tensors[f"blk.{k}.attn_output.weight"].reshape(48, 2, 3, 8)
        assert not o[:, :, real:].any()
        np.testing.assert_array_equal(o[:, :, :real].reshape(48, -1), sd[a + "mixer.o_proj.weight"].numpy())


def test_qwen_families_keep_rotate_half_rows_and_carry_biases_and_norms(tmp_path, tokenizer):
    for family in ("qwen2", "qwen3"):
        model = transformer(family, tie_word_embeddings=True)
        elasticlm.save(model, tmp_path / family, "gguf", tokenizer_dir=tokenizer, gguf_type="f32")
        fields, tensors = read(tmp_path / family / "model.gguf")
        assert fields["general.architecture"] == family and fields[f"{family}.feed_forward_length"] == 48
        sd = model.state_dict()
        np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], sd["layers.2.mixer.q_proj.weight"].numpy())
        np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], sd["layers.2.mixer.k_proj.weight"].numpy())
        assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
        if family == "qwen2":
            np.testing.assert_array_equal(tensors["blk.0.attn_q.bias"], sd["layers.0.mixer.q_proj.bias"].numpy())
            assert "blk.0.attn_q_norm.weight" not in tensors
        else:
            norm = sd["layers.4.mixer.k_norm.weight"].numpy()
            np.testing.assert_array_equal(tensors["blk.2.attn_k_norm.weight"], norm)
            assert "blk.0.attn_q.bias" not in tensors


def test_qwen_tokenizer_pattern_is_named_qwen2_and_unknown_patterns_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"Ġt": 256, "he": 257, "<|endoftext|>": 258}
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")])
    tok.save_pretrained(tmp_path / "qtok")
    model = transformer("qwen3")
    elasticlm.save(model, tmp_path / "q", "gguf", tokenizer_dir=tmp_path / "qtok", gguf_type="f32")
    fields, _ = read(tmp_path / "q" / "model.gguf")
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["tokenizer.ggml.merges"] == ["Ġ t", "h e"]

    spec = json.loads((tmp_path / "qtok" / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (tmp_path / "qtok" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(elasticlm.ConfigError, match="pre-tokenizer"):
        elasticlm.save(model, tmp_path / "odd", "gguf", tokenizer_dir=tmp_path / "qtok")
    assert not (tmp_path / "odd").exists()


def test_what_llama_cpp_cannot_run_is_refused_in_one_line(tmp_path, tokenizer):
    scaled = tiny_config("*-*-", hidden=48, vocab_size=300, family="llama", mlp_type="swiglu",
                         rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(elasticlm.ConfigError, match="rotary scaling 'linear'") as err:
        elasticlm.save(HybridLM(scaled), tmp_path / "s", "gguf", tokenizer_dir=tokenizer)
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()
    half = elasticlm.extract(transformer("llama"), Subnet(48, (AttentionWidth(3), MlpWidth(48), None, None,
                                                               AttentionWidth(3), MlpWidth(48))))
    elasticlm.save(half, tmp_path / "ok", "gguf", tokenizer_dir=tokenizer)  # whole decoder layers dropped: fine
    odd = elasticlm.extract(transformer("llama"), Subnet(48, (AttentionWidth(3), None, AttentionWidth(3),
                                                              MlpWidth(48), AttentionWidth(3), MlpWidth(48))))
    with pytest.raises(elasticlm.ConfigError, match="attention \\+ MLP pairs"):
        elasticlm.save(odd, tmp_path / "odd", "gguf", tokenizer_dir=tokenizer)


def test_llama_cpp_runs_a_llama_budget_with_our_logits(tmp_path, tokenizer):
    """Only where llama-cpp-python is installed (bench/engines.py records the real runs)."""
    layers = (AttentionWidth(1), MlpWidth(20), AttentionWidth(3), MlpWidth(48), AttentionWidth(2), MlpWidth(7))
    small = elasticlm.extract(transformer("llama"), Subnet(48, layers))
    elasticlm.save(small, tmp_path / "g", "gguf", tokenizer_dir=tokenizer, gguf_type="f32")
    ids = torch.randint(3, 299, (1, 12))
    theirs, _ = llama_cpp_logits(tmp_path / "g" / "model.gguf", ids[0].tolist())
    with torch.no_grad():
        ours = small(ids)[0]
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-4
