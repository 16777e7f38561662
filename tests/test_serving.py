"""Serving layout: column blocks equal the strided slices they replace, a packed elastic model equals
the extracted models, holds no second copy of any weight, and refuses what needs the normal layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel
from test_deploy import elastic_checkpoint

import elasticlm
from elasticlm import ConfigError
from elasticlm.cli import main
from elasticlm.model.serving import ColumnBlocks


def test_column_blocks_equal_every_strided_slice():
    torch.manual_seed(0)
    w, bias = torch.randn(7, 10), torch.randn(7)
    blocks = ColumnBlocks(w, [3, 7, 3, 10, 0])
    assert blocks.cuts == [3, 7, 10]
    assert torch.equal(blocks.dense(), w) and blocks.nbytes() == w.numel() * w.element_size()
    x = torch.randn(2, 5, 10)
    ids = torch.randint(0, 7, (2, 5))
    for cols in range(1, 11):
        assert torch.equal(blocks.embedding(ids, cols), F.embedding(ids, w[:, :cols]))
        for rows in range(1, 8):
            expect = F.linear(x[..., :cols], w[:rows, :cols], bias[:rows])
            assert torch.allclose(blocks.linear(x[..., :cols], rows, bias[:rows]), expect, atol=1e-6, rtol=1e-5)
            if cols in blocks.cuts:  # a served width reads only contiguous memory
                assert all(piece.is_contiguous() for _, _, piece in blocks._pieces(rows, cols))
    with pytest.raises(ValueError, match="requested"):
        blocks.linear(torch.randn(1, 11), 3)


@pytest.mark.parametrize("variant", ["plain", "tied_and_bias"])
def test_packed_model_equals_extracted_models_without_a_copy(tmp_path, variant):
    path = elastic_checkpoint(tmp_path)
    if variant == "tied_and_bias":  # the same checkpoint with a tied head and MLP biases
        base = elasticlm.load(path)
        base.config.tie_word_embeddings, base.config.mlp_bias = True, True
        model = elasticlm.HybridLM(base.config)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        model.budgets, model.budget_targets = base.budgets, base.budget_targets
    else:
        model = elasticlm.load(path)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    extracted = {label: elasticlm.extract(model, s) for label, s in model.budgets.items()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    model.pack_for_serving()
    assert model.serving
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    blocks = [model.head_blocks] + [b for layer in model.layers if getattr(layer.mixer, "blocks", None)
                                    for b in layer.mixer.blocks.values()]
    assert held + sum(b.nbytes() for b in blocks) == param_bytes  # the blocks replace the weights
    ids = torch.randint(3, 260, (2, 19))
    for label, subnet in model.budgets.items():
        with torch.inference_mode():
            assert max_rel(model(ids, subnet), extracted[label](ids)) < 1e-5
        assert torch.equal(model.generate(ids[:1, :6], budget=label, max_new_tokens=10),
                           elasticlm.generate(extracted[label], ids[:1, :6], max_new_tokens=10))

    for refused in (model.state_dict, lambda: model.to(torch.float64),
                    lambda: model.sliced_state_dict(model.budgets["0.45"]), lambda: model(ids)):
        with pytest.raises(ConfigError, match="serving"):
            refused()
    model.unpack()
    assert not model.serving
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_serving_load_and_cli_generate(tmp_path, capsys):
    path = elastic_checkpoint(tmp_path)
    packed = elasticlm.load(path, serving=True)
    plain = elasticlm.load(path)
    ids = torch.randint(3, 260, (1, 8))
    for label in plain.budgets:
        assert torch.equal(packed.generate(ids, budget=label, max_new_tokens=8),
                           plain.generate(ids, budget=label, max_new_tokens=8))
    assert main(["generate", "--checkpoint", str(path), "--budget", "0.45", "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "4"]) == 0
    with pytest.raises(ConfigError, match="budgets of an elastic checkpoint"):
        elasticlm.extract(plain, plain.budgets["0.45"]).pack_for_serving()


def test_grouped_prefix_copies_hold_only_the_kept_columns(tmp_path):
    model = elasticlm.load(elastic_checkpoint(tmp_path))
    subnet = model.budgets["0.45"]
    assert subnet.hidden_size < model.config.hidden_size
    model.generate(torch.tensor([[5, 6, 7]]), budget="0.45", max_new_tokens=2)
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies = [t for m in model.modules() if hasattr(m, "packed") for e in m.packed.entries.values()
              for t in e.values() if t.untyped_storage().data_ptr() not in owned]
    assert copies, "the 0.45 budget cuts heads inside groups, so some slices are copies"
    for t in copies:
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
