"""Evaluation: exact-match accuracy on the synthetic reasoning tasks, perplexity, per-budget reports."""

from .tasks import task_accuracy, task_table

__all__ = ["task_accuracy", "task_table"]
