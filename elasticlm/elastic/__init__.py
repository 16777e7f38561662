"""Elastic machinery built on the model: extraction now; importance, routing later."""

from .extract import extract

__all__ = ["extract"]
