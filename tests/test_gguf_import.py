"""Importing a GGUF parent: a tiny random Llama is written as a llama.cpp GGUF file here (the gguf library's
writer, llama.cpp's tensor names and its q/k row permutation), imported by `elasticlm convert` through
transformers' GGUF loader, and must give the source model's logits and tokens."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

import elasticlm
from elasticlm.cli import main
from elasticlm.model.gguf import tokenizer_metadata
from elasticlm.tokenizer import load_tokenizer, save_tokenizer, train_bpe

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog, again and again"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders q / k rows from HF's rotate-half layout to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf, tokenizer_dir, path) -> None:
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer_metadata(tokenizer_dir, types.SimpleNamespace(vocab_size=cfg.vocab_size))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    kinds = {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL, "unused": gguf.TokenType.UNUSED}
    writer.add_token_types([kinds[t] for t in vocab["types"]])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, tensor in hf.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied model has no output.weight in GGUF
        data = tensor.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_llama_imports_with_the_source_logits_and_tokens(tmp_path, capsys):
    tok = train_bpe([f"{TEXT} {i}" for i in range(50)], vocab_size=300)
    save_tokenizer(tok, tmp_path / "tok")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)  # far from the init's ones and zeros: a wrong layout or norm would show
    write_llama_gguf(hf, tmp_path / "tok", tmp_path / "tiny.gguf")

    assert main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "native")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = elasticlm.load(tmp_path / "native")
    assert model.config.family == "llama" and model.config.tie_word_embeddings
    ids = load_tokenizer(tmp_path / "native").encode(TEXT).ids
    assert ids == tok.encode(TEXT).ids  # the tokenizer the GGUF carries is the source's
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = hf(x).logits, model(x)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()

    # straight to the Hugging Face format: transformers reads it back as the same Llama
    assert main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(x).logits - want).abs().max() < 1e-4 * want.abs().max()

    # straight to int8: the tokenizer the GGUF carries comes along
    assert main(["quantize", "--checkpoint", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "int8")]) == 0
    assert load_tokenizer(tmp_path / "int8").encode(TEXT).ids == ids


def test_an_unsupported_gguf_architecture_is_refused_in_one_line(tmp_path, capsys):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gemma2' cannot be imported" in err and not (tmp_path / "out").exists()
