"""Deployment: a checkpoint loaded to run. The model only executes Subnets (:class:`~elasticlm.model.hybrid.HybridLM`
keeps no budgets, no provenance and no memo); what a checkpoint says about it lives here, in one object that
``generate``, ``serve``, ``eval`` and the lm-eval adapter share:

- its budgets (``elastic.json``: label → Subnet and target parameters), and those placed at run time that
  were never trained (:mod:`elasticlm.elastic.unseen`, marked as such);
- where it was read from (the tokenizer, the router, the routing metadata travel from there);
- the decode-time weight slices kept across requests (:class:`~elasticlm.model.slicing.SliceMemo`).

>>> import elasticlm
>>> plain = Deployment(elasticlm.HybridLM(elasticlm.preset("tiny")))
>>> plain.subnet() == Subnet.full(plain.config), plain.budgets
(True, {})
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load, read_budgets, save
from ..config import ModelConfig, Subnet, count_parameters, find_budget
from ..errors import ConfigError
from ..generate import generate
from ..model.gguf_import import hf_directory
from ..model.hybrid import HybridLM
from ..model.slicing import SliceMemo
from .unseen import UntrainedBudget, place_untrained


@dataclass(eq=False)
class Deployment:
    """The model of a checkpoint and what the checkpoint says about it (see the module docstring)."""

    model: HybridLM
    source: Path | None = None  # the directory the weights were read from (a .gguf file: the one it imported to)
    budgets: dict[str, Subnet] = field(default_factory=dict)  # label → the trained (or placed) sub-model
    targets: dict[str, float] = field(default_factory=dict)  # label → its target in parameters
    untrained: dict[str, UntrainedBudget] = field(default_factory=dict)  # the labels placed at run time
    memo: SliceMemo = field(default_factory=SliceMemo)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             serving: bool = False) -> Deployment:
        """:func:`elasticlm.load` of ``path`` with the checkpoint's budgets (none for a plain model)."""
        source = hf_directory(path)
        model = load(source, device=device, dtype=dtype, serving=serving)
        budgets, targets = read_budgets(source, model.config)
        return cls(model, source, budgets, targets)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def order(self) -> list[str]:
        """The budget labels, smallest target first."""
        return sorted(self.budgets, key=lambda b: self.targets.get(b, 0.0))

    # -- the one budget lookup ------------------------------------------------------------------------------------
    def trained(self, text: str | float) -> str:
        """The label of the loaded budget ``text`` names — its label or the same target written another way
        (``"0.5"``, ``"50%"``, ``"780K"``); ConfigError otherwise."""
        self._need_budgets()
        return find_budget(self.targets, str(text), count_parameters(self.config))

    def label(self, text: str | float) -> str:
        """:meth:`trained`, else a budget never trained, placed by the router and the cost solver, added under
        the label ``text`` and marked as untrained (:mod:`elasticlm.elastic.unseen`)."""
        try:
            return self.trained(text)
        except ConfigError as unknown:
            if not self.budgets:
                raise
            try:
                label, subnet, target, info = place_untrained(self.config, self.source, str(text))
            except ConfigError as why:
                raise ConfigError(f"{unknown}; as an untrained budget: {why}") from None
            self.budgets[label], self.targets[label], self.untrained[label] = subnet, target, info
            return label

    def labels(self, text: str) -> list[str]:
        """``all`` (the budgets loaded) or the one budget :meth:`label` finds."""
        self._need_budgets()
        return list(self.budgets) if text.strip().lower() == "all" else [self.label(text)]

    def subnet(self, budget: str | float | None = None) -> Subnet:
        """The Subnet of ``budget`` (:meth:`label`); the full model for None."""
        return Subnet.full(self.config) if budget is None else self.budgets[self.label(budget)]

    def _need_budgets(self) -> None:
        if not self.budgets:
            raise ConfigError(f"{self.source or 'the model'} is not an elastic checkpoint (no elastic.json); "
                              "--budget needs the final/ directory (or a checkpoint) of `elasticlm train`")

    # -- running --------------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, *, budget: str | float | None = None, subnet: Subnet | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """:func:`elasticlm.generate` at a budget (nested: views of these weights, no copy) or an explicit Subnet,
        with this deployment's weight slices kept for the next call."""
        if budget is not None:
            if subnet is not None:
                raise ValueError("give budget or subnet, not both")
            subnet = self.subnet(budget)
        return generate(self.model, input_ids, subnet=subnet, memo=self.memo, **kwargs)

    def save(self, path: str | os.PathLike, format: str = "native", **kwargs: Any) -> Path:
        """:func:`elasticlm.save` of the model with the tokenizer it was loaded with (the weights only: a budget
        is saved by ``elasticlm.save(elasticlm.extract(d.model, d.subnet(budget)), …)`` or ``elasticlm extract``)."""
        kwargs.setdefault("tokenizer_dir", self.source)
        return save(self.model, path, format, **kwargs)

    def num_parameters(self, budget: str | float | None = None) -> int:
        """Exact parameter count of the parent or of ``budget``'s sub-model."""
        return count_parameters(self.config, None if budget is None else self.subnet(budget))


__all__ = ["Deployment"]
