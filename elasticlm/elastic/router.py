"""The router (DESIGN 2.4): per budget, one choice per elastic axis, learned jointly with the model.

One small network per axis reads the one-hot of the target budget and emits logits over that
axis' choices (one row per layer for a heterogeneous axis). Logits are multiplied by a scale that
rises 1 → 10 and fed to a Gumbel-softmax whose temperature falls 1.0 → 0.05, so choices sharpen
over training. Two ways to let the language-model loss reach the router:

* ``hard`` (default): the argmax choice is executed by *slicing* (compute follows the sub-model's
  size); the chosen option's straight-through value (1 in the forward pass, the gradient of its
  probability in the backward pass) is a scalar gate multiplied onto the sliced outputs.
* ``soft``: the full-width model runs with nested masks; an axis' mask is the probability-weighted
  staircase ``m[c] = Σ_j y_j · [c < width_j]``.
* ``st``: straight-through over the mask. The forward pass runs the full-width model with the *one-hot*
  staircase of the argmax choice, which equals the sliced sub-model exactly (the norms count the kept
  channels only); the backward pass takes the gradient of the soft staircase. The loss's gradient with
  respect to every channel's mask then reaches every choice's probability, so the router learns how the
  loss would change with a wider or narrower choice, not only whether to scale the chosen one (``hard``'s
  scalar gate). Costs full-width compute, like ``soft``.

The budget loss ``|E[cost] / target − 1|`` uses the noise-free probabilities at the current scale
and temperature; :meth:`Router.resolve` (argmax) names each budget's Subnet after training.
The router knows nothing of the model beyond the Subnet and the multipliers it hands over.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Subnet
from ..errors import ConfigError
from ..kinds import kind_of
from ..model.hybrid import Modulation
from .space import ROUTER_MODES, ElasticSpace

BAND = 0.02  # a budget's architecture counts as on target within ±2 % of its parameter (or memory) target
PRESSURE_CAP = 1e3  # the budget loss's largest weight; a budget that reaches it is projected (Router.project)


@dataclass(frozen=True)
class RouterSchedule:
    """Logit scale (linear) and Gumbel temperature (geometric) from start to end over ``steps``.

    >>> s = RouterSchedule(steps=100, scale=(1.0, 10.0), temperature=(1.0, 0.05))
    >>> s.scale_at(0), s.scale_at(100), round(s.temperature_at(50), 4)
    (1.0, 10.0, 0.2236)
    """

    steps: int
    scale: tuple[float, float] = (1.0, 10.0)
    temperature: tuple[float, float] = (1.0, 0.05)

    def progress(self, step: int) -> float:
        return min(1.0, max(0.0, step / max(1, self.steps)))

    def scale_at(self, step: int) -> float:
        a, b = self.scale
        return a + (b - a) * self.progress(step)

    def temperature_at(self, step: int) -> float:
        a, b = self.temperature
        return a * (b / a) ** self.progress(step)


@dataclass
class Routing:
    """One budget's routing for one step: the Subnet to run and the multipliers to run it with."""

    budget: int
    subnet: Subnet
    choices: dict[str, list[int]]
    modulation: Modulation


def straight_through(y: torch.Tensor) -> torch.Tensor:
    """The one-hot of ``y``'s argmax (last axis) in the forward pass, ``y``'s gradient in the backward pass.

    >>> y = torch.tensor([[0.2, 0.7, 0.1]], requires_grad=True)
    >>> straight_through(y).tolist()
    [[0.0, 1.0, 0.0]]
    """
    hard = torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(y)
    return hard + y - y.detach()


def gumbel_noise(shape: tuple[int, ...], seed: int, *key: int) -> torch.Tensor:
    """Gumbel(0, 1) noise that depends only on ``(seed, *key)``: every rank of a distributed run
    draws the same noise for the same step and budget, so all ranks run the same Subnet."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).float()


def _axis_key(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _default_pressure(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Routers saved before the budget-loss pressure existed load with every budget at weight 1."""
    if prefix + "pressure" not in state_dict:
        state_dict[prefix + "pressure"] = torch.ones(len(module.space.budgets), dtype=torch.float64)


