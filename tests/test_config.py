"""Validation with errors that name the field; presets; exact counts at real scale."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from elasticlm import AttentionWidth, ConfigError, HybridLM, MambaWidth, MlpWidth, ModelConfig, Subnet, preset


@pytest.mark.parametrize("change,needle", [
    (dict(pattern="M-X"), "unknown layer character"),
    (dict(pattern="M-E", moe_num_experts=6, moe_n_group=4), r"\[model.moe\] num_experts=6"),
    (dict(pattern="E", moe_router="relu"), r"\[model.moe\] router"),
    (dict(pattern="E", moe_top_k=0), r"\[model.moe\] top_k"),
    (dict(pattern="E", moe={"top_k": 1, "topk": 2}), r"unknown field\(s\) \['topk'\] in \[model.moe\]"),
    (dict(pattern="E", moe_topk=2), r"unknown field\(s\) \['moe_topk'\]"),
    (dict(pattern="W-", kv_heads=0), "num_key_value_heads must be a positive int"),  # before the W kind's checks
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}), "factor"),
    (dict(mlp_type="gelu"), "mlp_type"),
    (dict(family="gpt2"), "family"),
    (dict(time_step_limit=[0.5, 0.1]), "time_step_limit"),
    (dict(pattern=""), "pattern"),
    (dict(heads=6, groups=4), "mamba_num_heads=6"),
    (dict(q_heads=5, kv_heads=2), "num_attention_heads=5"),
    (dict(hidden=0), "hidden_size"),
    (dict(chunk=-1), "chunk_size"),
    (dict(heads=[8, 8]), "mamba_num_heads has 2 entries"),
    (dict(vocab_size=2), "eos_token_id"),
])
def test_invalid_configs_name_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_config(**change)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ConfigError, match="unknown field.*in model config"):
        ModelConfig.from_dict({"pattern": "M", "vocab_size": 8, "hidden_size": 8, "hiden": 3})
    with pytest.raises(ConfigError, match="missing required"):
        ModelConfig.from_dict({"pattern": "M"})


def test_config_round_trips_through_dict():
    cfg = tiny_config(heads=[8, 4, 8])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert not cfg.is_homogeneous


@pytest.mark.parametrize("subnet,needle", [
    (lambda c: Subnet(c.hidden_size + 1, Subnet.full(c).layers), "hidden_size"),
    (lambda c: Subnet(c.hidden_size, Subnet.full(c).layers[:-1]), "layer entries"),
    (lambda c: Subnet(c.hidden_size, (MambaWidth(5, 8),) + Subnet.full(c).layers[1:]), "heads_per_group=5"),
    (lambda c: Subnet(c.hidden_size, (MambaWidth(1, 9),) + Subnet.full(c).layers[1:]), "head_dim=9"),
    (lambda c: Subnet(c.hidden_size, (MlpWidth(4),) + Subnet.full(c).layers[1:]), "layer 0 is a mamba layer"),
    (lambda c: Subnet(c.hidden_size, Subnet.full(c).layers[:2] + (AttentionWidth(0),) + Subnet.full(c).layers[3:]),
     "heads_per_kv_group=0"),
])
def test_invalid_subnets_name_the_field(subnet, needle):
    cfg = tiny_config()
    model = HybridLM(cfg)
    with pytest.raises(ConfigError, match=needle):
        model(torch.zeros(1, 3, dtype=torch.long), subnet=subnet(cfg))


def test_nemotron_nano_12b_count_matches_transformers():
    pytest.importorskip("transformers")
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from elasticlm.model.hf import config_to_hf

    cfg = preset("nemotron-nano-12b-v2")
    hf_cfg = config_to_hf(cfg)
    for k in ("architectures", "model_type", "num_hidden_layers", "dtype"):  # the pattern string stays
        hf_cfg.pop(k)
    with torch.device("meta"):
        hf = NemotronHForCausalLM(NemotronHConfig(**hf_cfg))
    expected = sum(p.numel() for p in hf.parameters())
    ours = HybridLM(cfg, device="meta")
    assert ours.num_parameters() == expected == sum(p.numel() for p in ours.parameters())
    assert 12.0e9 < expected < 12.6e9


def test_presets_build():
    for name in ("tiny", "demo"):
        model = HybridLM(preset(name))
        assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_the_documented_demo_configs_are_what_elasticlm_demo_trains():
    """configs/demo-*.toml (the files the README's by-hand commands take) are the demo's recipe, not copies that
    can drift from it, and load as valid run configs."""
    from pathlib import Path

    from elasticlm.config import read_config_file
    from elasticlm.demo import FULL
    from elasticlm.train.config import load_elastic_run_config, load_run_config

    root = Path(__file__).resolve().parents[1]
    for name, tables in (("demo-parent.toml", FULL.parent), ("demo-elastic.toml", FULL.elastic)):
        file = read_config_file(root / "configs" / name)
        file.pop("parent", None)
        file["train"].pop("out")
        assert file == tables, name
    run = load_elastic_run_config(root / "configs" / "demo-elastic.toml")
    assert (run.elastic.router_mode, run.distill.trainable_teacher, run.elastic.heterogeneous) == ("st", True, ["ffn"])
    assert load_run_config(root / "configs" / "demo-parent.toml").train.steps == 1400


def test_every_shipped_config_loads():
    """Every run config under configs/ (pretrain, or elastic when it names a [parent]) is valid as shipped."""
    from pathlib import Path

    from elasticlm.config.files import read_config_file
    from elasticlm.train.config import load_elastic_run_config, load_run_config

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert len(files) >= 6
    for file in files:
        run = (load_elastic_run_config if "parent" in read_config_file(file) else load_run_config)(file)
        assert run.train.out, file.name


def test_moe_settings_are_a_section_and_old_flat_keys_still_load():
    """The mixture of experts' settings are the typed section [model.moe]; the flat moe_* keys every earlier config
    and checkpoint wrote still read (a dense model's defaults among them, which leave no section behind)."""
    from elasticlm.kinds import MOE_KIND

    base = dict(pattern="M*E", vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                attention_head_dim=8, mamba_num_heads=4, mamba_head_dim=8)
    old = ModelConfig.from_dict({**base, "moe_num_experts": 4, "moe_top_k": 1, "moe_intermediate_size": 16})
    new = ModelConfig.from_dict({**base, "moe": {"num_experts": 4, "top_k": 1, "intermediate_size": 16}})
    assert old == new and old.section(MOE_KIND).top_k == 1 and MOE_KIND.experts(old) == [4]
    written = old.to_dict()
    assert written["moe"]["top_k"] == 1 and not any(k.startswith("moe_") for k in written)
    assert ModelConfig.from_dict(written) == old
    dense = ModelConfig.from_dict({**base, "pattern": "M*-", "intermediate_size": 48, "moe_num_experts": 8,
                                   "moe_top_k": 2, "moe_router": "sigmoid"})
    assert "moe" not in dense.to_dict() and dense.sections == {}
    assert dense == ModelConfig.from_dict({**base, "pattern": "M*-", "intermediate_size": 48})
