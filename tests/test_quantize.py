"""One int8 copy holds every budget: slicing the int8 weights and their row scales is exactly slicing the dequantized
parent (every axis of every kind), a nested budget of the int8 model equals its extracted int8 model token for
token, the int8 kernel agrees with the float model of the same values, and every verb reads the quantized
checkpoint."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import max_rel, random_subnet, randomize_, tiny_config

import elasticlm
from elasticlm import Subnet
from elasticlm.cli import main
from elasticlm.config import ModelConfig
from elasticlm.elastic.extract import extract
from elasticlm.int8 import Int8Weight, linear, quantize_tensor
from elasticlm.model.hybrid import HybridLM
from elasticlm.model.quantize import dequantize_, is_quantized, quantizable, quantize_, state_bytes

CONFIGS = {
    # Mamba groups, GQA, squared-ReLU MLP, Nemotron-H MoE (sigmoid router, routing groups, shared expert)
    "hybrid": tiny_config("M*-EM*", moe_num_experts=8, moe_intermediate_size=16, moe_shared_intermediate_size=16,
                          moe_n_group=2, moe_topk_group=1, moe_top_k=2),
    # a transformer with every optional tensor: q/k/v and o biases, q/k norms, gated MLP, tied head
    "qwen3": ModelConfig(pattern="*-*-", vocab_size=64, hidden_size=32, num_attention_heads=6,
                         num_key_value_heads=2, attention_head_dim=8, intermediate_size=40, mlp_type="swiglu",
                         attention_bias=True, attention_out_bias=True, qk_norm=True, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, family="qwen3"),
    # Qwen3-MoE experts: softmax router, gated [gate | up] rows
    "moe": ModelConfig(pattern="*E*E", vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       attention_head_dim=8, rope_parameters={"rope_theta": 10000.0}, family="qwen3_moe",
                       sections={"moe": {"num_experts": 6, "intermediate_size": 12, "router": "softmax",
                                         "expert_type": "swiglu", "shared_intermediate_size": 0, "top_k": 2}}),
}


def quantized_pair(config: ModelConfig, seed: int = 0) -> tuple[HybridLM, HybridLM]:
    """An int8 model and the float model of exactly its values (``q · s``)."""
    torch.manual_seed(seed)
    q = quantize_(randomize_(HybridLM(config), seed).eval())
    return q, dequantize_(copy.deepcopy(q))


def test_quantize_tensor_matches_a_plain_loop():
    w = torch.randn(5, 7, dtype=torch.float64).float()
    w[3] = 0  # a zero row (padding): scale 1, values 0
    q, s = quantize_tensor(w)
    for r in range(5):
        amax = max(abs(float(v)) for v in w[r])
        scale = amax / 127 if amax > 0 else 1.0
        assert s[r, 0].item() == pytest.approx(scale, rel=1e-7)
        for c in range(7):
            assert q[r, c].item() == max(-127, min(127, round(float(w[r, c]) / s[r, 0].item())))
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert (w - q.float() * s).abs().max() <= s.max() / 2 + 1e-7  # half a step at most


def test_what_is_quantized():
    model = HybridLM(CONFIGS["hybrid"])
    names = {f"{m.__class__.__name__}.{n}" for m, n in quantizable(model)}
    assert names == {"Linear.weight", "Embedding.weight", "Experts.up_proj", "Experts.down_proj"}
    quantize_(model)
    kept = {n for n, _ in model.named_parameters()}
    floats = ("norm.weight", "norm_f.weight", "A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "gate.weight")
    assert all(n.endswith(floats) for n in kept), kept
    assert is_quantized(model) and model.lm_head is not None
    assert model.state_dict()["lm_head.weight_int8"].dtype == torch.int8


def _subnets(config: ModelConfig) -> list[Subnet]:
    """One Subnet per axis (each cut alone), every axis cut at once, and random per-layer ones."""
    h = config.hidden_size
    cuts = [dict(hidden_size=h * 3 // 4), dict(mamba_heads_per_group=2), dict(mamba_head_dim=5),
            dict(attention_heads_per_kv_group=1), dict(intermediate_size=17), dict(moe_experts_per_group=2),
            dict(moe_intermediate_size=7)]
    subnets = [Subnet.uniform(config, **c) for c in cuts]
    subnets.append(Subnet.uniform(config, **{k: v for c in cuts for k, v in c.items()}))
    rng = random.Random(0)
    subnets += [random_subnet(config, rng, allow_drop=config.depth_unit == 1) for _ in range(3)]
    return subnets


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_slice_then_dequantize_equals_dequantize_then_slice(name):
    quantized, dequantized = quantized_pair(CONFIGS[name])
    for subnet in _subnets(quantized.config):
        subnet.validate(quantized.config)
        sliced = quantized.sliced_state_dict(subnet)
        reference = dequantized.sliced_state_dict(subnet)
        assert sliced.keys() == reference.keys()
        int8 = [k for k, v in sliced.items() if isinstance(v, Int8Weight)]
        assert any("embeddings" in k for k in int8) and len(int8) > quantized.config.num_layers
        for key, value in sliced.items():
            got = value.dequantize() if isinstance(value, Int8Weight) else value
            assert got.shape == reference[key].shape, key
            assert torch.equal(got, reference[key]), (name, subnet, key)


def test_int8_linear_against_float_matmuls():
    """Decode-sized inputs go through the int8 kernel with bf16 activations: the float product of the bf16-rounded
    activations and the dequantized weight, to bf16 output precision. Larger inputs dequantize: exactly F.linear.
    Column prefixes (a cut hidden size: padded activations over the stored rows) and row copies alike."""
    w = torch.randn(96, 80)
    full = Int8Weight(*quantize_tensor(w))
    slices = {"full": full, "column prefix": full.narrow(1, 0, 56), "rows": full.narrow(0, 0, 40),
              "copied rows": Int8Weight(full.q[::2].contiguous(), full.scale[::2].contiguous())}
    bias = torch.randn(96)
    for name, part in slices.items():
        k, n = part.shape[1], part.shape[0]
        for rows in (1, 3, 16, 64):
            x = torch.randn(rows, k)
            want = torch.nn.functional.linear(x.bfloat16().float(), part.dequantize(), bias[:n])
            got = linear(x, part, bias[:n])
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            assert max_rel(got, want) < 1e-2, name
        x = torch.randn(2, 40, k)  # 80 rows: more than the kernel takes
        assert torch.equal(linear(x, part), torch.nn.functional.linear(x, part.dequantize())), name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_int8_model_runs_the_dequantized_model(name):
    """Prefill-sized calls dequantize (the float model of the same values, up to the order of float sums);
    decode-sized ones run the kernel (bf16 activations)."""
    quantized, dequantized = quantized_pair(CONFIGS[name], seed=1)
    if quantized.config.count("E"):
        pytest.skip("experts see a few tokens each (the kernel), and a bf16 rounding can flip a random router's "
                    "choice; the int8 MoE is checked against its extracted model and by the kernel's own test")
    with torch.inference_mode():
        for subnet in [None, *_subnets(quantized.config)[-2:]]:
            ids = torch.randint(0, quantized.config.vocab_size, (3, 24))  # 72 rows: the dequantizing path
            assert max_rel(quantized(ids, subnet=subnet), dequantized(ids, subnet=subnet)) < 1e-5
            one = ids[:1, :6]
            assert max_rel(quantized(one, subnet=subnet), dequantized(one, subnet=subnet)) < 3e-2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nested_int8_budget_equals_its_extracted_int8_model(name, tmp_path):
    quantized, _ = quantized_pair(CONFIGS[name], seed=2)
    prompt = torch.randint(0, quantized.config.vocab_size, (2, 5))
    for k, subnet in enumerate(_subnets(quantized.config)[-4:]):
        small = extract(quantized, subnet)
        assert is_quantized(small) and small.num_parameters() == quantized.num_parameters(subnet)
        elasticlm.save(small, tmp_path / f"small-{k}")
        reloaded = elasticlm.load(tmp_path / f"small-{k}", serving=True)
        with torch.inference_mode():
            nested = elasticlm.generate(quantized, prompt, subnet=subnet, max_new_tokens=10)
            assert torch.equal(nested, elasticlm.generate(small, prompt, max_new_tokens=10))
            assert torch.equal(nested, elasticlm.generate(reloaded, prompt, max_new_tokens=10))
            assert max_rel(quantized(prompt, subnet=subnet), reloaded(prompt)) < 1e-5


def test_bytes_are_the_int8_count():
    model = randomize_(HybridLM(CONFIGS["hybrid"]))
    before = state_bytes(model)
    matrices = [getattr(m, n) for m, n in quantizable(model)]
    quantize_(model)
    values = sum(w.numel() for w in matrices)
    rows = sum(w.numel() // w.shape[-1] for w in matrices)
    assert state_bytes(model) == before - 4 * values + values + 4 * rows


def test_cli_quantize_then_generate_eval_extract_serve(tmp_path, capsys):
    from test_deploy import elastic_checkpoint

    src = elastic_checkpoint(tmp_path)
    assert main(["quantize", "--checkpoint", str(src), "--out", str(tmp_path / "q8")]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and printed.count("nested in the one int8 copy") == 3
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"]["method"] == "int8"
    assert (tmp_path / "q8" / "elastic.json").is_file() and (tmp_path / "q8" / "router.safetensors").is_file()
    deployed = elasticlm.Deployment.load(tmp_path / "q8", serving=True)
    model = deployed.model
    assert is_quantized(model) and set(deployed.budgets) == set(elasticlm.Deployment.load(src).budgets)
    label = sorted(deployed.budgets, key=float)[0]

    # generate: the nested budget's tokens, as the library's
    with torch.inference_mode():
        want = deployed.generate(torch.tensor([[5, 6, 7]]), budget=label, max_new_tokens=6)[0, 3:].tolist()
    assert main(["generate", "--model", str(tmp_path / "q8"), "--budget", label, "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "6", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, want))

    # extract: native keeps int8 (auto too); hf gets the exact float values of the int8 weights
    assert main(["extract", "--checkpoint", str(tmp_path / "q8"), "--budget", label, "--out",
                 str(tmp_path / "small")]) == 0
    assert "elasticlm native" in capsys.readouterr().out
    small = elasticlm.load(tmp_path / "small")
    assert is_quantized(small)
    assert main(["extract", "--checkpoint", str(tmp_path / "q8"), "--budget", label, "--format", "hf",
                 "--out", str(tmp_path / "small-hf")]) == 0
    capsys.readouterr()
    hf = elasticlm.load(tmp_path / "small-hf")
    assert not is_quantized(hf)
    floats = dequantize_(copy.deepcopy(small)).state_dict()
    assert all(torch.equal(v, floats[k]) for k, v in hf.state_dict().items())

    # eval: perplexity of every budget from the one int8 copy
    data = tmp_path / "held.txt"
    data.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(40)))
    losses = {}
    for name, path in (("int8", tmp_path / "q8"), ("float", src)):
        assert main(["eval", "--checkpoint", str(path), "--tasks", "ppl", "--data", str(data), "--seq-len", "32",
                     "--out", str(tmp_path / f"eval-{name}")]) == 0
        points = json.loads((tmp_path / f"eval-{name}" / "eval.json").read_text())["points"]
        losses[name] = {p["budget"]: p["val_loss"] for p in points}
    assert losses["int8"].keys() == losses["float"].keys() and len(losses["int8"]) == 3
    for label, loss in losses["int8"].items():
        assert loss == pytest.approx(losses["float"][label], rel=0.01)
    capsys.readouterr()


def test_bad_input(tmp_path, capsys):
    from test_deploy import elastic_checkpoint

    src = elastic_checkpoint(tmp_path)
    assert main(["quantize", "--checkpoint", str(src), "--out", str(tmp_path / "q8")]) == 0
    capsys.readouterr()
    # quantizing twice
    assert main(["quantize", "--checkpoint", str(tmp_path / "q8"), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "already quantized" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "again").exists()
    # a method this version does not read
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    config["quantization"]["method"] = "nf4"
    (tmp_path / "q8" / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(tmp_path / "q8"), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "unsupported quantization" in err and len(err.strip().splitlines()) == 1
    # int8 values where floats belong (a quantized file under a float config)
    del config["quantization"]
    (tmp_path / "q8" / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(tmp_path / "q8"), "--prompt-ids", "1,2"]) == 2
    assert "weights missing" in capsys.readouterr().err
    # an existing output directory
    assert main(["quantize", "--checkpoint", str(src), "--out", str(tmp_path / "q8")]) == 2
    assert "exists" in capsys.readouterr().err


def test_serve_every_budget_from_the_int8_copy(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from test_deploy import elastic_checkpoint

    from elasticlm.serve import Engine, running
    from elasticlm.tokenizer import load_tokenizer

    src = elastic_checkpoint(tmp_path)
    assert main(["quantize", "--checkpoint", str(src), "--out", str(tmp_path / "q8")]) == 0
    deployed = elasticlm.Deployment.load(tmp_path / "q8", serving=True)
    model = deployed.model
    tok = load_tokenizer(tmp_path / "q8")
    engine = Engine(deployed, tok, "tiny", max_batch=4, max_context=512)
    ids = tok.encode("Q: 1+2").ids
    with running(engine, tmp_path / "q8") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for label in deployed.budgets:
            with torch.inference_mode():
                out = deployed.generate(torch.tensor([ids]), budget=label, max_new_tokens=8)[0, len(ids):].tolist()
            eos = model.config.eos_token_id
            want = tok.decode(out[: out.index(eos)] if eos in out else out)
            got = client.completions.create(model=f"tiny@{label}", prompt="Q: 1+2", max_tokens=8, temperature=0)
            assert got.choices[0].text == want


def test_gguf_q8_0_from_the_int8_checkpoint(tmp_path):
    """`extract --format gguf --gguf-type q8_0` from an int8 checkpoint: llama.cpp's q8_0 of its dequantized values."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from test_gguf import expected_tensors, naive_q8_0

    from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer

    cfg = tiny_config("M*-M-*", hidden=64, head_dim=16, heads=4, vocab_size=262)
    save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    model = quantize_(randomize_(HybridLM(cfg), seed=3).eval())
    elasticlm.save(model, tmp_path / "q8", tokenizer_dir=tmp_path / "tok")
    loaded = elasticlm.Deployment.load(tmp_path / "q8")
    loaded.save(tmp_path / "g", "gguf", gguf_type="q8_0")  # with the tokenizer it was loaded with
    assert is_quantized(loaded.model)  # the caller's model is left as it is
    expected = expected_tensors(dequantize_(copy.deepcopy(model)))
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    checked = 0
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            want = expected[t.name]
            got, scales = naive_q8_0(np.asarray(t.data), want.shape)
            step = np.repeat(scales, 32).reshape(want.shape)
            assert (np.abs(got - want) <= step / 2 + 1e-6 + np.abs(want) * 1e-3).all(), t.name
            checked += 1
    assert checked >= 6
