"""The whole pipeline, through the command line, for the parent families a user brings from Hugging Face:
importance → reorder → prune → elastic training → extract → export, on tiny random transformers models."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import randomize_  # noqa: E402

import elasticlm  # noqa: E402
from elasticlm.cli import main  # noqa: E402
from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer  # noqa: E402

COMMON = dict(vocab_size=260, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(family: str):
    if family == "mamba2":
        return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=8, num_hidden_layers=3,
            chunk_size=16, **COMMON))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            tie_word_embeddings=True, **COMMON))
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, **COMMON))


@pytest.mark.parametrize("family", ["mamba2", "qwen2", "qwen3_moe"])
def test_every_step_of_the_pipeline_on_a_hugging_face_parent(tmp_path, family):
    torch.manual_seed(0)
    hf = randomize_(build(family), seed=1).eval()
    hf.save_pretrained(tmp_path / "hf")
    save_tokenizer(byte_level_tokenizer(), tmp_path / "hf")
    run = ["--no-progress"]
    assert main(["importance", "--model", str(tmp_path / "hf"), "--data", "synthetic", "--samples", "8",
                 "--seq-len", "64", "--depth-samples", "4", "--out", str(tmp_path / "imp"), *run]) == 0
    assert main(["reorder", "--model", str(tmp_path / "hf"), "--importance", str(tmp_path / "imp"),
                 "--out", str(tmp_path / "ordered")]) == 0
    ordered = elasticlm.load(tmp_path / "ordered")
    ids = torch.randint(3, 260, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the reordered parent is the same function
        assert (ordered(ids) - hf(ids, use_cache=False).logits).abs().max().item() <= 1e-4
    # native output: at this size no Mamba2 architecture within 1 % of the budget has an inner width that is a whole
    # multiple of its hidden size (what Mamba2Config can hold), and the pruned model is not exported below
    assert main(["prune", "--model", str(tmp_path / "ordered"), "--budget", "0.6", "--data", "synthetic",
                 "--val-samples", "8", "--seq-len", "64", "--out", str(tmp_path / "pruned"), "--format", "native",
                 *run]) == 0
    config = {
        "parent": {"path": str(tmp_path / "ordered")},
        "elastic": {"budgets": [1.0, 0.6], "router_hidden": 32, "router_init_steps": 200,
                    **({"target": "active"} if family == "qwen3_moe" else {})},
        "data": {"source": "synthetic", "mask_prompt": True},
        "train": {"out": str(tmp_path / "elastic"), "dtype": "float32", "lr": 1e-3, "warmup_steps": 1,
                  "log_every": 1, "eval_every": 100, "val_batches": 1, "checkpoint_every": 100, "tensorboard": False},
        "eval": {"tasks": False},
        "stages": [{"name": "short", "seq_len": 32, "batch_size": 4, "tokens": 3 * 128}],
    }
    (tmp_path / "elastic.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "elastic.json"), *run]) == 0
    assert main(["extract", "--checkpoint", str(tmp_path / "elastic" / "final"), "--budget", "all",
                 "--out", str(tmp_path / "extracted")]) == 0
    deployed = elasticlm.Deployment.load(tmp_path / "elastic" / "final")
    elastic = deployed.model
    for label, subnet in deployed.budgets.items():
        directory = tmp_path / "extracted" / f"budget-{label}"
        saved = json.loads((directory / "config.json").read_text())
        with torch.no_grad():
            nested = elastic(ids, subnet=subnet)
            if "elasticlm_format" in saved:  # per-layer widths: native, and the model card says what it is
                assert (elasticlm.load(directory)(ids) - nested).abs().max().item() <= 1e-4
                continue
            assert saved["architectures"] == [type(hf).__name__]  # the parent's own class
            # transformers' default experts path (torch's grouped mm on CPU) needs 16-byte-aligned rows, which a
            # randomly pruned expert width (e.g. 17 neurons) does not have: the eager path runs any width
            again = transformers.AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager").eval()
            assert (again(ids, use_cache=False).logits - nested).abs().max().item() <= 1e-4


def test_every_family_has_its_adapter():
    """The family table (config.FAMILIES) is the one registration: each family's module holds an adapter that reads
    and writes that model_type, and the HF registry is built from the table."""
    from elasticlm.config import FAMILIES
    from elasticlm.model.hf import ADAPTERS

    assert set(ADAPTERS) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert name in ADAPTERS[name].architectures, (name, family.adapter)
