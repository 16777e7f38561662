"""Elastic training: space, cost model under the router, router schedules and budget loss,
straight-through gradients, soft masks, KD loss, exact resume across stages, DDP == 1 process."""

from __future__ import annotations

import json
import math
import os
import random
import socket

import pytest
import torch
from conftest import max_rel, randomize_, tiny_config

import elasticlm
from elasticlm import CheckpointError, ConfigError, Subnet
from elasticlm.cli import main
from elasticlm.config import MlpWidth, count_parameters
from elasticlm.elastic.router import Router, RouterSchedule, _axis_key, gumbel_noise
from elasticlm.elastic.space import ElasticConfig, ElasticSpace, memory_bytes
from elasticlm.model.hybrid import HybridLM, Modulation
from elasticlm.tokenizer import byte_level_tokenizer, save_tokenizer
from elasticlm.train.checkpoint import latest
from elasticlm.train.config import elastic_run_config_from_tables
from elasticlm.train.distributed import rows_of
from elasticlm.train.elastic import ElasticStudent, kd_loss, sample_budgets, train_elastic

PATTERN = "M*-M-*-M"


def ordered_config(**kw):
    cfg = tiny_config(PATTERN, hidden=48, **kw)
    cfg.depth_order = [4, 2, 6, 0, 7, 1, 3, 5]
    return cfg


