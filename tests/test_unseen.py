"""Budgets never trained: the router's input mixed between neighbouring budgets, the cost solver when the mix
misses, and the verbs that accept such a budget while saying it was not trained."""

from __future__ import annotations

import json

import pytest
import torch
from test_deploy import elastic_checkpoint

import elasticlm
from elasticlm import ConfigError
from elasticlm.checkpoint import read_routing
from elasticlm.cli import main
from elasticlm.config import count_parameters
from elasticlm.elastic.unseen import load_router, solve, space_from_routing, untrained_subnet


@pytest.fixture
def checkpoint(tmp_path):
    return elastic_checkpoint(tmp_path)


def test_rebuilt_space_and_router_reproduce_the_trained_budgets(checkpoint):
    model = elasticlm.load(checkpoint)
    routing = read_routing(checkpoint)
    space = space_from_routing(model.config, routing)
    router = load_router(checkpoint, space)
    for i, entry in enumerate(routing["budgets"]):
        assert router.resolve(i).to_dict() == entry["subnet"]
        assert space.cost_of(router.resolve(i)) == entry["cost"]
        # a trained budget's own target mixes nothing else in, so it comes back unchanged
        subnet, info = untrained_subnet(space, router, entry["budget"], space.targets[i])
        assert subnet.to_dict() == entry["subnet"] and not info.solver


def test_untrained_budget_within_two_percent_nested_equals_extracted(checkpoint):
    deployed = elasticlm.Deployment.load(checkpoint)
    model = deployed.model
    parent = count_parameters(model.config)
    [label] = deployed.labels("0.6")
    assert label == "0.6" and label in deployed.untrained
    subnet = deployed.budgets[label]
    n = count_parameters(model.config, subnet)
    assert abs(n / (0.6 * parent) - 1) <= 0.02
    small = elasticlm.extract(model, subnet)
    assert small.num_parameters() == n == sum(p.numel() for p in small.parameters())
    ids = torch.randint(3, 260, (2, 11))
    with torch.no_grad():
        assert (model(ids, subnet) - small(ids)).abs().max() <= 1e-5 * small(ids).abs().max()
    with pytest.raises(ConfigError, match="no architecture of the elastic space"):
        deployed.label("0.02")


def test_solver_moves_the_axes_the_router_cares_least_about(checkpoint):
    model = elasticlm.load(checkpoint)
    space = space_from_routing(model.config, read_routing(checkpoint))
    target = 0.6 * count_parameters(model.config)
    full = {a.name: [0] * a.n_slots for a in space.axes}
    logits = {a.name: torch.zeros(a.n_slots, a.n_choices) for a in space.axes}
    logits["ffn"][:, 0] = 10.0  # the router wants the full FFN
    choices = solve(space, logits, full, target)
    assert abs(space.cost_of(space.subnet(choices)) / target - 1) <= 0.02
    assert choices["ffn"] == [0] * space.axis("ffn").n_slots
    logits["ffn"][:, 0] = 0.0
    logits["hidden"][:, 0] = 10.0  # now the hidden size instead
    choices = solve(space, logits, full, target)
    assert choices["hidden"] == [0] and abs(space.cost_of(space.subnet(choices)) / target - 1) <= 0.02
    # a router with no preference at all: everything starts full, the solver alone reaches the target
    zero = load_router(checkpoint, space)
    for p in zero.parameters():
        torch.nn.init.zeros_(p)
    subnet, info = untrained_subnet(space, zero, "0.6", target)
    assert info.solver and abs(space.cost_of(subnet) / target - 1) <= 0.02


def test_verbs_accept_an_untrained_budget_and_say_so(checkpoint, tmp_path, capsys, caplog):
    """(The CLI's logging prints warnings on stderr; under pytest they are captured by caplog.)"""
    assert main(["extract", "--checkpoint", str(checkpoint), "--budget", "0.6", "--out", str(tmp_path / "x")]) == 0
    assert "budget 0.6 was not trained" in caplog.text and "budget 0.6:" in capsys.readouterr().out
    caplog.clear()
    assert "**not trained**" in (tmp_path / "x" / "README.md").read_text()
    assert main(["generate", "--checkpoint", str(checkpoint), "--budget", "0.6", "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "3"]) == 0
    assert "was not trained" in caplog.text
    assert main(["eval", "--checkpoint", str(checkpoint), "--budgets", "0.85", "--tasks", "add", "--n", "1",
                 "--difficulty", "default", "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert "0.85" in report["untrained"] and report["points"][0]["series"] == "elastic, not trained"
    # a checkpoint without its router cannot
    (checkpoint / "router.safetensors").unlink()
    assert main(["extract", "--checkpoint", str(checkpoint), "--budget", "0.6", "--out", str(tmp_path / "y")]) == 2
    assert "untrained budgets need the router" in capsys.readouterr().err
