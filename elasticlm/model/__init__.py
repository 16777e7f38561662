"""The sliceable hybrid Mamba-2 / attention / MLP language model."""

from .cache import HybridCache
from .hybrid import HybridLM

__all__ = ["HybridCache", "HybridLM"]