class AxisRouter(nn.Module):
    """Linear(n_budgets → hidden) → LeakyReLU → Linear(→ slots × choices)."""

    def __init__(self, n_budgets: int, slots: int, choices: int, hidden: int = 256) -> None:
        super().__init__()
        self.slots, self.choices = slots, choices
        self.net = nn.Sequential(nn.Linear(n_budgets, hidden), nn.LeakyReLU(), nn.Linear(hidden, slots * choices))
        nn.init.zeros_(self.net[2].weight)  # uniform choices at the start; the budget loss breaks the tie
        nn.init.zeros_(self.net[2].bias)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.net(onehot).view(self.slots, self.choices)

    def own_logits(self, budget: int) -> torch.Tensor:
        """The logits for ``budget``'s one-hot input (the same values as :meth:`forward`), with gradient only into
        that budget's own input weights (its column of the first layer): a loss on them moves no other budget."""
        first, last = self.net[0], self.net[2]
        hidden = nn.functional.leaky_relu(first.weight[:, budget] + first.bias.detach(), self.net[1].negative_slope)
        return nn.functional.linear(hidden, last.weight.detach(), last.bias.detach()).view(self.slots, self.choices)


class Router(nn.Module):
    def __init__(self, space: ElasticSpace, hidden: int = 256, mode: str = "hard") -> None:
        super().__init__()
        if mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {', '.join(ROUTER_MODES)}, got {mode!r}")
        self.space, self.mode = space, mode
        n = len(space.budgets)
        self.axes = nn.ModuleDict({a.name: AxisRouter(n, a.n_slots, a.n_choices, hidden) for a in space.axes})
        self.register_buffer("targets", torch.tensor(space.targets, dtype=torch.float64), persistent=False)
        # per-budget weight of the budget loss, raised while a budget's architecture stays off target (see
        # update_pressure); saved with the router so that a resumed run continues with it
        self.register_buffer("pressure", torch.ones(n, dtype=torch.float64))
        self.register_load_state_dict_pre_hook(_default_pressure)

    @property
    def n_budgets(self) -> int:
        return len(self.space.budgets)

    def logits(self, budget: int) -> dict[str, torch.Tensor]:
        """Raw logits ``[slots, choices]`` per axis for budget index ``budget``."""
        device = next(self.parameters()).device if len(self.axes) else torch.device("cpu")
        onehot = torch.zeros(self.n_budgets, device=device)
        onehot[budget] = 1.0
        return {name: net(onehot) for name, net in self.axes.items()}

    def probabilities(self, budget: int, scale: float, temperature: float) -> dict[str, torch.Tensor]:
        return {k: torch.softmax(z * scale / temperature, dim=-1) for k, z in self.logits(budget).items()}

    def resolve(self, budget: int) -> Subnet:
        """The budget's sub-model: the most probable choice of every axis."""
        with torch.no_grad():
            return self.space.subnet({k: z.argmax(-1).tolist() for k, z in self.logits(budget).items()})

    def resolved_choices(self, budget: int) -> dict[str, list[int]]:
        with torch.no_grad():
            return {k: z.argmax(-1).tolist() for k, z in self.logits(budget).items()}

    def budget_loss(self, scale: float, temperature: float, seed: int = 0, step: int = 0,
                    samples: int = 8, tolerance: float = 0.0) -> tuple[torch.Tensor, list[float]]:
        """Mean over budgets of ``E_y |cost(y) / target − 1|`` over ``samples`` Gumbel-softmax draws
        ``y`` (soft, at the current scale and temperature); also each budget's noise-free E[cost].

        Averaging the deviation of *sampled* costs, rather than taking the deviation of the mean
        cost, penalises the spread: a 50/50 mix of two hidden sizes can have the right mean but never
        a right draw. So the optimum is a committed choice per axis whose exact cost is on target,
        and the argmax Subnet lands on its budget (the deviation of the mean alone leaves the coarse
        axes mixed until the temperature freezes them, often several percent off). ``tolerance``: a
        deviation up to it costs nothing (``max(0, |dev| − tolerance)``), so inside that band only the
        language-model loss moves the choices.
        """
        losses, costs = [], []
        for b in range(self.n_budgets):
            logits = self.logits(b)
            with torch.no_grad():
                mean = self.space.expected_cost({k: torch.softmax(z.double() * scale / temperature, -1)
                                                 for k, z in logits.items()})
            costs.append(float(mean))
            draws = {name: torch.softmax((z.double() * scale + torch.stack([gumbel_noise(
                tuple(z.shape), seed, step, b, k, _axis_key(name)) for k in range(samples)]).to(
                z.device, torch.float64)) / temperature, -1) for name, z in logits.items()}  # [samples, slots, choices]
            deviation = (self.space.expected_cost(draws) / self.targets[b] - 1).abs()
            loss = (deviation - tolerance).clamp(min=0).mean() if tolerance else deviation.mean()
            losses.append(self.pressure[b] * loss)
        if not losses:
            return torch.zeros(()), costs
        return torch.stack(losses).mean().float(), costs

    def project(self, budget: int, band: float = BAND, max_iterations: int = 1_000, step_size: float = 0.05
                ) -> bool:
        """Move ``budget``'s argmax onto the nearest architecture within ``band`` of its target, by editing only
        that budget's own router weights (its column of each axis network's first layer; no other budget
        moves). Why: the budget loss reaches the logits through softmax probabilities; once the router's logits
        have saturated (large margins × a rising scale) its gradient falls below Adam's epsilon and no weight on
        it moves the argmax — seen on Llama and MoE parents, stuck 3–4 % off target for the last 80 % of a run.
        The architecture is :func:`solve`'s: from the current argmax, the moves that give up the least logit per
        unit of cost, so the router's learned preferences choose which axis pays. The edit is normalised
        gradient descent on a cross-entropy towards it, until the argmax is it. Returns whether anything
        moved."""
        logits = self.logits(budget)
        with torch.no_grad():
            current = {k: z.argmax(-1).tolist() for k, z in logits.items()}
            try:
                target = solve(self.space, {k: z.detach() for k, z in logits.items()}, current,
                               float(self.targets[budget]), band)
            except ConfigError:  # no architecture of the space within the band: nothing to project on
                return False
        if target == current:
            return False
        labels = {k: torch.tensor(v, device=logits[k].device) for k, v in target.items()}
        columns = [net.net[0].weight for net in self.axes.values()]
        with torch.enable_grad():
            for _ in range(max_iterations):
                own = {k: net.own_logits(budget) for k, net in self.axes.items()}
                if all(own[k].argmax(-1).tolist() == target[k] for k in own):
                    break
                loss = sum(nn.functional.cross_entropy(z, labels[k], reduction="sum") for k, z in own.items())
                grads = torch.autograd.grad(loss, columns, allow_unused=True)
                with torch.no_grad():
                    for w, g in zip(columns, grads, strict=True):
                        if g is not None:
                            w[:, budget] -= step_size * g[:, budget] / g[:, budget].norm().clamp(min=1e-12)
        return True

    def deviation(self, budget: int) -> float:
        """How far ``budget``'s argmax architecture is from its target: cost / target − 1."""
        return self.space.cost_of(self.resolve(budget)) / float(self.targets[budget]) - 1

    @torch.no_grad()
    def update_pressure(self, rate: float, band: float = BAND, cap: float = PRESSURE_CAP) -> list[float]:
        """Raise budget ``b``'s weight in :meth:`budget_loss` by ``1 + rate`` (up to ``cap``) while its argmax
        architecture misses the target by more than ``band``, and let it fall back towards 1 by ``1 − rate``
        once inside (dual ascent on the constraint |cost / target − 1| ≤ band). Why: under ``st`` the
        language-model loss reaches every choice's probability and pulls towards wider ones; at a fixed weight
        the two gradients can balance with the architecture several percent over its budget, and stay there.
        A budget whose weight reaches ``cap`` stays there: the weight no longer moves its argmax, so from then on
        :meth:`project_saturated` puts it back after every update that leaves it off target. Returns each
        budget's deviation."""
        deviations = []
        for b in range(self.n_budgets):
            dev = self.deviation(b)
            deviations.append(dev)
            if rate <= 0 or float(self.pressure[b]) >= cap:
                continue
            if abs(dev) > band:
                self.pressure[b] = min(cap, float(self.pressure[b]) * (1 + rate))
            else:
                self.pressure[b] = max(1.0, float(self.pressure[b]) * (1 - rate))
        return deviations

    def project_saturated(self, band: float = BAND, cap: float = PRESSURE_CAP) -> list[tuple[int, float]]:
        """:meth:`project` every budget whose pressure is at ``cap`` and whose argmax is off target by more than
        ``band``. Call it after the optimizer step: a projection made before it is undone by the very step whose
        gradient (computed on the old architecture) and Adam momentum pull the other way — seen in a demo run
        as the same 0.961 × target projected twice in a row. Returns the projected budgets and their deviations
        before the projection."""
        projected = []
        for b in range(self.n_budgets):
            if float(self.pressure[b]) < cap:
                continue
            dev = self.deviation(b)
            if abs(dev) > band and self.project(b, band):
                projected.append((b, dev))
        return projected

    def fit_budgets(self, steps: int, lr: float = 3e-3, scale: float = 1.0, temperature: float = 1.0,
                    seed: int = 0) -> float:
        """Train the router on the budget loss alone (a warm start before elastic training, so every
        budget begins on an architecture of its size instead of a uniform mix). Returns the loss."""
        if all(len(axis.values) == 1 for axis in self.space.axes):  # one architecture: nothing to fit
            return float(self.budget_loss(scale, temperature, seed, -1)[0].detach())
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        loss = torch.zeros(())
        for step in range(steps):
            loss, _ = self.budget_loss(scale, temperature, seed, -1 - step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())

    def route(self, budget: int, scale: float, temperature: float, seed: int, step: int) -> Routing:
        """Sample this step's routing for ``budget`` (Gumbel noise keyed by seed, step and budget)."""
        soft: dict[str, torch.Tensor] = {}
        for name, z in self.logits(budget).items():
            noise = gumbel_noise(tuple(z.shape), seed, step, budget, -1, _axis_key(name)).to(z)
            soft[name] = torch.softmax((z * scale + noise) / temperature, dim=-1)
        choices = {k: y.argmax(-1).tolist() for k, y in soft.items()}
        if self.mode == "hard":
            return Routing(budget, self.space.subnet(choices), choices, self._gates(soft, choices))
        if self.mode == "st":
            soft = {k: straight_through(y) for k, y in soft.items()}
        return Routing(budget, Subnet.full(self.space.config), choices, self._staircase(soft))

    # -- multipliers ------------------------------------------------------------------------
    def _gates(self, soft: dict[str, torch.Tensor], choices: dict[str, list[int]]) -> Modulation:
        """Straight-through scalars: 1 in the forward pass, d(probability of the choice) backward."""
        def gate(name: str, slot: int) -> torch.Tensor:
            y = soft[name][slot, choices[name][slot]]
            return y - y.detach() + 1.0

        cfg = self.space.config
        block: list[torch.Tensor | None] = [None] * cfg.num_layers
        for axis in self.space.axes:
            if axis.name == "hidden":
                continue
            for s, layer in enumerate(axis.layers if axis.name != "depth" else range(cfg.num_layers)):
                g = gate(axis.name, s if axis.heterogeneous else 0)
                block[layer] = g if block[layer] is None else block[layer] * g
        embedding = gate("hidden", 0) if "hidden" in soft else None
        return Modulation(embedding=embedding, block=block)

    def _staircase(self, soft: dict[str, torch.Tensor]) -> Modulation:
        """Soft nested masks over the full widths."""
        cfg, space = self.space.config, self.space
        dev = next(iter(soft.values())).device if soft else torch.device("cpu")

        def stair(y: torch.Tensor, widths: list[int], full: int) -> torch.Tensor:
            steps = (torch.arange(full, device=dev)[None, :] < torch.tensor(widths, device=dev)[:, None]).to(y)
            return y @ steps  # [full]

        hidden = None
        if "hidden" in soft:
            hidden = stair(soft["hidden"][0], [v[0] for v in space.axis("hidden").values], cfg.hidden_size)
        keep: list[torch.Tensor | None] = [None] * cfg.num_layers
        if "depth" in soft:
            axis = space.axis("depth")
            table = torch.tensor([[float(i not in space.dropped_layers(v[0])) for i in range(cfg.num_layers)]
                                  for v in axis.values], device=dev)
            p = soft["depth"][0] @ table
            keep = [p[i] for i in range(cfg.num_layers)]

        def layer_stair(name: str, layer: int, full: int) -> torch.Tensor | None:
            axis = space.axis(name)
            if axis is None:
                return None
            s = axis.layers.index(layer)
            y = soft[name][s if axis.heterogeneous else 0]
            return stair(y, [v[s] for v in axis.values], full)

        inner: list[torch.Tensor | None] = [None] * cfg.num_layers
        for i in range(cfg.num_layers):  # each kind's mask over its inner layout (elasticlm.kinds)
            kind = kind_of(cfg.pattern[i])
            run = kind.inner(cfg, cfg.layer_widths(i))
            units = layer_stair(kind.fields[run.unit], i, run.per_group) if run.unit else None
            entries = layer_stair(kind.fields[run.entry], i, run.inner) if run.entry else None
            inner[i] = run.mask(units, entries)
        block: list[torch.Tensor | None] = []
        for i in range(cfg.num_layers):
            parts = [t for t in (keep[i], hidden) if t is not None]
            block.append(math.prod(parts[1:], start=parts[0]) if parts else None)
        return Modulation(embedding=hidden, block=block, inner=inner,
                          norm_width=hidden.sum() if hidden is not None else None)


