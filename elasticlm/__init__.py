"""elasticlm: many nested model sizes from one hybrid Mamba-2/attention language model."""

from .checkpoint import load, save
from .config import AttentionWidth, MambaWidth, MlpWidth, ModelConfig, MoeWidth, Subnet, count_parameters, preset
from .elastic.deployment import Deployment
from .elastic.extract import extract
from .errors import CheckpointError, ConfigError, ElasticLMError
from .generate import generate
from .model.hybrid import HybridLM

__version__ = "0.1.0"

__all__ = [
    "AttentionWidth", "CheckpointError", "ConfigError", "Deployment", "ElasticLMError", "HybridLM", "MambaWidth",
    "MlpWidth", "ModelConfig", "MoeWidth", "Subnet", "count_parameters", "extract", "generate", "load", "preset",
    "save", "__version__",
]
