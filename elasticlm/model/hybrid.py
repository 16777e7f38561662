"""HybridLM: embeddings → blocks ``x + mixer(RMSNorm(x))`` → final norm → head.

``model(input_ids, subnet=None, cache=None)`` runs the parent, or the nested sub-model that
``subnet`` names, by slicing weight prefixes: compute and memory follow the sub-model's size.
The model knows nothing of routers or training; it only executes a Subnet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LayerWidth, ModelConfig, Subnet, count_parameters
from ..int8 import Int8Weight, embedding, linear
from ..int8 import weight as stored_weight  # float or int8
from ..kinds import kind_of
from .cache import HybridCache
from .call import MixerCall
from .documents import DocumentMask
from .norm import RMSNorm, rms_norm
from .rope import inverse_frequencies, rotary_tables
from .serving import decode_layout
from .slicing import SliceMemo, compact_copies, prefix

Device = torch.device | str | None


@dataclass
class Modulation:
    """Multipliers applied inside one forward pass. The model does not know where they come from
    (the elastic trainer's router: straight-through gates, or soft nested masks).

    ``embedding`` multiplies the embedding output (a scalar or a [hidden] vector); ``block[i]``
    multiplies block ``i``'s output before it joins the residual stream (scalar or [hidden]);
    ``inner[i]`` multiplies the mixer's inner activation just before its output projection
    (MLP: [ffn]; attention: [heads·head_dim]; Mamba: [heads·head_dim], head-major). ``None``
    anywhere means 1.
    """

    embedding: torch.Tensor | None = None
    block: list[torch.Tensor | None] | None = None
    inner: list[torch.Tensor | None] | None = None
    # Soft masks on the hidden axis: the active width (the mask's sum). Every RMSNorm then takes its mean
    # square over that many channels instead of the full hidden size, as the sliced model does.
    norm_width: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.kind = config.pattern[layer]
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
        mixer = kind_of(self.kind).mixer_class()  # the kind's module, built from the layer's full width
        self.mixer: nn.Module = mixer(config, config.layer_widths(layer), device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, width: LayerWidth, cache: HybridCache | None, layer: int,
                documents: DocumentMask | None = None, scale: torch.Tensor | None = None,
                inner: torch.Tensor | None = None, norm_width: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, memo: SliceMemo | None = None) -> torch.Tensor:
        # Blocks and mixers run through nn.Module.__call__, so forward hooks see them (importance scoring hooks the
        # block's input and output, the mixer's input and its tap; see elastic/importance.py).
        if cache is not None and cache.weights is not None:  # this block's slices, made once per generation
            if layer not in cache.weights:
                cache.weights[layer] = self.slices(layer, x.shape[-1], width, cache.memo)
            norm_weight, prm = cache.weights[layer]
        elif memo is not None:
            norm_weight, prm = self.slices(layer, x.shape[-1], width, memo)
        else:
            norm_weight, prm = prefix(self.norm.weight, 0, x.shape[-1]), None
        h = rms_norm(x, norm_weight, self.norm.eps, norm_width)
        h = self.mixer(h, width, MixerCall(cache, layer, documents, rotary, inner, prm))
        if scale is not None:
            h = h * scale
        return x + h

    def slices(self, layer: int, hidden: int, width: LayerWidth,
               memo: SliceMemo | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This block's norm weight and mixer parameters for one sub-model, for decoding: grouped prefixes as
        compact copies, kept in ``memo`` (the caller's, across generations) or made for this call only."""
        norm = prefix(self.norm.weight, 0, hidden)
        if memo is not None:
            return norm, memo.get((layer, hidden, width), self.mixer, lambda: self.mixer.sliced(hidden, width))
        prm = self.mixer.sliced(hidden, width)
        if torch.is_inference_mode_enabled():
            prm = compact_copies(prm, [*self.mixer.parameters(), *self.mixer.buffers()])
        return norm, prm

    def sliced(self, hidden: int, width: LayerWidth) -> dict[str, torch.Tensor]:
        out = {"norm.weight": prefix(self.norm.weight, 0, hidden)}
        out.update({f"mixer.{k}": v for k, v in self.mixer.sliced(hidden, width).items()})
        return out


Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HybridLM(nn.Module):
    sharded = False  # True once FSDP2 shards the blocks (see mark_sharded)
    # Per-block activation checkpointing while gradients are on: each block keeps only its input and
    # recomputes its inside during backward (activation memory ≈ one hidden state per block).
    activation_checkpointing = False

    def __init__(self, config: ModelConfig, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.embeddings = nn.Embedding(config.vocab_size, d, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.num_layers))
        self.norm_f = RMSNorm(d, config.norm_eps, device=device, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False,
                                                                          device=device, dtype=dtype)
        self._full = Subnet.full(config)
        self._checked: set[Subnet] = {self._full}
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # rotary models: inverse frequencies per device
        if torch.device(device or "cpu").type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (normal for projections and embeddings, Mamba-2's SSM init, residual
        output projections of Mamba layers scaled by 1/sqrt(layers) as transformers does)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:  # a kind's own init on top (Mamba-2: its SSM parameters, its gated norm)
            if hasattr(block.mixer, "init_kind_parameters"):
                block.mixer.init_kind_parameters()

    # -- running ------------------------------------------------------------------------------
    def check_subnet(self, subnet: Subnet | None) -> Subnet:
        if subnet is None:
            return self._full
        if subnet not in self._checked:
            subnet.validate(self.config)
            if len(self._checked) > 4096:  # sampled Subnets are many; keep the memo bounded
                self._checked = {self._full}
            self._checked.add(subnet)
        return subnet

    def positions(self, input_ids: torch.Tensor, cache: HybridCache | None,
                  documents: DocumentMask | None) -> torch.Tensor:
        """Position ids [batch or 1, seq] of the call's tokens: restarting at every packed document, counted
        from each row's first real token in left-padded batches, continuing from the cache's length."""
        t, device = input_ids.shape[1], input_ids.device
        if documents is not None:
            return documents.positions
        past = cache.seq_len if cache is not None else 0
        pos = torch.arange(past, past + t, device=device)[None]
        if cache is not None and cache.pad is not None:
            pos = (pos - cache.pad[:, None].to(device)).clamp(min=0)
        return pos

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = inverse_frequencies(self.config.rope_parameters or {},
                                                         self.config.attention_head_dim).to(device)
        return rotary_tables(self._inv_freq[device], positions, dtype)

    @property
    def device(self) -> torch.device:
        return self.norm_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its float weights'; an int8 model's scales')."""
        return self.norm_f.weight.dtype

    def head_weight(self) -> torch.Tensor | Int8Weight:
        return stored_weight(self.embeddings if self.lm_head is None else self.lm_head)

    def forward(self, input_ids: torch.Tensor, subnet: Subnet | None = None,
                cache: HybridCache | None = None, document_ids: torch.Tensor | None = None,
                modulation: Modulation | None = None, logits_to_keep: int = 0,
                head: Head | None = None, memo: SliceMemo | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of the parent or of ``subnet``.

        With ``cache`` the call continues from the tokens the cache has seen and updates it.
        ``document_ids`` ``[batch, seq]`` (packed training rows, see
        :func:`~elasticlm.model.documents.document_ids_from_eos`): every token sees only earlier
        tokens of its own document, exactly as if each document ran alone.
        ``logits_to_keep`` > 0 computes logits for the last that many positions only (prefill).
        ``head(hidden, weight)`` replaces the output projection: it receives the final norm's output
        ``[batch, seq, hidden]`` and the (sliced) head weight ``[vocab, hidden]`` and its result is
        returned — how the trainer computes a loss over token chunks without ever holding the whole
        ``[seq, vocab]`` logits (and, under FSDP2, while the head weight is gathered).
        ``memo`` (the caller's :class:`~elasticlm.model.slicing.SliceMemo`) keeps the sub-model's grouped weight
        copies between calls under inference mode; a cache carries its own.
        """
        subnet = self.check_subnet(subnet)
        if self.sharded:  # a sharded block's full parameters exist only inside its forward
            memo = None
        if cache is not None and cache.subnet != subnet:
            raise ValueError("this cache was created for a different Subnet; create one per Subnet")
        documents = None
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids are for packed training rows; they cannot be used with a cache")
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids {tuple(document_ids.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            documents = DocumentMask.from_ids(document_ids, self.config.mamba.conv_kernel)
        if cache is not None:
            cache.begin(input_ids.shape[1], input_ids.device)
        d = subnet.hidden_size
        x = embedding(input_ids, prefix(stored_weight(self.embeddings), 1, d))
        mod = modulation or Modulation()
        if mod.embedding is not None:
            x = x * mod.embedding
        rotary = None
        if self.config.rope_parameters is not None:
            rotary = self.rotary(self.positions(input_ids, cache, documents), x.dtype)
        for i, (block, width) in enumerate(zip(self.layers, subnet.layers, strict=True)):
            if width is not None:
                scale = mod.block[i] if mod.block is not None else None
                inner = mod.inner[i] if mod.inner is not None else None
                nw = mod.norm_width
                # through nn.Module.__call__, so module hooks (FSDP2's per-block all-gathers among them) run
                if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                    x = checkpoint(block, x, width, None, i, documents, scale, inner, nw, rotary,
                                   use_reentrant=False)
                else:
                    x = block(x, width, cache, i, documents, scale, inner, nw, rotary, memo)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        if mod.norm_width is not None:
            x = rms_norm(x, self.norm_f.weight[: x.shape[-1]], self.norm_f.eps, mod.norm_width)
        else:
            x = self.norm_f(x)
        weight = prefix(self.head_weight(), 1, d)
        return head(x, weight) if head is not None else linear(x, weight)

    @torch.no_grad()
    def use_decode_layout(self) -> HybridLM:
        """Store every projection in the layout that decodes fastest (column-major when it has more
        outputs than inputs, see :mod:`elasticlm.model.serving`); values, shapes, slicing, saving and
        training are unaffected. Nested budgets then decode within a few percent of their extracted
        models. ``elasticlm.load(..., serving=True)`` and ``elasticlm generate`` call it."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        tied = [stored_weight(self.embeddings)] if self.lm_head is None else []
        weights = [stored_weight(m) for m in linears] + tied
        for w in weights:
            if not isinstance(w, nn.Parameter):  # int8 weights stay row-major: the kernel reads whole rows
                continue
            w.data = decode_layout(w.data)
        return self

    def new_cache(self, subnet: Subnet | None = None, memo: SliceMemo | None = None) -> HybridCache:
        """A decoding state for ``subnet``; its weight slices come from ``memo`` when the caller keeps one."""
        sharded = self.sharded
        return HybridCache(self.config.num_layers, self.check_subnet(subnet), keep_weights=not sharded,
                           memo=None if sharded else memo)

    def mark_sharded(self) -> None:
        """Called once FSDP2 wraps the blocks: keep no slices or copies of parameters between calls (a sharded
        block's full parameters exist only inside its forward, between FSDP2's hooks)."""
        self.sharded = True

    # -- sizes ----------------------------------------------------------------------------------
    def num_parameters(self, subnet: Subnet | None = None) -> int:
        """Exact parameter count of the parent or of the sub-model ``subnet`` names."""
        return count_parameters(self.config, subnet)

    def sliced_state_dict(self, subnet: Subnet) -> dict[str, torch.Tensor]:
        """The sub-model's parameters under the extracted model's names (views where possible)."""
        subnet = self.check_subnet(subnet)
        d = subnet.hidden_size
        out = {"embeddings.weight": prefix(stored_weight(self.embeddings), 1, d),
               "norm_f.weight": prefix(self.norm_f.weight, 0, d)}
        if self.lm_head is not None:
            out["lm_head.weight"] = prefix(stored_weight(self.lm_head), 1, d)
        for new_index, old_index in enumerate(subnet.kept_layers):
            width = subnet.layers[old_index]
            assert width is not None
            for k, v in self.layers[old_index].sliced(d, width).items():
                out[f"layers.{new_index}.{k}"] = v
        return out


__all__ = ["HybridLM", "Block", "Modulation"]
