"""Budgets never trained: a sub-model for a target between (or beside) the trained budgets.

A trained budget within 2 % of the target is used as it is. Between two trained budgets, the search starts
from the smaller one's architecture and widens one slot at a time, never past the larger one's choice on any
axis, taking at each step the widening that costs the least router logit per parameter under the router's
input mixed between the two budgets (weights linear in cost), until the cost is within 2 %. Outside the
trained range the mixed (extrapolated) input's own argmax is used, moved by the same solver without bounds
when it misses. Measured on the demo (docs/deployment.md): such sub-models are worse than the next smaller
*trained* budget — the nested prefixes are good in the combinations that were trained together.

Nothing here is trained: the result is marked as such wherever it is used (`eval`, `extract`, `generate`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, Subnet, count_parameters, parse_budget
from ..errors import CheckpointError, ConfigError
from .router import BAND, Router, solve
from .space import Axis, ElasticSpace, parse_memory_budget

log = logging.getLogger(__name__)

TOLERANCE = BAND


@dataclasses.dataclass(frozen=True)
class UntrainedBudget:
    """How an untrained budget's Subnet was found (for logs, model cards and reports)."""

    label: str
    target: float
    cost: float
    between: tuple[str, str]
    weight: float  # of the second neighbour in the router's input
    solver: bool  # True: the cost solver placed it (the mixed input's own choice was not kept)
    method: str = "mixed"  # "trained" (a trained budget within 2 %), "between" or "mixed": see untrained_subnet

    def describe(self) -> str:
        mix = f"router input {1 - self.weight:.2f}×{self.between[0]} + {self.weight:.2f}×{self.between[1]}"
        if self.method == "trained":
            how = f"budget {self.between[0]}'s trained architecture is within {TOLERANCE:.0%} of it"
        elif self.method == "between":
            how = (f"every axis between budgets {self.between[1]} and {self.between[0]}, widened from "
                   f"{self.between[1]} where the {mix} prefers")
        else:
            how = mix + (", then moved by the cost solver" if self.solver else "")
        return (f"budget {self.label} was not trained: {how}; cost {self.cost:,.0f} = "
                f"{self.cost / self.target - 1:+.2%} of the target {self.target:,.0f}")


