"""GGUF export (llama.cpp's nemotron_h): metadata and tensors read back with the gguf library's reader
and checked against values computed here from the model and tokenizer (names, layouts and the q8_0
block format written out independently of the exporter); what llama.cpp cannot run is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import llama_cpp_logits, randomize_, tiny_config
from test_deploy import elastic_checkpoint

import elasticlm
from elasticlm.cli import main
from elasticlm.config import MlpWidth, Subnet
from elasticlm.model.hybrid import HybridLM
from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer, train_bpe

gguf = pytest.importorskip("gguf")


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def expected_tensors(model: HybridLM) -> dict[str, np.ndarray]:
    """llama.cpp's tensor names and layouts, written out by hand for each of our parameters."""
    cfg, sd = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["embeddings.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i, kind in enumerate(cfg.pattern):
        m = lambda n, i=i: sd[f"layers.{i}.mixer.{n}"]  # noqa: E731
        out[f"blk.{i}.attn_norm.weight"] = sd[f"layers.{i}.norm.weight"]
        if kind == "M":
            heads = m("A_log").shape[0]
            out |= {f"blk.{i}.ssm_in.weight": m("in_proj.weight"),
                    f"blk.{i}.ssm_conv1d.weight": m("conv1d.weight")[:, 0, :],
                    f"blk.{i}.ssm_conv1d.bias": m("conv1d.bias"),
                    f"blk.{i}.ssm_dt.bias": m("dt_bias"),
                    f"blk.{i}.ssm_a": -np.exp(m("A_log")).reshape(heads, 1),
                    f"blk.{i}.ssm_d": m("D").reshape(heads, 1),
                    f"blk.{i}.ssm_norm.weight": m("norm.weight").reshape(cfg.mamba.n_groups, -1),
                    f"blk.{i}.ssm_out.weight": m("out_proj.weight")}
        elif kind == "*":
            out |= {f"blk.{i}.attn_q.weight": m("q_proj.weight"), f"blk.{i}.attn_k.weight": m("k_proj.weight"),
                    f"blk.{i}.attn_v.weight": m("v_proj.weight"), f"blk.{i}.attn_output.weight": m("o_proj.weight")}
        else:
            out |= {f"blk.{i}.ffn_up.weight": m("up_proj.weight"), f"blk.{i}.ffn_down.weight": m("down_proj.weight")}
    return out


def naive_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Decode q8_0 bytes by the format's definition: per 32 values, an f16 scale then 32 int8."""
    blocks = raw.reshape(-1, 34)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * scales[:, None]).reshape(shape), scales


@pytest.fixture
def model_and_tokenizer(tmp_path):
    cfg = tiny_config("M*-M-*", hidden=64, head_dim=16, heads=4, vocab_size=262)
    model = randomize_(HybridLM(cfg), seed=3).eval()
    save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    return model, tmp_path / "tok"


