"""The Mistral family (model/hf_mistral.py) against transformers' MistralForCausalLM: a window on every layer (our
``W`` kind) or none, import and export both ways, generation past the window, a nested budget's export, and the
one-line refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import randomize_  # noqa: E402

import elasticlm  # noqa: E402
from elasticlm import Subnet, extract  # noqa: E402
from elasticlm.model.gguf import gguf_incompatibility  # noqa: E402
from elasticlm.model.hf import from_transformers, hf_incompatibility, to_transformers  # noqa: E402


def mistral(window: int | None, seed: int = 2, tied: bool = False):
    hc = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                    num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=window,
                                    max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = randomize_(transformers.MistralForCausalLM(hc), seed).eval()
    if tied:
        model.tie_weights()
    return model


def ids_for(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("window", [5, None], ids=["sliding", "full"])
def test_import_and_export_give_transformers_logits_and_tokens(window):
    hf = mistral(window)
    ours = from_transformers(hf)
    assert ours.config.family == "mistral" and ours.config.pattern == ("W-" if window else "*-") * 3
    ids = ids_for(2, 23)  # past the window
    ref = hf(ids, use_cache=False).logits
    assert (ours(ids) - ref).abs().max().item() <= 1e-4
    back = to_transformers(ours).eval()
    assert type(back).__name__ == "MistralForCausalLM" and back.config.sliding_window == window
    assert (back(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4
    prompt = ids[:1, :4]
    want = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    assert torch.equal(elasticlm.generate(ours, prompt, max_new_tokens=16), want)


@torch.no_grad()
def test_a_nested_budget_exports_as_mistral(tmp_path):
    ours = from_transformers(mistral(4, tied=True))
    subnet = Subnet.uniform(ours.config, hidden_size=24, attention_heads_per_kv_group=2, intermediate_size=24,
                            drop_layers=(4, 5))
    small = extract(ours, subnet)
    elasticlm.save(small, tmp_path / "m", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 4
    ids = ids_for(2, 17)
    assert (hf(ids, use_cache=False).logits - ours(ids, subnet)).abs().max().item() <= 1e-4


def test_what_mistral_cannot_hold_is_refused_in_one_line():
    ours = from_transformers(mistral(5))
    mixed = dataclasses.replace(ours.config, pattern="W-*-W-")
    assert "mix sliding-window and full attention" in hf_incompatibility(mixed)
    assert "qwen2 or qwen3" in hf_incompatibility(mixed)
    assert "no attention or MLP biases" in hf_incompatibility(dataclasses.replace(ours.config, attention_bias=True))
    assert "convert_hf_to_gguf" in gguf_incompatibility(ours.config)  # no GGUF writer: llama.cpp's has no windows