def one_hot_probs(space: ElasticSpace, choices: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    out = {}
    for a in space.axes:
        p = torch.zeros(a.n_slots, a.n_choices, dtype=torch.float64)
        for s, j in enumerate(choices[a.name]):
            p[s, j] = 1
        out[a.name] = p
    return out


def random_choices(space: ElasticSpace, rng: random.Random) -> dict[str, list[int]]:
    return {a.name: [rng.randrange(a.n_choices) for _ in range(a.n_slots)] for a in space.axes}


# -- space and cost ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["params", "memory"])
@pytest.mark.parametrize("hetero", [[], ["ffn", "mamba_heads", "attention_heads"]])
def test_expected_cost_is_exact_for_one_hot_and_matches_extracted_models(target, hetero, rng):
    cfg = ordered_config()
    space = ElasticSpace.build(cfg, ElasticConfig(target=target, heterogeneous=hetero, memory_context=512))
    model = HybridLM(cfg)
    for _ in range(10):
        choices = random_choices(space, rng)
        subnet = space.subnet(choices)
        extracted = elasticlm.extract(model, subnet)
        n = sum(p.numel() for p in extracted.parameters())
        assert count_parameters(cfg, subnet) == n
        exact = n if target == "params" else memory_bytes(cfg, subnet, context=512)["total"]
        assert space.cost_of(subnet) == exact
        assert float(space.expected_cost(one_hot_probs(space, choices))) == pytest.approx(exact, rel=1e-12)


def test_expected_cost_equals_enumeration_under_random_probabilities():
    cfg = ordered_config()
    ec = ElasticConfig(hidden=[1.0, 0.5], ffn=[1.0, 0.5], mamba_heads=[1.0, 0.5], mamba_head_dim=[1.0],
                       attention_heads=[1.0, 0.5], depth=[1.0, 0.75])
    space = ElasticSpace.build(cfg, ec)
    g = torch.Generator().manual_seed(0)
    probs = {a.name: torch.softmax(torch.randn(a.n_slots, a.n_choices, generator=g, dtype=torch.float64), -1)
             for a in space.axes}
    import itertools

    total = 0.0
    grids = [range(a.n_choices) for a in space.axes]
    for combo in itertools.product(*grids):
        p = math.prod(float(probs[a.name][0, j]) for a, j in zip(space.axes, combo, strict=True))
        total += p * space.cost_of(space.subnet({a.name: [j] for a, j in zip(space.axes, combo, strict=True)}))
    assert float(space.expected_cost(probs)) == pytest.approx(total, rel=1e-12)


def test_default_choice_sets_follow_the_parent():
    space = ElasticSpace.build(ordered_config(), ElasticConfig())
    names = [a.name for a in space.axes]
    assert names == ["hidden", "mamba_heads", "mamba_head_dim", "attention_heads", "ffn", "depth"]
    assert space.axis("hidden").values[0] == (48,) and space.axis("hidden").values[-1] == (24,)
    assert space.axis("depth").values == ((8,), (7,), (6,))
    assert all(v[0] % 1 == 0 for v in space.axis("ffn").values) and space.axis("ffn").values[0] == (48, 48, 48)
    assert space.targets == (count_parameters(space.config), round(0.75 * count_parameters(space.config)),
                             round(0.5 * count_parameters(space.config)))


@pytest.mark.parametrize("ec, needle", [
    (dict(budgets=[]), "non-empty"),
    (dict(budgets=[1.0, 1.0]), "twice"),
    (dict(budgets=["banana"]), "not a fraction"),
    (dict(budgets=[0.01]), "smallest model"),
    (dict(ffn=[]), "non-empty"),
    (dict(ffn=[0]), "must be in"),
    (dict(hidden=[1.5]), "must be in (0, 1]"),
    (dict(attention_heads=[99]), "must be in [1,"),
    (dict(heterogeneous=["hidden"]), "cannot be per-layer"),
    (dict(target="flops"), "params, active or memory"),
    (dict(router_mode="gumbel"), "hard, soft or st"),
    (dict(temperature=[1.0]), "[start, end]"),
])
def test_bad_elastic_spaces_are_rejected(ec, needle):
    with pytest.raises(ConfigError) as err:
        ElasticSpace.build(ordered_config(), ElasticConfig(**ec))
    assert needle in str(err.value)


def test_depth_choices_need_an_importance_ordered_parent():
    cfg = tiny_config(PATTERN, hidden=48)
    with pytest.raises(ConfigError, match="reorder"):
        ElasticSpace.build(cfg, ElasticConfig())
    ElasticSpace.build(cfg, ElasticConfig(depth=[1.0]))  # no layer dropped: fine


# -- router ------------------------------------------------------------------------------------


def test_router_schedules():
    s = RouterSchedule(steps=200, scale=(1.0, 10.0), temperature=(1.0, 0.05))
    assert s.scale_at(0) == 1.0 and s.scale_at(100) == pytest.approx(5.5) and s.scale_at(200) == 10.0
    assert s.temperature_at(0) == 1.0 and s.temperature_at(200) == pytest.approx(0.05)
    assert s.temperature_at(100) == pytest.approx(math.sqrt(0.05))
    assert s.scale_at(10_000) == 10.0  # clamped past the end
    temps = [s.temperature_at(i) for i in range(201)]
    assert all(a > b for a, b in zip(temps, temps[1:], strict=False))


def test_gumbel_noise_is_keyed_and_gumbel_distributed():
    a, b = gumbel_noise((4, 5), 0, 7, 1), gumbel_noise((4, 5), 0, 7, 1)
    assert torch.equal(a, b) and not torch.equal(a, gumbel_noise((4, 5), 0, 8, 1))
    big = gumbel_noise((200_000,), 3, 1)
    assert float(big.mean()) == pytest.approx(0.5772, abs=0.01)  # Euler–Mascheroni
    assert float(big.var()) == pytest.approx(math.pi**2 / 6, rel=0.03)


def test_budget_loss_drives_every_resolved_subnet_within_two_percent():
    space = ElasticSpace.build(ordered_config(), ElasticConfig(budgets=[1.0, 0.75, 0.5]))
    router = Router(space, hidden=64)
    before = [space.cost_of(router.resolve(b)) / t for b, t in enumerate(space.targets)]
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    sched = RouterSchedule(300)
    for step in range(300):
        loss, _ = router.budget_loss(sched.scale_at(step), sched.temperature_at(step), 0, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [space.cost_of(router.resolve(b)) / t for b, t in enumerate(space.targets)]
    assert max(abs(r - 1) for r in before) > 0.2  # uniform logits resolve to the largest choices
    assert all(abs(r - 1) <= 0.02 for r in after), after


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_budget_pressure_brings_a_budget_pulled_wider_back_on_target(rate):
    """A stand-in for st's language-model gradient pulls every budget towards wider choices; at a fixed budget-loss
    weight the router settles far over its targets, with the pressure (dual ascent) back within 2 %."""
    space = ElasticSpace.build(ordered_config(), ElasticConfig(budgets=[1.0, 0.75, 0.5]))
    torch.manual_seed(0)
    router = Router(space, hidden=64)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    sched = RouterSchedule(150)
    for step in range(150):
        scale, temp = sched.scale_at(step), sched.temperature_at(step)
        loss, _ = router.budget_loss(scale, temp, 0, step)
        pull = sum(space.expected_cost(router.probabilities(b, scale, temp)) / t for b, t in enumerate(space.targets))
        opt.zero_grad()
        (loss - 0.5 * pull / len(space.targets)).backward()
        router.update_pressure(rate)
        opt.step()
    after = [space.cost_of(router.resolve(b)) / t - 1 for b, t in enumerate(space.targets)]
    if rate == 0:
        assert max(after) > 0.2, after
    else:
        assert max(abs(d) for d in after) <= 0.02, after
        assert router.pressure.max().item() < 2.0  # relaxed again once on target
    # saved with the router; a router saved before the pressure existed still loads
    state = router.state_dict()
    assert "pressure" in state
    fresh = Router(space, hidden=64)
    fresh.load_state_dict({k: v for k, v in state.items() if k != "pressure"})
    assert torch.equal(fresh.pressure, torch.ones(3, dtype=torch.float64))


def test_a_saturated_router_is_projected_back_on_target(monkeypatch):
    """A strong pull saturates the router's logits far over target before the pressure starts; the budget loss's
    gradient then vanishes and the pressure caps without moving the argmax (seen on Llama and MoE parents). The
    projection (at the cap) puts each stuck budget within 2 % at once, moving no other budget."""
    space = ElasticSpace.build(ordered_config(), ElasticConfig(budgets=[1.0, 0.75, 0.5]))
    torch.manual_seed(0)
    router = Router(space, hidden=64)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    sched, first, unstick = RouterSchedule(150), 40, 90
    monkeypatch.setattr(router, "project", lambda *args, **kw: False)  # first: the pressure alone, up to its cap

    def deviations() -> list[float]:
        return [space.cost_of(router.resolve(b)) / t - 1 for b, t in enumerate(space.targets)]

    for step in range(120):  # of a 150-step schedule: scale 8.2, temperature 0.09 at the end
        if step == first:
            stuck = deviations()
            assert min(stuck[1:]) > 0.2 and stuck[0] == 0, stuck
        if step == unstick:
            assert router.pressure[1:].min().item() == 1e3 and deviations() == stuck  # the pressure alone: nothing
            monkeypatch.undo()
        if step > unstick:
            assert max(abs(d) for d in deviations()) <= 0.02  # projected in one update, and held after every one
        scale, temp = sched.scale_at(step), sched.temperature_at(step)
        loss, _ = router.budget_loss(scale, temp, 0, step)
        pull = sum(space.expected_cost(router.probabilities(b, scale, temp)) / t for b, t in enumerate(space.targets))
        opt.zero_grad()
        (loss - (5.0 if step < first else 0.5) * pull / len(space.targets)).backward()
        router.update_pressure(0.0 if step < first else 0.5)
        opt.step()
        router.project_saturated()  # after the step, as the trainer does
    after = deviations()
    assert max(abs(d) for d in after) <= 0.02, after
    assert after[0] == 0.0  # the full budget was never moved by the others' projection


def test_hard_routing_runs_the_sliced_subnet_and_gradients_reach_the_router():
    cfg = ordered_config()
    model = randomize_(HybridLM(cfg))
    space = ElasticSpace.build(cfg, ElasticConfig())
    router = Router(space, hidden=32)
    with torch.no_grad():  # give the router non-trivial logits
        for p in router.parameters():
            p.normal_(0, 0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    routing = router.route(2, scale=3.0, temperature=0.7, seed=0, step=5)
    out = model(ids, routing.subnet, modulation=routing.modulation)
    plain = model(ids, routing.subnet)
    assert max_rel(out.detach(), plain.detach()) < 1e-6  # gates are exactly 1 in the forward pass
    out.square().mean().backward()
    for name, net in router.axes.items():
        grad = net.net[2].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the same step and budget give the same Subnet (ranks agree), another step may not
    assert router.route(2, 3.0, 0.7, 0, 5).subnet == routing.subnet


def test_soft_staircase_with_one_hot_choices_equals_slicing_for_ffn_and_attention():
    cfg = ordered_config()
    model = randomize_(HybridLM(cfg))
    ec = ElasticConfig(hidden=[1.0], mamba_heads=[1.0], mamba_head_dim=[1.0], depth=[1.0],
                       ffn=[1.0, 0.5], attention_heads=[1.0, 0.5], router_mode="soft", budgets=[1.0])
    space = ElasticSpace.build(cfg, ec)
    router = Router(space, mode="soft")
    soft = {a.name: torch.nn.functional.one_hot(torch.zeros(a.n_slots, dtype=torch.long), a.n_choices).float()
            for a in space.axes}
    soft["ffn"][0] = torch.tensor([0.0, 1.0])
    soft["attention_heads"][0] = torch.tensor([0.0, 1.0])
    mod = router._staircase(soft)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    masked = model(ids, modulation=mod)
    sliced = model(ids, space.subnet({"ffn": [1], "attention_heads": [1]}))
    assert max_rel(masked, sliced) < 1e-5


@pytest.mark.parametrize("heterogeneous", [[], ["ffn", "mamba_heads", "mamba_head_dim", "attention_heads"]])
def test_soft_staircase_with_one_hot_choices_equals_slicing_on_every_axis(heterogeneous):
    """Hidden size (every RMSNorm over the kept channels), Mamba heads and head dims (masked inside the gated
    group norm), attention heads, FFN and depth: one-hot soft masks over the full model give the sliced
    sub-model's logits, for random choices on every axis at once."""
    cfg = ordered_config()
    model = randomize_(HybridLM(cfg))
    ec = ElasticConfig(hidden=[1.0, 0.75, 0.5], mamba_heads=[1.0, 0.5], mamba_head_dim=[1.0, 0.75, 0.5],
                       attention_heads=[1.0, 0.5], ffn=[1.0, 0.5, 0.25], depth=[1.0, 0.75],
                       heterogeneous=heterogeneous, router_mode="soft", budgets=[1.0])
    space = ElasticSpace.build(cfg, ec)
    router = Router(space, mode="soft")
    rng = random.Random(len(heterogeneous))
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    for _ in range(4):
        choices = {a.name: [rng.randrange(a.n_choices) for _ in range(a.n_slots)] for a in space.axes}
        soft = {k: v.float() for k, v in one_hot_probs(space, choices).items()}
        masked = model(ids, modulation=router._staircase(soft))
        sliced = model(ids, space.subnet(choices))
        assert max_rel(masked, sliced) < 1e-5, choices


def _ffn_toy(seed: int, mode: str):
    """A model distilled into its own FFN choices (full or half width; the full width has zero loss, so it is
    known to be better), with the half width chosen by a router whose half logit is far ahead."""
    cfg = ordered_config()
    torch.manual_seed(seed)
    model = HybridLM(cfg).double()  # float64: the finite differences below need it
    only_ffn = dict(hidden=[1.0], mamba_heads=[1.0], mamba_head_dim=[1.0], attention_heads=[1.0], depth=[1.0])
    space = ElasticSpace.build(cfg, ElasticConfig(ffn=[1.0, 0.5], router_mode=mode, budgets=[1.0], **only_ffn))
    router = Router(space, mode=mode)
    with torch.no_grad():
        router.axes["ffn"].net[2].bias.copy_(torch.tensor([0.0, 6.0]))
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        teacher = model(ids).log_softmax(-1)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="batchmean")

    routing = router.route(0, 1.0, 1.0, seed, 0)
    assert routing.choices["ffn"] == [1]
    loss = loss_of(model(ids, routing.subnet, modulation=routing.modulation))
    loss.backward()
    return model, space, router, ids, loss_of, loss, router.axes["ffn"].net[2].bias.grad


def _faded_ffn_loss(model: HybridLM, ids: torch.Tensor, loss_of, t: float) -> float:
    """The loss with every FFN's lower half of neurons on and its upper half scaled by ``t``."""
    cfg = model.config
    inner: list[torch.Tensor | None] = [None] * cfg.num_layers
    for i, kind in enumerate(cfg.pattern):
        if kind == "-":
            full = cfg.layer_widths(i).intermediate_size
            inner[i] = torch.cat([torch.ones(full // 2), torch.full((full - full // 2,), t)]).double()
    return loss_of(model(ids, modulation=Modulation(inner=inner))).item()


def test_straight_through_mask_gradient_is_the_finite_difference_slope_towards_the_wider_choice():
    """``st``: the forward pass is the sliced half-width model; the gradient on the full-width logit is
    y_full·y_half times the loss's slope when the upper FFN neurons are faded in (finite differences over
    explicit masks, no router involved)."""
    for seed in range(3):
        model, space, router, ids, loss_of, loss, grad = _ffn_toy(seed, "st")
        half = space.subnet({"ffn": [1]})
        with torch.no_grad():
            assert abs(loss.item() - loss_of(model(ids, half)).item()) <= 1e-9
            eps = 1e-3
            slope = (_faded_ffn_loss(model, ids, loss_of, eps) - _faded_ffn_loss(model, ids, loss_of, -eps)) / (2 * eps)
            # the Gumbel-softmax probabilities this step's routing used (scale 1, temperature 1)
            noise = gumbel_noise((1, 2), seed, 0, 0, -1, _axis_key("ffn"))
            y = torch.softmax(router.axes["ffn"].net[2].bias + noise[0], -1)
        assert grad[0].item() == pytest.approx((y[0] * y[1]).item() * slope, rel=2e-2, abs=1e-7)
        assert grad[1].item() == pytest.approx(-grad[0].item(), rel=1e-5)


def test_router_gradient_prefers_the_choice_known_to_be_better_where_the_scalar_gate_guesses():
    """Over ten such toys, ``st`` and ``soft`` push towards the known-better full width (measured: 10 of 10
    each); ``hard``'s scalar gate, which only says whether to scale the chosen half-width output, does no better
    than chance (measured: 5 of 10). The slope is local: on toys with O(1) random weights and every axis elastic
    at once, ``st`` was right in 8-9 of 10 (docs/elastic.md)."""
    right = {mode: sum(bool(g[0] < 0 < g[1]) for g in (_ffn_toy(seed, mode)[-1] for seed in range(10)))
             for mode in ("st", "soft", "hard")}
    assert right["st"] >= 9 and right["soft"] >= 9 and right["hard"] < right["st"], right


def test_budget_tolerance_leaves_deviations_inside_the_band_unpenalised():
    cfg = ordered_config()
    space = ElasticSpace.build(cfg, ElasticConfig(budgets=[1.0, 0.7, 0.45]))
    torch.manual_seed(0)
    router = Router(space, hidden=32)
    router.fit_budgets(200, lr=1e-2)
    # nearly one-hot draws: each budget's deviation is its argmax architecture's, a fraction of a percent here
    _, costs = router.budget_loss(10.0, 0.05)
    deviations = [abs(c / t - 1) for c, t in zip(costs, space.targets, strict=True)]
    assert max(deviations) < 0.02 and max(deviations) > 0
    strict, _ = router.budget_loss(10.0, 0.05)
    lenient, _ = router.budget_loss(10.0, 0.05, tolerance=0.02)
    assert strict.item() > 0 and lenient.item() == 0.0
    with pytest.raises(ConfigError, match="budget_tolerance"):
        ElasticConfig(budget_tolerance=0.6).validate()


def test_soft_and_hard_modes_both_train():
    cfg = ordered_config()
    for mode in ("hard", "soft"):
        torch.manual_seed(0)
        teacher = randomize_(HybridLM(cfg)).requires_grad_(False)
        student = ElasticStudent(randomize_(HybridLM(cfg), seed=1),
                                 Router(ElasticSpace.build(cfg, ElasticConfig()), hidden=32, mode=mode))
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        ids = torch.randint(0, cfg.vocab_size, (6, 33))
        inputs, targets, keep = ids[:, :-1], ids[:, 1:], torch.ones(6, 32)
        with torch.no_grad():
            t = teacher(inputs)
        losses = []
        for step in range(30):
            loss, stats = student(inputs, None, keep, t, targets, [0, 1, 2, 0, 1, 2], step=step, seed=0, scale=1.0,
                                  temperature=1.0, kd_temperature=1.0, ce_weight=0.0, budget_weight=0.0, amp=None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, (mode, first, last)  # an untrained student stays near 1.0


# -- losses and batching -----------------------------------------------------------------------


def test_kd_loss_matches_a_naive_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    keep = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    for tau in (1.0, 2.0):
        naive = 0.0
        for i in range(2):
            for j in range(3):
                if keep[i, j]:
                    p = [math.exp(v / tau) for v in t[i, j].tolist()]
                    q = [math.exp(v / tau) for v in s[i, j].tolist()]
                    p = [x / sum(p) for x in p]
                    q = [x / sum(q) for x in q]
                    naive += sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)) * tau * tau
        assert float(kd_loss(s, t, keep, tau)) == pytest.approx(naive, rel=1e-5)
    assert float(kd_loss(t, t, keep)) == pytest.approx(0.0, abs=1e-6)


def test_budget_sampling_is_deterministic_and_follows_the_weights():
    a = sample_budgets([0.5, 0.3, 0.2], 20_000, seed=0, step=3)
    assert a == sample_budgets([0.5, 0.3, 0.2], 20_000, seed=0, step=3)
    assert a != sample_budgets([0.5, 0.3, 0.2], 20_000, seed=0, step=4)
    freq = [a.count(i) / len(a) for i in range(3)]
    assert freq == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    assert set(sample_budgets([0, 1, 0], 100, 0, 0)) == {1}


def test_micro_batch_rows_partition_the_global_batch_identically():
    one = [rows_of(0, 1, 2, a) for a in range(4)]  # 1 process, 4 accumulation steps
    two = [rows_of(r, 2, 2, a) for a in range(2) for r in range(2)]  # 2 ranks × 2 steps
    assert one == two and one[-1].stop == 8


def test_modulation_none_is_the_identity():
    cfg = ordered_config()
    model = randomize_(HybridLM(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    sub = Subnet.uniform(cfg, intermediate_size=24)
    mod = Modulation(embedding=torch.tensor(1.0), block=[torch.tensor(1.0)] * cfg.num_layers,
                     inner=[None] * cfg.num_layers)
    assert torch.equal(model(ids, sub, modulation=mod), model(ids, sub))
    assert isinstance(sub.layers[2], MlpWidth)


# -- the trainer -------------------------------------------------------------------------------


def make_parent(path):
    cfg = ordered_config(vocab_size=260)
    model = randomize_(HybridLM(cfg), seed=3)
    tok_dir = path.parent / "tok"
    save_tokenizer(byte_level_tokenizer(), tok_dir)
    elasticlm.save(model, path, tokenizer_dir=tok_dir)
    return path


def tables(parent, out, **train):
    return {
        "parent": {"path": str(parent)},
        "elastic": {"budgets": [1.0, 0.6], "router_hidden": 32, "router_init_steps": 50},
        "data": {"source": "synthetic", "mask_prompt": True},
        "train": {"out": str(out), "dtype": "float32", "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 100,
                  "val_batches": 1, "checkpoint_every": 2, "keep_checkpoints": 10, "tensorboard": False,
                  **train},
        "eval": {"tasks": False},
        "stages": [{"name": "a", "seq_len": 32, "batch_size": 4, "tokens": 3 * 128},
                   {"name": "b", "seq_len": 64, "batch_size": 2, "tokens": 3 * 128,
                    "budget_weights": [0.7, 0.3]}],
    }


def logged(out, key="loss"):
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(path):
    return elasticlm.load(path).state_dict()


def test_resume_across_a_stage_boundary_continues_exactly(tmp_path, monkeypatch):
    parent = make_parent(tmp_path / "parent")
    train_elastic(elastic_run_config_from_tables(tables(parent, tmp_path / "straight")), progress=False)
    import elasticlm.train.trainer as trainer

    real = trainer.save_training_checkpoint

    def save_then_stop(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if path.name == "step_0000002":
            raise KeyboardInterrupt  # stopped in stage 1; the resume crosses into stage 2 at step 3

    monkeypatch.setattr(trainer, "save_training_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_elastic(elastic_run_config_from_tables(tables(parent, tmp_path / "split")), progress=False)
    monkeypatch.setattr(trainer, "save_training_checkpoint", real)
    assert latest(tmp_path / "split").name == "step_0000002"
    train_elastic(elastic_run_config_from_tables(tables(parent, tmp_path / "split")), resume=True, progress=False)
    a, b = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert len(a) == len(b) == 6 and logged(tmp_path / "split", "stage") == [1, 1, 1, 2, 2, 2]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    # the logged total splits into the language model's part and the weighted budget loss (one micro-step)
    weight = elastic_run_config_from_tables(tables(parent, tmp_path / "x")).elastic.budget_loss_weight
    lm, budget = logged(tmp_path / "straight", "lm_loss"), logged(tmp_path / "straight", "budget_loss")
    assert len(lm) == 6 and any(x > 0 for x in budget)
    assert [t - m for t, m in zip(a, lm, strict=True)] == pytest.approx([weight * x for x in budget], rel=1e-4,
                                                                         abs=1e-6)
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "split" / "final")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)
    meta = json.loads((tmp_path / "straight" / "final" / "elastic.json").read_text())
    assert [m["budget"] for m in meta["budgets"]] == ["1.0", "0.6"]
    for m in meta["budgets"]:
        assert count_parameters(weights_config(tmp_path), Subnet.from_dict(m["subnet"])) == m["parameters"]


def test_stage_checkpoint_branches_a_stage_two_ablation(tmp_path):
    parent = make_parent(tmp_path / "parent")
    train_elastic(elastic_run_config_from_tables(tables(parent, tmp_path / "straight")), progress=False)
    stage1 = tmp_path / "straight" / "stages" / "1-a"
    assert json.loads((stage1 / "trainer_state.json").read_text())["step"] == 3
    assert list(elasticlm.Deployment.load(stage1).budgets) == ["1.0", "0.6"]  # an evaluable elastic checkpoint
    # the same stage 2 from the stage-1 state reproduces the straight run
    train_elastic(elastic_run_config_from_tables(tables(parent, tmp_path / "same")), progress=False,
                  resume_from=stage1)
    assert logged(tmp_path / "same") == pytest.approx(logged(tmp_path / "straight")[3:], rel=1e-5, abs=1e-7)
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "same" / "final")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)
    # a different stage-2 budget sampling branches off the same state
    tabs = tables(parent, tmp_path / "uniform")
    tabs["stages"][1]["budget_weights"] = [0.0, 1.0]
    train_elastic(elastic_run_config_from_tables(tabs), progress=False, resume_from=stage1)
    kd = logged(tmp_path / "uniform", "kd_1.0")
    assert kd == [] and len(logged(tmp_path / "uniform", "kd_0.6")) == 3  # only the 0.6 budget trained
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train_elastic(elastic_run_config_from_tables(tables(parent, tmp_path / "x")), progress=False,
                      resume_from=tmp_path / "straight" / "final")


def test_separate_teacher_distills_a_fixed_student(tmp_path):
    """distill.teacher: KD of one (e.g. pruned) student from another model, as Minitron does per size."""
    parent = make_parent(tmp_path / "parent")

    def one_budget(out):
        tabs = tables(parent, out)
        tabs["elastic"].update(budgets=[1.0], depth=[1.0])
        tabs["stages"][1].pop("budget_weights")
        return tabs

    base = one_budget(tmp_path / "default")
    train_elastic(elastic_run_config_from_tables(base), progress=False)
    same = one_budget(tmp_path / "same")
    same["distill"] = {"teacher": str(parent)}
    train_elastic(elastic_run_config_from_tables(same), progress=False)
    assert logged(tmp_path / "same") == pytest.approx(logged(tmp_path / "default"), rel=1e-6)
    other = tmp_path / "other"
    elasticlm.save(randomize_(HybridLM(ordered_config(vocab_size=260)), seed=9), other, tokenizer_dir=tmp_path / "tok")
    diff = one_budget(tmp_path / "diff")
    diff["distill"] = {"teacher": str(other)}
    train_elastic(elastic_run_config_from_tables(diff), progress=False)
    assert logged(tmp_path / "diff")[0] != pytest.approx(logged(tmp_path / "default")[0], rel=1e-3)
    small_vocab = tmp_path / "v300"
    elasticlm.save(HybridLM(ordered_config(vocab_size=300)), small_vocab, tokenizer_dir=tmp_path / "tok")
    diff["distill"] = {"teacher": str(small_vocab)}
    diff["train"]["out"] = str(tmp_path / "bad")
    with pytest.raises(ConfigError, match="same vocabulary"):
        train_elastic(elastic_run_config_from_tables(diff), progress=False)
    with pytest.raises(ConfigError, match="exclude each other"):
        elastic_run_config_from_tables({**diff, "distill": {"teacher": str(other), "trainable_teacher": True}})


def weights_config(tmp_path):
    return elasticlm.load(tmp_path / "straight" / "final").config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, tabs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_elastic(elastic_run_config_from_tables(tabs), progress=False)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp+checkpointing"])
def test_two_process_run_matches_one_process_with_accumulation(tmp_path, parallel):
    """gloo on CPU; DDP replicates, FSDP2 shards every block of student and teacher. Under FSDP2 all rows of a
    micro-step across ranks share one budget (no rank runs a budget without rows): with grad_accum 1 that is
    one draw per step, which the single process gets from elastic.budget_rows."""
    parent = make_parent(tmp_path / "parent")
    single = tables(parent, tmp_path / "single", grad_accum=2)
    ckpt = parallel.endswith("+checkpointing")  # per-block recompute through FSDP2's hooks
    parallel = parallel.split("+")[0]
    if parallel == "fsdp":
        single["elastic"]["budget_rows"] = 1000
    train_elastic(elastic_run_config_from_tables(single), progress=False)
    ddp = tables(parent, tmp_path / "ddp", grad_accum=1, parallel=parallel, activation_checkpointing=ckpt)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), ddp), nprocs=2, join=True)
    a, b = logged(tmp_path / "single"), logged(tmp_path / "ddp")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    wa, wb = weights(tmp_path / "single" / "final"), weights(tmp_path / "ddp" / "final")
    assert max(max_rel(wb[k], wa[k]) for k in wa) < 1e-4


def test_cli_train_and_config_errors(tmp_path, capsys):
    parent = make_parent(tmp_path / "parent")
    cfg = tables(parent, tmp_path / "run")
    cfg["stages"] = [{"seq_len": 32, "batch_size": 2, "tokens": 128}]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    from elasticlm.train.config import load_elastic_run_config

    assert load_elastic_run_config(path, ["stages[0].tokens=256", "elastic.budgets=[1.0]"]).stages[0].steps == 4
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| 1.0 |" in out and "| 0.6 |" in out and (tmp_path / "run" / "final" / "router.safetensors").is_file()
    assert main(["train", "--config", str(path), "--no-progress"]) == 2  # refuses to overwrite checkpoints
    assert "--resume" in capsys.readouterr().err
    bad = [
        ({"parent": {}}, "[parent] path"),
        ({"stages": [{"seq_len": 32, "batch_size": 2, "tokens": 64, "budget_weights": [1.0]}]}, "budget_weights"),
        ({"stagez": []}, "unknown table"),
        ({"elastic": {"budgets": [1.0], "ffn": [2.0]}}, "elastic.ffn"),
    ]
    for patch, needle in bad:
        broken = {**cfg, **patch}
        path.write_text(json.dumps(broken))
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_trainable_teacher_adds_the_full_models_cross_entropy():
    cfg = ordered_config()
    model = randomize_(HybridLM(cfg))
    only_full = ElasticConfig(budgets=[1.0], hidden=[1.0], mamba_heads=[1.0], mamba_head_dim=[1.0],
                              attention_heads=[1.0], ffn=[1.0], depth=[1.0])
    student = ElasticStudent(model, Router(ElasticSpace.build(cfg, only_full), hidden=8))
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    inputs, targets, keep = ids[:, :-1], ids[:, 1:], torch.ones(3, 16)
    loss, _ = student(inputs, None, keep, None, targets, [0, 0, 0], step=0, seed=0, scale=10.0,
                      temperature=0.05, kd_temperature=1.0, ce_weight=0.5, budget_weight=0.0, amp=None)
    ce = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)  # KD of the full model vs itself is 0
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("elastic, distill", [({"router_mode": "soft"}, {}),
                                              ({"router_mode": "st", "heterogeneous": ["ffn"]}, {}),
                                              ({"heterogeneous": ["ffn"]}, {"trainable_teacher": True})])