def test_f32_metadata_and_tensors_read_back_equal(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    cfg = model.config
    elasticlm.save(model, tmp_path / "g", "gguf", tokenizer_dir=tok, gguf_type="f32")
    fields, tensors = read(tmp_path / "g" / "model.gguf")
    assert fields["general.architecture"] == "nemotron_h"
    a = "nemotron_h."
    assert fields[a + "block_count"] == 6 and fields[a + "embedding_length"] == 64
    assert fields[a + "feed_forward_length"] == [0, 0, 48, 0, 48, 0]
    assert fields[a + "attention.head_count_kv"] == [0, 2, 0, 0, 0, 2]
    assert [fields[a + "attention.head_count"][i] for i in (1, 5)] == [4, 4]
    assert fields[a + "attention.key_length"] == fields[a + "attention.value_length"] == 8
    assert fields[a + "ssm.inner_size"] == 4 * 16 and fields[a + "ssm.time_step_rank"] == 4
    assert fields[a + "ssm.group_count"] == 2 and fields[a + "ssm.state_size"] == 16
    assert fields[a + "ssm.conv_kernel"] == 4
    assert fields[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    # the tokenizer: every id's token, specials as control tokens, unused padding up to the vocabulary
    vocab = {i: t for t, i in byte_level_tokenizer().get_vocab().items()}
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"][:259] == [vocab[i] for i in range(259)]
    assert fields["tokenizer.ggml.tokens"][259:] == ["[PAD259]", "[PAD260]", "[PAD261]"]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [3, 3, 3] and set(types[3:259]) == {1} and types[259:] == [5, 5, 5]
    assert fields["tokenizer.ggml.merges"] == ["<pad> </s>"]  # the never-applying placeholder merge
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.add_bos_token"] is False

    expected = expected_tensors(model)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert tuple(int(d) for d in t.shape) == tuple(reversed(want.shape)), name  # GGUF lists dims reversed
        if name.endswith("ssm_a"):  # exp() in numpy and torch may differ in the last bit
            np.testing.assert_allclose(t.data.reshape(want.shape), want, rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(t.data.reshape(want.shape), want, err_msg=name)


def test_f16_and_q8_0_tensors(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    expected = expected_tensors(model)
    elasticlm.save(model, tmp_path / "h", "gguf", tokenizer_dir=tok, gguf_type="f16")
    _, tensors = read(tmp_path / "h" / "model.gguf")
    for name, want in expected.items():
        t = tensors[name]
        if want.ndim == 1 or "ssm_conv1d" in name or name.endswith(("ssm_a", "ssm_d", "ssm_norm.weight")):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_allclose(t.data.reshape(want.shape), want, rtol=1e-6)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(t.data.reshape(want.shape), want.astype(np.float16))

    elasticlm.save(model, tmp_path / "b", "gguf", tokenizer_dir=tok, gguf_type="bf16")
    _, tensors = read(tmp_path / "b" / "model.gguf")
    t, want = tensors["blk.0.ssm_in.weight"], torch.from_numpy(expected["blk.0.ssm_in.weight"])
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    raw = torch.from_numpy(np.asarray(t.data).view(np.int16).copy()).view(torch.bfloat16).reshape(want.shape)
    assert torch.equal(raw, want.to(torch.bfloat16))

    elasticlm.save(model, tmp_path / "q", "gguf", tokenizer_dir=tok, gguf_type="q8_0")
    _, tensors = read(tmp_path / "q" / "model.gguf")
    quantized = 0
    for name, want in expected.items():
        t = tensors[name]
        if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            # rows that are not a multiple of 32 values fall back to f16 (here: hidden-48 FFN down rows)
            assert want.ndim == 1 or want.shape[-1] % 32 or t.tensor_type == gguf.GGMLQuantizationType.F32, name
            continue
        quantized += 1
        got, scales = naive_q8_0(np.asarray(t.data), want.shape)
        blocks = want.reshape(-1, 32)
        np.testing.assert_allclose(scales, (np.abs(blocks).max(1) / 127).astype(np.float16).astype(np.float32))
        step = np.repeat(scales, 32).reshape(want.shape)
        assert (np.abs(got - want) <= step / 2 + 1e-6 + np.abs(want) * 1e-3).all(), name
    assert quantized >= 6


def test_bpe_merges_and_chat_template_are_carried(tmp_path):
    docs = ["the cat sat on the mat. " * 20, "a dog and a cat met the other cat. " * 20]
    tok = train_bpe(docs, vocab_size=300)
    save_tokenizer(tok, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert "bos_token" not in config  # training never saw one in front of a document
    config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    model = randomize_(HybridLM(tiny_config("M*-", vocab_size=300)), seed=1)
    elasticlm.save(model, tmp_path / "g", "gguf", tokenizer_dir=tmp_path / "tok")
    fields, _ = read(tmp_path / "g" / "model.gguf")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert merges and fields["tokenizer.ggml.merges"] == merges
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp: the GPT-2 split pattern
    assert fields["tokenizer.chat_template"] == config["chat_template"]


def test_extract_gguf_heterogeneous_ffn_per_layer_and_refusals(tmp_path, capsys):
    path = elastic_checkpoint(tmp_path, heterogeneous=["ffn"])
    deployed = elasticlm.Deployment.load(path)
    model = deployed.model
    label = next(b for b, s in deployed.budgets.items()
                 if len({w.intermediate_size for w in s.layers if isinstance(w, MlpWidth)}) > 1)
    out = tmp_path / "gguf"
    assert main(["extract", "--checkpoint", str(path), "--budget", label, "--out", str(out), "--format", "gguf",
                 "--gguf-type", "f32"]) == 0
    assert "GGUF" in capsys.readouterr().out
    small = elasticlm.extract(model, deployed.budgets[label])
    fields, tensors = read(out / "model.gguf")
    widths = iter(small.config.intermediate_sizes_list())
    assert fields["nemotron_h.feed_forward_length"] == [next(widths) if k == "-" else 0 for k in small.config.pattern]
    for name, want in expected_tensors(small).items():
        np.testing.assert_allclose(tensors[name].data.reshape(want.shape), want, rtol=1e-6, err_msg=name)
    card = (out / "README.md").read_text()
    assert "GGUF" in card and "time_step_min" in card

    # per-layer Mamba widths: llama.cpp has one set of ssm.* keys
    cfg = tiny_config("M*M-", vocab_size=260)
    parent = randomize_(HybridLM(cfg), seed=0)
    full = cfg.layer_widths(0)
    layers = list(Subnet.uniform(cfg).layers)
    layers[2] = type(full)(full.heads_per_group // 2, full.head_dim)
    mixed = elasticlm.extract(parent, Subnet(cfg.hidden_size, tuple(layers)))
    elasticlm.save(mixed, tmp_path / "mixed", "native", tokenizer_dir=out)
    assert main(["convert", str(tmp_path / "mixed"), str(tmp_path / "mixed.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "Mamba layers have different widths" in err and not (tmp_path / "mixed.gguf").exists()
    # attention-free: llama.cpp's hybrid memory needs an attention layer
    free = randomize_(HybridLM(tiny_config("M-M-", vocab_size=260)), seed=0)
    with pytest.raises(elasticlm.ConfigError, match="no attention layer"):
        elasticlm.save(free, tmp_path / "free", "gguf", tokenizer_dir=out)
    assert not (tmp_path / "free").exists()
    # Mamba-free: llama.cpp's nemotron_h asserts on an empty recurrent state
    with pytest.raises(elasticlm.ConfigError, match="no Mamba layer"):
        elasticlm.save(randomize_(HybridLM(tiny_config("*-", vocab_size=260)), seed=0), tmp_path / "t", "gguf",
                       tokenizer_dir=out)
    # a model directory without a tokenizer
    elasticlm.save(randomize_(HybridLM(tiny_config("M*-", vocab_size=260)), seed=0), tmp_path / "notok", "native")
    assert main(["convert", str(tmp_path / "notok"), str(tmp_path / "notok.gguf"), "--to", "gguf"]) == 2
    assert "tokenizer" in capsys.readouterr().err and not (tmp_path / "notok.gguf").exists()


def test_llama_cpp_runs_the_file_with_our_logits(model_and_tokenizer, tmp_path):
    """Only where llama-cpp-python is installed (bench/engines.py records the real runs)."""
    model, tok = model_and_tokenizer
    elasticlm.save(model, tmp_path / "g", "gguf", tokenizer_dir=tok, gguf_type="f32")
    ids = torch.randint(3, 259, (1, 12))
    theirs, [tokens] = llama_cpp_logits(tmp_path / "g" / "model.gguf", ids[0].tolist(), ("Q: 12+7\nT:</s>",))
    assert tokens == byte_level_tokenizer().encode("Q: 12+7\nT:</s>").ids
    with torch.no_grad():
        ours = model(ids)[0]
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-4