def solve(space: ElasticSpace, logits: dict[str, torch.Tensor], choices: dict[str, list[int]], target: float,
          tolerance: float = BAND, max_moves: int = 2_000,
          bounds: dict[str, list[tuple[int, int]]] | None = None) -> dict[str, list[int]]:
    """Move ``choices`` one slot step at a time until the cost is within ``tolerance`` of ``target``. Each move
    goes in the needed direction and is the one that loses the least router logit per unit of cost moved
    among those that do not overshoot the tolerance band; when all overshoot, the one landing nearest."""
    choices = {k: list(v) for k, v in choices.items()}
    seen = {choice_key(choices)}
    for _ in range(max_moves):
        cost = space.cost_of(space.subnet(choices))
        if abs(cost / target - 1) <= tolerance:
            return choices
        shrink = cost > target
        moves = []
        for axis in space.axes:
            z = logits[axis.name]
            for s in range(axis.n_slots):
                j = choices[axis.name][s]
                k = j + 1 if shrink else j - 1  # choices are ordered widest first
                low, high = bounds[axis.name][s] if bounds else (0, axis.n_choices - 1)
                if not low <= k <= high:
                    continue
                trial = {**choices, axis.name: choices[axis.name][:s] + [k] + choices[axis.name][s + 1:]}
                after = space.cost_of(space.subnet(trial))
                if ((after >= cost) if shrink else (after <= cost)) or choice_key(trial) in seen:
                    continue
                overshoot = after < target * (1 - tolerance) if shrink else after > target * (1 + tolerance)
                moves.append((overshoot, float(z[s, j] - z[s, k]) / abs(cost - after), abs(after / target - 1),
                              trial))
        if not moves:
            break
        inside = [m for m in moves if not m[0]]
        choices = min(inside, key=lambda m: m[1])[3] if inside else min(moves, key=lambda m: m[2])[3]
        seen.add(choice_key(choices))
    cost = space.cost_of(space.subnet(choices))
    if abs(cost / target - 1) > tolerance:
        raise ConfigError(f"no architecture of the elastic space comes within {tolerance:.0%} of {target:,.0f} "
                          f"(closest found: {cost:,.0f}); choose a budget nearer the trained ones")
    return choices


def choice_key(choices: dict[str, list[int]]) -> tuple:
    return tuple((k, tuple(v)) for k, v in sorted(choices.items()))


__all__ = ["ROUTER_MODES", "Router", "RouterSchedule", "Routing", "gumbel_noise", "solve", "straight_through"]