def test_trainer_runs_soft_heterogeneous_and_trainable_teacher(tmp_path, elastic, distill):
    parent = make_parent(tmp_path / "parent")
    t = tables(parent, tmp_path / "run")
    t["elastic"].update(elastic, router_init_steps=200)
    t["distill"] = distill
    t["stages"] = [{"seq_len": 32, "batch_size": 4, "tokens": 3 * 128}]
    train_elastic(elastic_run_config_from_tables(t), progress=False)
    losses = logged(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    meta = json.loads((tmp_path / "run" / "final" / "elastic.json").read_text())
    assert all(abs(b["cost"] / b["target"] - 1) < 0.1 for b in meta["budgets"])


def _fsdp_worker(rank: int, world: int, port: int, tabs: dict, stop_after: str | None, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import elasticlm.train.trainer as trainer

    real = trainer.save_sharded_checkpoint

    def save_then_stop(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if path.name == stop_after:
            raise KeyboardInterrupt  # every rank stops here, as a killed job would

    trainer.save_sharded_checkpoint = save_then_stop
    try:
        train_elastic(elastic_run_config_from_tables(tabs), resume=resume, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        dist.destroy_process_group()


def test_fsdp_resume_from_sharded_checkpoints_continues_exactly(tmp_path):
    """2-process gloo FSDP2: stopped in stage 1, resumed from its torch.distributed.checkpoint shards (student,
    AdamW, router and its optimizer, data position, RNG), the run continues as if never stopped."""
    parent = make_parent(tmp_path / "parent")
    straight = tables(parent, tmp_path / "straight", parallel="fsdp")
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, _free_port(), straight, None, False), nprocs=2, join=True)
    split = tables(parent, tmp_path / "split", parallel="fsdp")
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, _free_port(), split, "step_0000002", False), nprocs=2,
                                join=True)
    ckpt = latest(tmp_path / "split")
    assert ckpt.name == "step_0000002" and (ckpt / "dcp" / ".metadata").is_file()
    assert not (tmp_path / "split" / "final").exists()
    with pytest.raises(CheckpointError, match="FSDP2 run"):  # its optimizer state is only in the shards
        train_elastic(elastic_run_config_from_tables({**split, "train": {**split["train"], "parallel": "ddp"}}),
                      resume=True, progress=False)
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, _free_port(), split, None, True), nprocs=2, join=True)
    a, b = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert len(a) == len(b) == 6 and logged(tmp_path / "split", "stage") == [1, 1, 1, 2, 2, 2]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    # the logged total splits into the language model's part and the weighted budget loss (one micro-step),
    # on every rank: the ranks' mean loss less the budget term they share
    weight = elastic_run_config_from_tables(tables(parent, tmp_path / "x")).elastic.budget_loss_weight
    lm, budget = logged(tmp_path / "straight", "lm_loss"), logged(tmp_path / "straight", "budget_loss")
    assert len(lm) == 6 and any(x > 0 for x in budget)
    assert [t - m for t, m in zip(a, lm, strict=True)] == pytest.approx([weight * x for x in budget], rel=1e-4,
                                                                         abs=1e-6)
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "split" / "final")
    assert max(max_rel(wb[k], wa[k]) for k in wa) < 1e-5


