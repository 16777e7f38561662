"""Data: document sources, packing, the synthetic reasoning blend."""

from .datasets import DataConfig, PackedStream, documents
from .synthetic import Example, blend, eval_set

__all__ = ["DataConfig", "Example", "PackedStream", "blend", "documents", "eval_set"]