def space_from_routing(config: ModelConfig, routing: dict[str, Any]) -> ElasticSpace:
    """The ElasticSpace an elastic checkpoint was trained with, rebuilt from its ``elastic.json``."""
    try:
        axes = tuple(Axis(a["name"], tuple(a["layers"]), tuple(tuple(v) for v in a["values"]),
                          bool(a.get("heterogeneous", False))) for a in routing["axes"])
        budgets = tuple(b["budget"] for b in routing["budgets"])
        targets = tuple(float(b["target"]) for b in routing["budgets"])
        memory = tuple((routing.get("memory") or {}).items())
        return ElasticSpace(config, budgets, targets, axes, routing.get("target", "params"), memory,
                            bool(routing.get("keep_attention", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"elastic.json does not describe the router's axes ({exc})") from None


def load_router(directory: str | Path, space: ElasticSpace) -> Router:
    """The trained router of an elastic checkpoint (its hidden size read from the weights)."""
    from safetensors.torch import load_file

    from ..checkpoint import ROUTER_WEIGHTS

    file = Path(directory) / ROUTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{directory} has no {ROUTER_WEIGHTS}; untrained budgets need the router")
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{file} could not be read ({str(exc).splitlines()[0]})") from None
    first = next((v for k, v in state.items() if k.endswith("net.0.weight")), None)
    if first is None:
        raise CheckpointError(f"{file} holds no router weights")
    router = Router(space, hidden=first.shape[0])
    try:
        router.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file} does not match elastic.json's axes ({str(exc).splitlines()[0]})") from None
    return router.eval()


def mixed_input(targets: tuple[float, ...], target: float) -> tuple[torch.Tensor, int, int, float]:
    """The router input for ``target``, the two trained budgets it mixes (costs nearest around it; the two
    nearest on one side outside the range) and the weight of the second, linear in cost.

    >>> x, i, j, w = mixed_input((1000.0, 750.0, 500.0), 600.0)
    >>> [round(v, 2) for v in x.tolist()], i, j, round(w, 2)
    ([0.0, 0.4, 0.6], 1, 2, 0.6)
    """
    order = sorted(range(len(targets)), key=lambda k: targets[k])
    if len(order) < 2:
        raise ConfigError("untrained budgets need at least two trained budgets to interpolate between")
    pos = next((p for p in range(1, len(order)) if targets[order[p]] >= target), len(order) - 1)
    lo, hi = order[pos - 1], order[pos]
    weight = (target - targets[hi]) / (targets[lo] - targets[hi])  # of `lo`; outside [0, 1] it extrapolates
    x = torch.zeros(len(targets))
    x[lo], x[hi] = weight, 1 - weight
    return x, hi, lo, float(weight)


def choice_logits(router: Router, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: net(x.to(next(net.parameters()).dtype)) for name, net in router.axes.items()}


def untrained_subnet(space: ElasticSpace, router: Router, label: str, target: float,
                     tolerance: float = TOLERANCE) -> tuple[Subnet, UntrainedBudget]:
    """The Subnet for ``target`` (a cost in the space's unit) and how it was found.

    A trained budget whose architecture is within ``tolerance`` is used as it is. Between two trained budgets
    every axis stays between their choices: the search starts from the smaller
    budget's architecture and widens, slot by slot, where the router's mixed input prefers, until the cost is
    within ``tolerance`` (the trained sub-models are nested prefixes, so this walks from one trained model
    towards the next). Outside the trained range, or when that walk cannot reach the target, the mixed input's
    own argmax is used, moved by the unconstrained solver when it misses.
    """
    x, i, j, weight = mixed_input(space.targets, target)
    for b, trained in enumerate(space.budgets):  # a trained architecture close enough beats any other
        subnet = router.resolve(b)
        if abs(space.cost_of(subnet) / target - 1) <= tolerance:
            return subnet, UntrainedBudget(label, target, space.cost_of(subnet), (trained, trained), 0.0, False,
                                           "trained")
    logits = choice_logits(router, x)
    if 0.0 <= weight <= 1.0:
        wide, narrow = router.resolved_choices(i), router.resolved_choices(j)
        bounds = {a.name: [(min(w, n), max(w, n)) for w, n in zip(wide[a.name], narrow[a.name], strict=True)]
                  for a in space.axes}
        try:
            choices = solve(space, logits, narrow, target, tolerance, bounds=bounds)
        except ConfigError:
            choices = None
        if choices is not None:
            subnet = space.subnet(choices)
            return subnet, UntrainedBudget(label, target, space.cost_of(subnet), (space.budgets[i], space.budgets[j]),
                                           weight, True, "between")
    choices = {k: z.argmax(-1).tolist() for k, z in logits.items()}
    cost = space.cost_of(space.subnet(choices))
    solver = abs(cost / target - 1) > tolerance
    if solver:
        choices = solve(space, logits, choices, target, tolerance)
    subnet = space.subnet(choices)
    return subnet, UntrainedBudget(label, target, space.cost_of(subnet), (space.budgets[i], space.budgets[j]),
                                   weight, solver, "mixed")


def parse_target(space: ElasticSpace, text: str) -> float:
    """``text`` as a cost in the space's unit (parameters, active parameters, or deployment bytes)."""
    if space.target in ("params", "active"):
        return float(parse_budget(text.strip(), int(space.cost_of(Subnet.full(space.config)))))
    return float(parse_memory_budget(text.strip(), space.cost_of(Subnet.full(space.config))))


def place_untrained(config: ModelConfig, source: str | Path | None,
                    text: str) -> tuple[str, Subnet, float, UntrainedBudget]:
    """Budget ``text`` of the elastic checkpoint at ``source`` that was not trained: its label (``text``), the
    Subnet the router and the cost solver place there, its target in parameters and how it was found (logged).
    Raises ConfigError when the checkpoint has no router or no architecture of its space comes within 2 %."""
    from ..checkpoint import read_routing

    routing = read_routing(source) if source is not None else None
    if routing is None:
        raise ConfigError("not an elastic checkpoint")
    space = space_from_routing(config, routing)
    target = parse_target(space, text)
    label = text.strip()
    subnet, info = untrained_subnet(space, load_router(source, space), label, target)
    subnet.validate(config)
    log.warning(info.describe())
    return label, subnet, float(count_parameters(config, subnet) if space.target != "params" else target), info


__all__ = ["UntrainedBudget", "load_router", "mixed_input", "parse_target", "place_untrained", "solve",
           "space_from_routing", "untrained_subnet"]