def test_under_fsdp_every_micro_step_has_one_budget_across_ranks():
    from elasticlm.train.distributed import rows_of
    from elasticlm.train.elastic import budget_per_row

    world, accum, micro = 4, 3, 2
    rows = world * accum * micro
    seen = set()
    for step in range(40):
        budgets = budget_per_row([0.5, 0.3, 0.2], rows, micro * world, seed=0, step=step)
        for a in range(accum):
            per_rank = [set(budgets[rows_of(r, world, micro, a)]) for r in range(world)]
            assert all(len(s) == 1 for s in per_rank) and len(set.union(*per_rank)) == 1
            seen |= per_rank[0]
    assert seen == {0, 1, 2}


def test_activation_checkpointing_in_the_trainer_changes_nothing_but_memory(tmp_path):
    parent = make_parent(tmp_path / "parent")
    for name, ckpt in (("plain", False), ("ckpt", True)):
        tabs = tables(parent, tmp_path / name, activation_checkpointing=ckpt)
        tabs["stages"] = tabs["stages"][:1]
        train_elastic(elastic_run_config_from_tables(tabs), progress=False)
    assert logged(tmp_path / "plain") == pytest.approx(logged(tmp_path / "ckpt"), rel=1e-6, abs=1e-7)
    wa, wb = weights(tmp_path / "plain" / "final"), weights(tmp_path / "ckpt" / "final")
    assert max(max_rel(wb[k], wa[k]) for k in wa) < 1e-5
