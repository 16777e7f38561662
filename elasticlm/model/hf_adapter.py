"""What one Hugging Face family needs to be read and written: a state-dict adapter (torchtitan's pattern).

Each family module (:mod:`~elasticlm.model.hf_nemotron_h`, :mod:`~elasticlm.model.hf_mamba2`,
:mod:`~elasticlm.model.hf_llama`, :mod:`~elasticlm.model.hf_mistral`) defines its functions and one ``ADAPTER``
bundling them; :mod:`elasticlm.model.hf` builds the registry keyed by ``model_type`` from the family table
(``config.FAMILIES``) and keeps everything that is the same for every family (padding of per-layer widths, routed
experts one tensor each on disk, tied heads, transformers in memory). A new family is one new module and one line
in that table; nothing else branches on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig

if TYPE_CHECKING:
    from .hybrid import HybridLM


def same_name(name: str) -> str:
    return name


@dataclass(frozen=True)
class HFAdapter:
    """Config and tensor-name translation of one Hugging Face family (or of several that share a layout)."""

    architectures: dict[str, str]  # model_type → transformers class, e.g. {"llama": "LlamaForCausalLM"}
    # config.json → the ModelConfig of the tensors it describes (padded exports: the padded widths)
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    # why a config with uniform widths per layer kind cannot be this family's, or None
    incompatibility: Callable[[ModelConfig], str | None]
    # the config.json dict of such a config
    config_to_hf: Callable[[ModelConfig, torch.dtype], dict[str, Any]]
    # our parameter name for a checkpoint key (None: a key we drop); the flag marks a cache-anchored export
    name_from_hf: Callable[[str, bool], str | None]
    # a model's tensors (uniform widths) under the family's on-disk names
    state_to_hf: Callable[[HybridLM], dict[str, torch.Tensor]]
    # the name transformers' model holds an on-disk key under (NemotronH: ``backbone.`` → ``model.``)
    in_memory_name: Callable[[str], str] = same_name
    # config.json keys transformers' config class derives itself and refuses as arguments (in-memory conversion)
    derived_keys: tuple[str, ...] = ()


__all__ = ["HFAdapter", "same_name"]
