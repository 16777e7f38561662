"""What one Hugging Face family needs to be read and written: a state-dict adapter (torchtitan's pattern).

Each family module (:mod:`~elasticlm.model.hf_nemotron_h`, :mod:`~elasticlm.model.hf_mamba2`,
:mod:`~elasticlm.model.hf_llama`) defines one subclass and an ``ADAPTER`` instance; :mod:`elasticlm.model.hf`
keeps the registry keyed by ``model_type`` and everything that is the same for every family (padding of
per-layer widths, routed experts one tensor each on disk, tied heads, transformers in memory). A new family is one
new module and one line in that registry; nothing else branches on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig

if TYPE_CHECKING:
    from .hybrid import HybridLM


class HFAdapter:
    """Config and tensor-name translation of one Hugging Face family (or of several that share a layout)."""

    architectures: dict[str, str]  # model_type → transformers class, e.g. {"llama": "LlamaForCausalLM"}
    # config.json keys transformers' config class derives itself and refuses as arguments (in-memory conversion)
    derived_keys: tuple[str, ...] = ()

    def config_from_hf(self, cfg: dict[str, Any]) -> ModelConfig:
        """The ModelConfig of the tensors a config.json describes (padded exports: the padded widths)."""
        raise NotImplementedError

    def incompatibility(self, config: ModelConfig) -> str | None:
        """Why ``config`` (uniform widths per layer kind) cannot be this family's config, or None if it can."""
        raise NotImplementedError

    def config_to_hf(self, config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
        """The config.json dict of ``config`` (uniform widths; :meth:`incompatibility` already None)."""
        raise NotImplementedError

    def name_from_hf(self, name: str, anchored: bool = False) -> str | None:
        """Our parameter name for a checkpoint key (None: a key we drop)."""
        raise NotImplementedError

    def state_to_hf(self, model: HybridLM) -> dict[str, torch.Tensor]:
        """``model``'s tensors (uniform widths) under the family's on-disk names."""
        raise NotImplementedError

    def in_memory_name(self, name: str) -> str:
        """The name transformers' model holds an on-disk key under (NemotronH: ``backbone.`` → ``model.``)."""
        return name


__all__ = ["HFAdapter"]
