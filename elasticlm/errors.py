"""Exceptions that carry a one-line, user-facing message.

The CLI prints ``error: <message>`` for these and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class ElasticLMError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(ElasticLMError, ValueError):
    """A model config, Subnet or option is invalid; the message names the field."""


class CheckpointError(ElasticLMError):
    """A checkpoint directory is missing, corrupt, truncated or of an unsupported kind."""


class OutputError(ElasticLMError):
    """An output path may not be written (exists, is an input, is being written, disk full, read-only, …)."""
