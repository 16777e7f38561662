"""Validation with errors that name the field; presets; exact counts at real scale."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    (dict(time_step_limit=[0.5, 0.1]), r"\[model.mamba\] time_step_limit"),
    (dict(pattern=""), "pattern"),
    (dict(heads=6, groups=4), r"\[model.mamba\] num_heads=6 \(Mamba layer 0\) is not a multiple of n_groups=4"),
    (dict(q_heads=5, kv_heads=2), "num_attention_heads=5"),
    (dict(hidden=0), "hidden_size"),
    (dict(chunk=-1), r"\[model.mamba\] chunk_size must be a positive int"),
    (dict(heads=[8, 8]), r"\[model.mamba\] num_heads has 2 entries"),
    (dict(mamba={"heads": 2}), r"unknown field\(s\) \['heads'\] in \[model.mamba\]"),
    (dict(ssm_state=4), r"unknown field\(s\) \['ssm_state'\]"),
    (dict(mamba={"state_size": 8}), r"sets \['ssm_state_size'\] both flat and in \[model.mamba\]"),
    (dict(use_conv_bias="yes"), r"\[model.mamba\] use_conv_bias must be true or false"),
    (dict(time_step_min="1e-3"), r"\[model.mamba\] time_step_min must be a finite number"),
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
    assert "moe" not in dense.to_dict() and "moe" not in dense.sections
    assert dense == ModelConfig.from_dict({**base, "pattern": "M*-", "intermediate_size": 48})


# Every key of a hybrid's config.json as elasticlm wrote it before the kinds kept sections (the ModelConfig fields of
# 0c9a78f~1), with values: what resume records of runs started then hold.
FLAT_HYBRID = {
    "pattern": "M*M-", "vocab_size": 64, "hidden_size": 32, "mamba_num_heads": [4, 8], "mamba_head_dim": 8,
    "mamba_n_groups": 2, "ssm_state_size": 8, "conv_kernel": 3, "chunk_size": 16, "time_step_min": 0.002,
    "time_step_max": 0.05, "time_step_limit": [0.0, 1.0], "num_attention_heads": 4, "num_key_value_heads": 2,
    "attention_head_dim": 8, "rope_parameters": None, "attention_bias": False, "attention_out_bias": False,
    "qk_norm": False, "max_position_embeddings": 4096, "intermediate_size": 48, "mlp_type": "relu2",
    "moe_num_experts": 8, "moe_intermediate_size": 64, "moe_shared_intermediate_size": 64, "moe_router": "sigmoid",
    "moe_expert_type": "relu2", "moe_top_k": 2, "moe_n_group": 1, "moe_topk_group": 1, "moe_norm_topk_prob": True,
    "moe_routed_scaling_factor": 1.0, "norm_eps": 1e-5, "tie_word_embeddings": False, "use_bias": True,
    "use_conv_bias": False, "mlp_bias": False, "initializer_range": 0.02, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "family": "nemotron_h", "depth_order": None,
}


def test_mamba_settings_are_a_section_and_old_flat_keys_still_load(tmp_path):
    """The Mamba-2 layers' settings are the typed section [model.mamba] (transformers' Mamba2Config names); the flat
    keys earlier configs and checkpoints wrote (mamba_num_heads, ssm_state_size, conv_kernel, use_bias, …) still
    read, and training records keep that flat form, so that runs started before resume."""
    from elasticlm.kinds import MAMBA_KIND
    from elasticlm.kinds.mamba import MambaSection
    from elasticlm.train.config import load_run_config

    old = ModelConfig.from_dict(FLAT_HYBRID)
    nested = {k: v for k, v in FLAT_HYBRID.items() if MAMBA_KIND.legacy_field(k) is None}
    nested["mamba"] = {"num_heads": [4, 8], "head_dim": 8, "n_groups": 2, "state_size": 8, "conv_kernel": 3,
                       "chunk_size": 16, "time_step_min": 0.002, "time_step_max": 0.05, "time_step_limit": [0.0, 1.0],
                       "use_bias": True, "use_conv_bias": False}
    new = ModelConfig.from_dict(nested)
    assert old == new and old.mamba.state_size == 8 and MAMBA_KIND.heads(old) == [4, 8]
    assert old.mamba == old.section(MAMBA_KIND) == MambaSection(**nested["mamba"])
    written = old.to_dict()
    assert written["mamba"] == nested["mamba"] and not any(MAMBA_KIND.legacy_field(k) for k in written)
    assert ModelConfig.from_dict(written) == old
    # what training runs record: exactly the flat form of before
    assert old.flat_dict()[0] == FLAT_HYBRID
    # a transformer has no Mamba section; the section's defaults are the flat fields' old defaults
    dense = ModelConfig.from_dict({**FLAT_HYBRID, "pattern": "*-", "mamba_num_heads": 8})
    assert "mamba" not in dense.to_dict() and "mamba" not in dense.sections
    assert dense.mamba == MambaSection(num_heads=8, head_dim=16, n_groups=1, state_size=16, conv_kernel=4,
                                       chunk_size=64, time_step_min=1e-3, time_step_max=0.1, time_step_limit=None,
                                       use_bias=False, use_conv_bias=True)
    # a run config's [model.mamba] table, and --set on one of its fields
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npattern = "M*M-"\nvocab_size = 64\nhidden_size = 32\nnum_attention_heads = 4\n'
                    'num_key_value_heads = 2\nattention_head_dim = 8\nintermediate_size = 48\n'
                    '[model.mamba]\nnum_heads = [4, 8]\nhead_dim = 8\nn_groups = 2\n[train]\nout = "x"\n')
    run = load_run_config(toml, ["model.mamba.state_size=8"])
    assert run.model.mamba.state_size == 8 and MAMBA_KIND.heads(run.model) == [4, 8]
    assert run.to_dict()["model"]["mamba"]["num_heads"] == [4, 8]


def test_a_preset_overridden_flat_or_by_section_keeps_its_other_settings(tmp_path, capsys):
    """A run config's `preset = "tiny"` with a flat key of older files (`chunk_size`) or a partial [model.mamba]
    table overrides that one field; `init --set` likewise; the preset itself is never changed."""
    import copy

    from elasticlm.cli import main
    from elasticlm.config import PRESETS
    from elasticlm.train.config import run_config_from_tables

    before = copy.deepcopy(PRESETS)
    tiny = preset("tiny").mamba
    for table in ({"preset": "tiny", "chunk_size": 16}, {"preset": "tiny", "mamba": {"chunk_size": 16}}):
        model = run_config_from_tables({"model": table, "train": {"out": "x"}}).model
        assert model.mamba == dataclasses.replace(tiny, chunk_size=16), table
    assert main(["init", str(tmp_path / "a"), "--preset", "tiny", "--set", "chunk_size=16",
                 "--set", "mamba.state_size=8"]) == 0
    written = json.loads((tmp_path / "a" / "config.json").read_text())["model"]["mamba"]
    assert written == {**dataclasses.asdict(tiny), "chunk_size": 16, "state_size": 8}
    assert PRESETS == before
    # --set model.<flat key> on a run config whose file nests [model.mamba] (the demo's recipe)
    from elasticlm.train.config import load_run_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo-parent.toml"
    model = load_run_config(recipe, ["model.chunk_size=32"]).model
    assert model.mamba == dataclasses.replace(load_run_config(recipe).model.mamba, chunk_size=32)
