"""GGUF export for llama.cpp, written with the ``gguf`` library: architecture ``nemotron_h`` for the hybrid
models, ``llama`` / ``qwen2`` / ``qwen3`` for those families (see "Transformer families" below).

llama.cpp's NemotronH reads the kind of each layer from two per-layer arrays: a Mamba layer has
``head_count_kv == 0`` and ``feed_forward_length == 0``, an attention layer a non-zero KV head
count, an MLP layer a non-zero FFN width. So FFN widths and attention head counts may differ from
layer to layer (heterogeneous budgets run there), but the Mamba mixer is described by one set of
``ssm.*`` keys: every Mamba layer must have the same heads and head dim.

Tensors are stored the way llama.cpp's own converter stores them: ``A = -exp(A_log)`` and ``D`` as
``(heads, 1)``, the conv kernel without its singleton axis, the gated group norm's weight as
``(groups, channels / groups)``; projections keep PyTorch's ``(out, in)`` layout (GGUF lists the
dimensions the other way round). Norms, biases and the SSM parameters stay float32 whatever the
chosen type (llama.cpp's SSM kernels read them as f32).

Transformer families: a GGUF block is one decoder layer, our attention block ``2k`` and MLP block ``2k + 1``.
llama.cpp's ``llama`` architecture rotates interleaved pairs of a head's channels where transformers rotates
its two halves, so the ``q``/``k`` rows of every head are reordered (:func:`interleave_rotary_rows`), as
llama.cpp's own converter does; ``qwen2`` / ``qwen3`` rotate halves, as transformers, and keep them. These
architectures size every layer by one FFN width and one head count (a ``feed_forward_length`` array is refused
at load: "tensor 'blk.1.ffn_gate.weight' has wrong shape"), so per-layer widths are zero-padded to the widest
layer, which is exact (:mod:`elasticlm.model.padding`).

``gguf`` (and numpy) are imported only when a GGUF file is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import LAYER_NAMES, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..kinds import MAMBA_KIND
from . import padding

if TYPE_CHECKING:
    import numpy as np

    from .hybrid import HybridLM

ARCH = "nemotron_h"
GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
GGUF_FILE = "model.gguf"
# GGUF cannot hold an empty array, and llama.cpp requires the merges key: a tokenizer with no
# merges (elasticlm's byte-level one) gets this single merge of two special tokens. BPE merges
# act on pairs of symbols that start as single characters, so it can never apply.
UNREACHABLE_MERGE = "<pad> </s>"
DT_CLAMP_NOTE = ("llama.cpp does not clamp the Mamba step size dt at time_step_min as elasticlm does, so "
                 "logits differ where softplus(dt) falls below it (measured on a random model: 1e-6 relative "
                 "with dt around 0.3, 1e-3 with dt near 0.0025, 5e-2 near 0.0001). Its default f16 KV cache "
                 "alone moves logits by about 1e-3 relative; run with --cache-type-k f32 --cache-type-v f32 "
                 "(llama-cpp-python: type_k=0, type_v=0) for float32 logits")


def gguf_arch(family: str) -> str:
    """The llama.cpp architecture a model of ``family`` is written as."""
    return GGUF_WRITERS[family].arch if family in GGUF_WRITERS else ARCH


def gguf_incompatibility(config: ModelConfig) -> str | None:
    """Why ``config`` cannot run as its llama.cpp architecture, or None if it can."""
    if config.family not in GGUF_WRITERS:
        return (f"GGUF export writes llama.cpp's {', '.join(sorted({w.arch for w in GGUF_WRITERS.values()}))}; a "
                f"{config.family} model is exported with --format hf and converted with llama.cpp's own "
                "convert_hf_to_gguf.py")
    return GGUF_WRITERS[config.family].incompatibility(config)


def _nemotron_h_incompatibility(config: ModelConfig) -> str | None:
    mamba = [(h, d) for h, d in zip(MAMBA_KIND.heads(config), MAMBA_KIND.head_dims(config), strict=True)]
    if len(set(mamba)) > 1:
        return (f"its Mamba layers have different widths (heads, head dim) {mamba}, and llama.cpp describes "
                "the Mamba mixer by one set of ssm.* keys; save it in the native format instead")
    if "E" in config.pattern:
        return "mixture-of-experts layers are not written to GGUF yet; use --format hf (NemotronH) or native"
    if "M" not in config.pattern:
        return ("it has no Mamba layer, and llama.cpp's nemotron_h fails on an empty recurrent state "
                "(GGML_ASSERT(buffer)); a transformer-only model is not a nemotron_h")
    if "*" not in config.pattern:
        return ("it has no attention layer, and llama.cpp's hybrid memory needs one; keep one with "
                "elastic.keep_attention (the default)")
    if config.mamba.use_bias:
        return "its Mamba projections have biases, which llama.cpp's nemotron_h does not read"
    if set(config.pattern) - set("M*-"):
        return f"its pattern {config.pattern!r} has layer kinds llama.cpp's dense nemotron_h does not know"
    return None


def _transformer_incompatibility(config: ModelConfig, *, biases: bool, qk_norm: bool) -> str | None:
    """Why ``config`` is not llama.cpp's transformer of its family: ``biases`` (q/k/v biases, qwen2) and ``qk_norm``
    (per-head q/k norms, qwen3) are what that architecture has."""
    family = config.family
    if config.depth_unit != 2 or "E" in config.pattern:
        return (f"its blocks {config.pattern!r} are not attention + MLP pairs, and a llama.cpp {family} block is "
                "one of each")
    other = sorted(LAYER_NAMES[c] for c in set(config.pattern) - set("*-"))
    if other:
        return (f"its {' and '.join(other)} layers are not written to GGUF: llama.cpp's {family} has full "
                "attention and MLP blocks only; use --format hf or native")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        return f"its rotary scaling {rope.get('rope_type')!r} is not written to GGUF yet (only default rotary)"
    if config.mlp_type != "swiglu" or config.mlp_bias:
        return f"its MLP is not {family}'s gated SiLU MLP without biases"
    if config.attention_out_bias or config.attention_bias != biases:
        return f"its attention biases differ from llama.cpp's {family} (q/k/v biases only in qwen2)"
    if config.qk_norm != qk_norm:
        return f"its q/k norms differ from llama.cpp's {family} (qwen3 only)"
    return None


def interleave_rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q/k projection (or bias) reordered from transformers' rotate-half layout to llama.cpp's
    interleaved-pair layout: within each head, channel ``j`` and ``j + head_dim/2`` (a rotated pair in
    transformers) become rows ``2j`` and ``2j + 1`` (a rotated pair in llama.cpp's ``llama``).

    >>> interleave_rotary_rows(torch.arange(8.).unsqueeze(1), heads=2).squeeze(1).tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    head_dim = w.shape[0] // heads
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def layer_arrays(config: ModelConfig) -> dict[str, list[int]]:
    """The per-layer arrays that tell llama.cpp each layer's kind and width.

    >>> cfg = ModelConfig(pattern="M*-", vocab_size=300, hidden_size=64, num_attention_heads=4,
    ...                   num_key_value_heads=2, attention_head_dim=16, intermediate_size=96,
    ...                   sections={"mamba": {"num_heads": 4, "head_dim": 16}})
    >>> layer_arrays(cfg)
    {'feed_forward_length': [0, 0, 96], 'head_count': [4, 4, 4], 'head_count_kv': [0, 2, 0]}
    """
    heads = iter(config.attention_heads_list())
    ffn = iter(config.intermediate_sizes_list())
    attn_heads = [next(heads) if k == "*" else 0 for k in config.pattern]
    # a non-attention layer's head count is never read; the widest one keeps llama.cpp's
    # defaults that divide by it well defined
    filler = max(attn_heads, default=0) or config.num_attention_heads
    return {
        "feed_forward_length": [next(ffn) if k == "-" else 0 for k in config.pattern],
        "head_count": [h if k == "*" else filler for h, k in zip(attn_heads, config.pattern, strict=True)],
        "head_count_kv": [config.num_key_value_heads if k == "*" else 0 for k in config.pattern],
    }


def gguf_tensors(model: HybridLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in the layout llama.cpp reads) for every weight of ``model``."""
    writer = GGUF_WRITERS[model.config.family]
    yield from writer.tensors(writer.prepare(model))


