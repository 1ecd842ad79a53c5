"""The architecture stage: the space and its refusals, the budget's reward, the searchers
against numbers worked by hand, and a small search on digits (cached, budget kept)."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest

from models.registry import build_model, count_parameters
from models.space import to_model
from pipelines import data as data_stage
from pipelines.arch.searchers import EvolutionSampler, ReinforceSampler
from pipelines.arch.space import Budget, Candidate, decode, distributions, points
from pipelines.arch.stage import ArchContext, search
from pipelines.config.errors import ConfigError
from pipelines.config.loader import load_config
from pipelines.config.students import BudgetConfig
from pipelines.teacher.context import TeacherContext
from pipelines.teacher.fit import obtain_teacher

SPACE = {"mlp": {"depth": [1, 2], "width": [8, 16]}, "cnn": {"stages": [1], "width": [4], "depth": [1], "kernel": [3]}}


def test_every_point_is_an_ordinary_arch_and_kwargs():
    assert to_model("mlp", {"depth": 2, "width": 8}) == ("mlp", {"hidden": [8, 8]})
    assert to_model("cnn", {"stages": 3, "width": 4, "depth": 1, "kernel": 5}) == (
        "cnn", {"widths": [4, 8, 16], "depth": 1, "kernel": 5})
    assert to_model("resnet", {"depth": 14, "width": 8}) == ("resnet14", {"base_width": 8})
    assert len(points(SPACE)) == 5
    # A cnn of widths [4] on 1x8x8: conv 3x3 (1->4, 36 weights), GroupNorm (8), head 4->10 (50).
    arch, kwargs = to_model("cnn", {"stages": 1, "width": 4, "depth": 1, "kernel": 3})
    model = build_model(arch, (1, 8, 8), 10, **kwargs)
    assert count_parameters(model) == 36 + 8 + 50


def test_flat_parameters_decode_to_the_family_and_its_own_knobs():
    params = {"family": "mlp", "mlp.depth": 2, "mlp.width": 16, "cnn.stages": 1, "cnn.width": 4, "cnn.depth": 1,
              "cnn.kernel": 3}
    assert set(distributions(SPACE)) == set(params)
    assert decode(params, SPACE) == Candidate("mlp", (("depth", 2), ("width", 16)))


@pytest.mark.parametrize("setting, names", [
    ("arch_search.space={}", "arch_search.space is empty"),
    ("arch_search.space={tree: {depth: [1]}}", "arch_search.space.tree: unknown family"),
    ("arch_search.space={mlp: {depth: [1], width: [8], heads: [2]}}", "arch_search.space.mlp: knobs ['heads'] unknown"),
    ("arch_search.space={mlp: {depth: [1], width: []}}", "arch_search.space.mlp.width must list at least one value"),
    ("arch_search.space={cnn: {stages: [1], width: [4], depth: [1], kernel: [4]}}", "arch_search.space.cnn.kernel"),
    ("arch_search.space={conv4: {width: [8]}}", "arch_search.space.conv4: conv4"),
    ("student.budget.params=20", "no point of arch_search.space meets student.budget.params=20"),
])
def test_a_bad_space_or_an_unmeetable_budget_is_refused_naming_the_key(setting, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=["arch_search.enabled=true", setting])


def test_the_reward_is_the_accuracy_under_a_hard_limit_and_mnasnets_product_when_soft():
    cost = {"latency_ms": 2.0, "macs": 1000, "params": 500}
    hard = Budget({"latency_ms": 1.0}, "hard", latency_slack=0.05)
    assert hard.reward(0.9, cost) == 0.0 and hard.over(cost).startswith("latency_ms 2 > 1")
    assert hard.reward(0.9, {**cost, "latency_ms": 1.04}) == 0.9  # within the slack a reading may move
    soft = Budget({"latency_ms": 1.0, "macs": 4000}, "soft", exponent=-0.07)
    assert soft.reward(0.9, cost) == pytest.approx(0.9 * 2.0 ** -0.07 * 0.25 ** -0.07)
    # No limit set: the hand-picked student's cost on the default measure is the limit.
    assert Budget.of(BudgetConfig(), cost, "macs").limits == {"macs": 1000.0}
    assert Budget.of(BudgetConfig(params=7), cost, "macs").limits == {"params": 7.0}


def _study(space: dict, history: list[tuple[dict, float]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dists = distributions(space)
    for knobs, reward in history:
        params = {name: dist.choices[0] for name, dist in dists.items()} | knobs
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=reward,
                                                  user_attrs={"reward": reward}))
    return study


def test_the_reinforce_controller_takes_the_step_worked_by_hand():
    space = {"mlp": {"depth": [1, 2], "width": [8]}}
    study = _study(space, [({"mlp.depth": 1}, 0.5), ({"mlp.depth": 2}, 0.7), ({"mlp.depth": 2}, 0.9)])
    logits = ReinforceSampler(space, seed=0, lr=0.5).logits(study)
    # Trials 1 and 2 only set the baseline; trial 3: advantage (0.9 - 0.6) / (0.1 + 0.001), clipped at 3,
    # on a softmax of [0.5, 0.5] for depth: logits += lr * A * ([0, 1] - [0.5, 0.5]).
    advantage = (0.9 - 0.6) / (0.1 + 1e-3)
    assert logits["mlp.depth"] == pytest.approx([-0.25 * advantage, 0.25 * advantage])
    assert logits["mlp.width"] == pytest.approx([0.0]) and logits["family"] == pytest.approx([0.0])
    # The controller now draws depth 2 with probability sigmoid(0.5 * A).
    p = 1 / (1 + math.exp(-0.5 * advantage))
    draws = [ReinforceSampler(space, seed=s, lr=0.5).sample_relative(study, study.ask(), {})["mlp.depth"]
             for s in range(200)]
    assert abs(np.mean([d == 2 for d in draws]) - p) < 0.08


def test_regularised_evolution_mutates_one_decision_of_the_tournament_winner():
    space = {"mlp": {"depth": [1, 2, 3], "width": [8, 16, 32]}}
    history = [({"mlp.depth": 1, "mlp.width": 8}, 0.2), ({"mlp.depth": 3, "mlp.width": 32}, 0.9),
               ({"mlp.depth": 2, "mlp.width": 16}, 0.5)]
    study = _study(space, history)
    sampler = EvolutionSampler(space, seed=0, population=3, tournament=3)  # the tournament is everyone: 0.9 wins
    for _ in range(20):
        child = sampler.sample_relative(study, study.ask(), {})
        changed = [k for k in ("mlp.depth", "mlp.width") if child[k] != {"mlp.depth": 3, "mlp.width": 32}[k]]
        assert len(changed) == 1
    # Fewer trials than the population: random points.
    assert EvolutionSampler(space, seed=0, population=8).sample_relative(study, study.ask(), {})["family"] == "mlp"


@pytest.fixture
def digits(home):
    cfg = load_config(overrides=[
        "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=60",
        "student.train.steps=200", "arch_search.enabled=true", "arch_search.trials=4", "arch_search.searcher=evolution",
        "arch_search.population=2", "arch_search.default_budget=params", "arch_search.halving=true",
        "arch_search.space={mlp: {depth: [1, 2], width: [8, 16, 24, 64]}}"])
    prepared = data_stage.prepare(cfg.data)
    return cfg, prepared, obtain_teacher(TeacherContext.from_config(cfg, prepared)).model


def test_a_search_keeps_the_budget_trains_at_most_its_trials_and_is_cached(digits, home):
    cfg, prepared, teacher = digits
    lines = []
    result = search(ArchContext.from_config(cfg, prepared, teacher), say=lines.append)
    limit = count_parameters(build_model("mlp", (1, 8, 8), 10, hidden=[16]))  # the hand-picked student's
    assert result.budget.startswith(f"params <= {limit:,}")
    trained = [t for t in result.trials if not t["over_budget"] and t["repeat_of"] is None]
    assert 1 <= len(trained) <= 4 and all(t["cost"]["params"] <= limit for t in trained)
    # The over-budget points were refused before training (no seconds spent), none chosen.
    over = [t for t in result.trials if t["over_budget"]]
    assert all(t["seconds"] == 0.0 and t["reward"] == 0.0 for t in over)
    chosen = count_parameters(build_model(result.chosen["arch"], (1, 8, 8), 10, **result.chosen["kwargs"]))
    assert chosen <= limit
    assert any(line.startswith("  trial ") for line in lines)
    best = max([t for t in trained if t["state"] == "complete"], key=lambda t: t["reward"])
    beyond_noise = "sign test p" in result.reason and "within noise" not in result.reason
    assert result.chosen == ({"arch": best["arch"], "kwargs": best["kwargs"]} if beyond_noise else
                             {"arch": "mlp", "kwargs": {"hidden": [16]}})
    assert "hits" not in result.reference and all("hits" not in t for t in result.trials)  # kept in the study only
    # The same search again is read back, not run.
    again = search(ArchContext.from_config(cfg, prepared, teacher), say=lines.append)
    assert again.cached and again.chosen == result.chosen
    record = json.loads(next((home / "cache" / "arch").glob("*.json")).read_text())
    assert record["chosen"] == result.chosen


def _trial(name: str, hits: str, params: int, budget: Budget) -> dict:
    acc = hits.count("1") / len(hits)
    cost = {"params": params, "macs": params}
    return {"candidate": name, "arch": "mlp", "kwargs": {"hidden": [params]}, "cost": cost, "held_out_acc": acc,
            "reward": budget.reward(acc, cost), "hits": hits, "state": "complete", "over_budget": None,
            "repeat_of": None}


def test_a_searched_point_replaces_the_hand_picked_student_only_beyond_noise():
    from pipelines.arch.stage import _choose

    hard = Budget.of(BudgetConfig(params=100), None, "params")
    reference = _trial("hand-picked", "1111100000", 50, hard)
    # Right on 5 images the reference misses, wrong on none it gets: p = 1/2^5 = 0.031 < 0.05.
    chosen, reason = _choose([_trial("a", "1111111111", 60, hard)], reference, hard, keep_p=0.05)
    assert chosen["kwargs"] == {"hidden": [60]} and "sign test p = 0.031" in reason
    # 5 wins and 1 loss: p = (1 + 6) / 2^6 = 0.109: the same gain in accuracy, within noise.
    chosen, reason = _choose([_trial("b", "0111111111", 60, hard)], reference, hard, keep_p=0.05)
    assert chosen["kwargs"] == {"hidden": [50]} and "within noise" in reason and "p = 0.11" in reason
    assert _choose([_trial("b", "0111111111", 60, hard)], reference, hard, keep_p=0.2)[0]["kwargs"] == {"hidden": [60]}
    # Soft: a cheaper point whose gain is within noise still wins on cost (the reward's other half).
    soft = Budget.of(BudgetConfig(params=100, mode="soft"), None, "params")
    chosen, _ = _choose([_trial("c", "0111111111", 20, soft)], _trial("hand-picked", "1111100000", 50, soft),
                        soft, keep_p=0.05)
    assert chosen["kwargs"] == {"hidden": [20]}


def test_latency_readings_are_paired_with_the_hand_picked_students_and_kept_at_one_load():
    """The machine slows down twofold between two points' readings: each point's reading is
    scaled by the hand-picked student's reading taken beside it, so the two points compare
    as they would at one load (the first anchor reading's)."""
    from pipelines.arch.space import Costs
    from pipelines.config.training import ModelConfig

    base = {"anchor": 1.0, "fast": 0.5, "slow": 1.2}  # idle latency, ms
    load = {"now": 1.0}

    class Probe:  # a stand-in for deploy.cost.LatencyProbe: readings that move with the load
        def latency(self, arch, kwargs, input_shape, num_classes, batch=1):
            return {"median_ms": base[kwargs["name"]] * load["now"], "spread_pct": 1.0}

    def model(name: str) -> ModelConfig:
        return ModelConfig(arch="mlp", kwargs={"hidden": [8 + len(name)], "name": name})

    costs = Costs((1, 8, 8), 10, Probe(), anchor=model("anchor"))
    costs.of = lambda m, latency: Costs._latency(costs, m)  # the readings only: these points build no network
    assert costs.of(model("anchor"), True)["latency_ms"] == pytest.approx(1.0)
    assert costs.of(model("fast"), True)["latency_ms"] == pytest.approx(0.5)
    load["now"] = 2.0  # the machine is busy now
    slow = costs.of(model("slow"), True)
    assert slow["latency_ms"] == pytest.approx(1.2) and slow["latency_raw_ms"] == pytest.approx(2.4)
    unpaired = Costs((1, 8, 8), 10, Probe())
    assert Costs._latency(unpaired, model("slow"))["latency_ms"] == pytest.approx(2.4)


def test_the_sign_test_counts_disagreements_and_sums_the_binomial_tail():
    import torch

    from pipelines.engine.metrics import pack_hits, sign_test, unpack_hits

    a, b = unpack_hits("110110"), unpack_hits("100011")
    assert pack_hits(a) == "110110"
    wins, losses, p = sign_test(a, b)  # a alone right on images 2 and 4; b alone on image 6
    assert (wins, losses) == (2, 1) and p == pytest.approx(4 / 8)  # P(X >= 2), X ~ Bin(3, 1/2)
    assert sign_test(b, a)[2] == pytest.approx(7 / 8)
    assert sign_test(a, a) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same examples"):
        sign_test(a, torch.ones(3, dtype=torch.bool))


def test_a_latency_limit_even_the_cheapest_point_breaks_is_refused_before_any_work():
    from pipelines.orchestrate.preflight import check_latency_budget

    cfg = load_config(overrides=["arch_search.enabled=true", "student.budget.latency_ms=0.0001",
                                 "arch_search.space={mlp: {depth: [1, 2], width: [8, 64]}}"])
    with pytest.raises(ConfigError, match=r"student.budget.latency_ms=0.0001: the cheapest, mlp depth=1 width=8, "
                                          r"takes [0-9.e-]+ ms at batch 1"):
        check_latency_budget(cfg)
    check_latency_budget(load_config(overrides=["arch_search.enabled=true", "student.budget.latency_ms=1000"]))


def test_when_no_point_meets_a_latency_limit_at_search_time_the_hand_picked_student_stays(digits):
    """The pre-flight check measured the cheapest point under the limit; a busy machine can
    read every point over it later: the search keeps the hand-picked student and says why."""
    from pipelines.arch.stage import latency_probe

    cfg, prepared, teacher = digits
    cfg = load_config(overrides=["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}",
                                 "teacher.train.steps=60", "student.train.steps=200", "arch_search.enabled=true",
                                 "student.budget.latency_ms=0.0001", "arch_search.space={mlp: {depth: [1], width: [8]}}"])
    lines = []
    with latency_probe(True) as probe:
        result = search(ArchContext.from_config(cfg, prepared, teacher, probe), say=lines.append)
    assert result.chosen == {"arch": "mlp", "kwargs": {"hidden": [16]}}
    assert result.reason.startswith("no point of the space met the budget (latency_ms <= 0.0001")
    assert any("the hand-picked student stays" in line for line in lines)
    assert [t for t in result.trials if not t["over_budget"]] == []  # nothing was trained