def _nemotron_h_tensors(model: HybridLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-layer FFN widths and head counts as they are (llama.cpp's nemotron_h reads per-layer arrays)."""
    config = model.config
    state = model.state_dict()

    def get(name: str) -> torch.Tensor:
        return state[name].detach().float().cpu().contiguous()

    yield "token_embd.weight", get("embeddings.weight")
    for i, kind in enumerate(config.pattern):
        p, b = f"layers.{i}.mixer.", f"blk.{i}."
        yield b + "attn_norm.weight", get(f"layers.{i}.norm.weight")
        if kind == "M":
            groups = config.mamba.n_groups
            yield b + "ssm_in.weight", get(p + "in_proj.weight")
            yield b + "ssm_conv1d.weight", get(p + "conv1d.weight").squeeze(1)
            if p + "conv1d.bias" in state:
                yield b + "ssm_conv1d.bias", get(p + "conv1d.bias")
            yield b + "ssm_dt.bias", get(p + "dt_bias")
            yield b + "ssm_a", (-torch.exp(get(p + "A_log"))).unsqueeze(1)
            yield b + "ssm_d", get(p + "D").unsqueeze(1)
            norm = get(p + "norm.weight")
            yield b + "ssm_norm.weight", norm.reshape(groups, norm.numel() // groups)
            yield b + "ssm_out.weight", get(p + "out_proj.weight")
        elif kind == "*":
            for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                                 ("o_proj", "attn_output")):
                yield f"{b}{theirs}.weight", get(f"{p}{ours}.weight")
        else:
            for ours, theirs in (("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                yield f"{b}{theirs}.weight", get(f"{p}{ours}.weight")
                if f"{p}{ours}.bias" in state:
                    yield f"{b}{theirs}.bias", get(f"{p}{ours}.bias")
    yield "output_norm.weight", get("norm_f.weight")
    if "lm_head.weight" in state:  # tied: llama.cpp reuses token_embd
        yield "output.weight", get("lm_head.weight")


def _transformer_tensors(model: HybridLM, *, interleave: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """llama / qwen2 / qwen3, ``model`` padded to uniform widths (llama.cpp refuses per-layer arrays for them); llama's
    q/k rows interleaved for its rotary convention."""
    config = model.config
    state = model.state_dict()

    def get(name: str) -> torch.Tensor:
        return state[name].detach().float().cpu().contiguous()

    yield "token_embd.weight", get("embeddings.weight")
    for k in range(config.num_layers // 2):
        a, m, b = f"layers.{2 * k}.", f"layers.{2 * k + 1}.", f"blk.{k}."
        heads = {"q_proj": config.attention_heads_list()[k], "k_proj": config.num_key_value_heads}
        yield b + "attn_norm.weight", get(a + "norm.weight")
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output")):
            for part in ("weight", "bias"):
                if f"{a}mixer.{ours}.{part}" in state:
                    w = get(f"{a}mixer.{ours}.{part}")
                    yield f"{b}{theirs}.{part}", interleave_rotary_rows(w, heads[ours]) if (
                        interleave and ours in heads) else w
        if config.qk_norm:
            yield b + "attn_q_norm.weight", get(a + "mixer.q_norm.weight")
            yield b + "attn_k_norm.weight", get(a + "mixer.k_norm.weight")
        yield b + "ffn_norm.weight", get(m + "norm.weight")
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            yield f"{b}{theirs}.weight", get(f"{m}mixer.{ours}.weight")
    yield "output_norm.weight", get("norm_f.weight")
    if "lm_head.weight" in state:
        yield "output.weight", get("lm_head.weight")


def storage_type(name: str, tensor: torch.Tensor, qtype: str) -> str:
    """The GGUF type one tensor is stored in: matrices take ``qtype``; vectors, the SSM parameters and
    the conv kernel stay f32; q8_0 needs rows that are a multiple of its 32-value block (else f16).

    >>> storage_type("blk.0.ffn_up.weight", torch.zeros(96, 64), "q8_0")
    'q8_0'
    >>> storage_type("blk.0.ffn_down.weight", torch.zeros(64, 96), "q8_0")
    'q8_0'
    >>> storage_type("blk.0.attn_q.weight", torch.zeros(64, 40), "q8_0")
    'f16'
    >>> storage_type("blk.0.ssm_conv1d.weight", torch.zeros(96, 4), "f16")
    'f32'
    """
    if tensor.dim() < 2 or "ssm_conv1d" in name or name.endswith(("ssm_a", "ssm_d", "ssm_norm.weight")):
        return "f32"
    if qtype == "q8_0" and tensor.shape[-1] % 32:
        return "f16"
    return qtype


def resolve_type(qtype: str, dtype: torch.dtype) -> str:
    """``auto`` keeps the weights' own precision (f32, f16 or bf16)."""
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}; use one of {', '.join(GGUF_TYPES)}")
    if qtype != "auto":
        return qtype
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "f32")


# -- tokenizer -----------------------------------------------------------------------------


def tokenizer_metadata(tokenizer_dir: str | os.PathLike, config: ModelConfig) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields for a byte-level BPE tokenizer (elasticlm's own tokenizers and
    GPT-2-style ones), padded with unused tokens up to the model's vocabulary."""
    file = Path(tokenizer_dir) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{tokenizer_dir} has no tokenizer.json, and a GGUF file carries its tokenizer")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} could not be read as a tokenizers JSON file ({exc})") from None
    pre = spec.get("pre_tokenizer") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("type") != "BPE":
        raise ConfigError(f"{file} is not a byte-level BPE tokenizer (model {model.get('type')}); GGUF export "
                          "writes only byte-level BPE vocabularies")
    pre_name = pre_tokenizer_name(pre, bool(merges), file)
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special", False):
            special.add(added["id"])
    if max(vocab.values()) >= config.vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{config.vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append("control" if i in special else "normal")
        else:
            tokens.append(f"[PAD{i}]")
            types.append("unused")
    fields: dict[str, Any] = {"model": "gpt2", "pre": pre_name, "tokens": tokens, "types": types,
                              "merges": merges or [UNREACHABLE_MERGE]}
    template = _chat_template(Path(tokenizer_dir))
    if template:
        fields["chat_template"] = template
    if model.get("unk_token") in vocab:
        fields["unknown_token_id"] = vocab[model["unk_token"]]
    return fields


def pre_tokenizer_name(pre: dict[str, Any], merges: bool, file: Path) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the way a tokenizers JSON splits text before BPE: ``gpt-2``
    for byte-level splitting on GPT-2's pattern (GPT-2, SmolLM, elasticlm's own), ``qwen2`` for Qwen2/Qwen3's
    pattern (as transformers' Qwen2 tokenizer writes it). Raises ConfigError for others, whose tokens llama.cpp
    would not reproduce."""
    if pre.get("type") == "ByteLevel":
        if merges and not pre.get("use_regex", True):
            raise ConfigError(f"{file} merges without splitting on GPT-2's pattern, which llama.cpp's byte-level "
                              "pre-tokenizers always do; its tokens would differ there")
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
            and (parts[0].get("pattern") or {}).get("Regex") == _qwen2_pattern()):
        return "qwen2"
    kinds = [p.get("type") for p in parts] if parts else pre.get("type")
    raise ConfigError(f"{file} splits text with a pre-tokenizer ({kinds}) that GGUF export does not map to "
                      "llama.cpp (byte-level GPT-2 or Qwen2 patterns only); its tokens would differ there")


def _qwen2_pattern() -> str | None:
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    except ImportError:
        return None
    return PRETOKENIZE_REGEX


def _chat_template(directory: Path) -> str | None:
    """The chat template in ``tokenizer_config.json``, or in ``chat_template.jinja`` (where transformers 5 saves it)."""
    try:
        template = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    jinja = directory / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template or None


# -- writing -------------------------------------------------------------------------------


def _nemotron_h_keys(writer: Any, config: ModelConfig) -> None:
    writer.add_context_length(1 << 20)  # no position embeddings: the converter's convention
    writer.add_block_count(config.num_layers)
    arrays = layer_arrays(config)
    writer.add_feed_forward_length(arrays["feed_forward_length"])
    writer.add_head_count(arrays["head_count"])
    writer.add_head_count_kv(arrays["head_count_kv"])
    writer.add_layer_norm_eps(config.norm_eps)
    heads = (MAMBA_KIND.heads(config) or [config.mamba.num_heads])[0]
    head_dim = (MAMBA_KIND.head_dims(config) or [config.mamba.head_dim])[0]
    writer.add_ssm_conv_kernel(config.mamba.conv_kernel)
    writer.add_ssm_inner_size(heads * head_dim)
    writer.add_ssm_state_size(config.mamba.state_size)
    writer.add_ssm_time_step_rank(heads)
    writer.add_ssm_group_count(config.mamba.n_groups)


def _transformer_keys(writer: Any, config: ModelConfig) -> None:
    """llama / qwen2 / qwen3 (``config`` padded to uniform widths): one block per decoder layer."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_layers // 2)
    writer.add_feed_forward_length(config.intermediate_sizes_list()[0])
    writer.add_head_count(config.attention_heads_list()[0])
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.attention_head_dim)
    writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)


def write_gguf(model: HybridLM, path: str | os.PathLike, tokenizer_dir: str | os.PathLike,
               qtype: str = "auto", name: str = "elasticlm") -> dict[str, int]:
    """Write ``model`` as one GGUF file at ``path`` (not atomic: callers write into a temporary
    directory). Returns how many tensors were stored in each GGUF type."""
    try:
        import gguf
        import numpy as np
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'elasticlm[gguf]'") from None
    arch = gguf_arch(model.config.family)
    reason = gguf_incompatibility(model.config)
    if reason:
        raise ConfigError(f"cannot export to GGUF (llama.cpp {arch}): {reason}")
    adapter = GGUF_WRITERS[model.config.family]
    model = adapter.prepare(model)
    config = model.config
    qtype = resolve_type(qtype, model.dtype)
    vocab = tokenizer_metadata(tokenizer_dir, config)

    writer = gguf.GGUFWriter(str(path), arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_embedding_length(config.hidden_size)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_key_length(config.attention_head_dim)
    writer.add_value_length(config.attention_head_dim)
    adapter.keys(writer, config)

    token_type = {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL,
                  "unused": gguf.TokenType.UNUSED}
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([token_type[t] for t in vocab["types"]])
    writer.add_token_merges(vocab["merges"])
    for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id), ("pad", config.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(False)  # training never saw a BOS token
    writer.add_add_eos_token(False)
    if "chat_template" in vocab:
        writer.add_chat_template(vocab["chat_template"])
    if "unknown_token_id" in vocab:
        writer.add_unk_token_id(vocab["unknown_token_id"])
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    ggml = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    counts: dict[str, int] = {}
    for tensor_name, tensor in adapter.tensors(model):
        kind = storage_type(tensor_name, tensor, qtype)
        counts[kind] = counts.get(kind, 0) + 1
        data: np.ndarray = tensor.numpy()
        if kind == "f32":
            writer.add_tensor(tensor_name, data)
        elif kind == "f16":
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, ggml[kind]), raw_dtype=ggml[kind])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return counts


# -- one writer per llama.cpp architecture -------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFWriter:
    """What is particular to one llama.cpp architecture: the GGUF export asks it and branches on nothing else."""

    arch: str  # general.architecture
    incompatibility: Callable[[ModelConfig], str | None]  # why a config cannot be written (None: it can)
    prepare: Callable[[HybridLM], HybridLM]  # the model as written (e.g. padded to one width per kind)
    tensors: Callable[[HybridLM], Iterator[tuple[str, torch.Tensor]]]  # (GGUF name, float32 tensor)
    keys: Callable[[Any, ModelConfig], None]  # the architecture's hyper-parameter keys


def _as_is(model: HybridLM) -> HybridLM:
    return model


def _transformer_writer(arch: str, *, biases: bool = False, qk_norm: bool = False,
                        interleave: bool = False) -> GGUFWriter:
    """llama.cpp's ``arch`` transformer: ``biases`` q/k/v biases (qwen2), ``qk_norm`` q/k norms (qwen3),
    ``interleave`` q/k rows in llama.cpp's rotary order (llama; the qwen converters keep transformers' order)."""
    return GGUFWriter(arch, partial(_transformer_incompatibility, biases=biases, qk_norm=qk_norm), padding.pad,
                      partial(_transformer_tensors, interleave=interleave), _transformer_keys)


# family (ModelConfig.family) → its writer; a family missing here is refused with a one-line reason
GGUF_WRITERS: dict[str, GGUFWriter] = {
    "nemotron_h": GGUFWriter(ARCH, _nemotron_h_incompatibility, _as_is, _nemotron_h_tensors, _nemotron_h_keys),
    "llama": _transformer_writer("llama", interleave=True),
    "qwen2": _transformer_writer("qwen2", biases=True),
    "qwen3": _transformer_writer("qwen3", qk_norm=True),
}


__all__ = ["ARCH", "DT_CLAMP_NOTE", "GGUF_FILE", "GGUF_TYPES", "GGUF_WRITERS", "GGUFWriter", "gguf_incompatibility",
           "gguf_tensors", "layer_arrays", "resolve_type", "storage_type", "tokenizer_metadata", "write_gguf"]
