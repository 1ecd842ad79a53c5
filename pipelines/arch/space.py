"""The points of ``arch_search.space`` (a family and its knob values), their flat encoding
for Optuna, and what each costs: parameters and multiply-accumulates here, latency from a
probe process of its own.  A point over the budget is refused before it trains."""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from models.cost import count_macs
from models.registry import build_model, count_parameters
from models.space import points as space_points
from models.space import to_model
from pipelines.config.students import BudgetConfig, over_limits
from pipelines.config.training import ModelConfig


@dataclass(frozen=True)
class Candidate:
    family: str
    knobs: tuple[tuple[str, int], ...]

    @property
    def model(self) -> ModelConfig:
        arch, kwargs = to_model(self.family, dict(self.knobs))
        return ModelConfig(arch=arch, kwargs=kwargs)

    @property
    def name(self) -> str:
        return f"{self.family} " + " ".join(f"{k}={v}" for k, v in self.knobs)


def model_name(model: ModelConfig) -> str:
    return f"{model.arch} {model.kwargs}" if model.kwargs else model.arch


def points(space: dict) -> list[Candidate]:
    """Every point of the space."""
    return [Candidate(family, tuple(knobs.items())) for family, knobs in space_points(space)]


def distributions(space: dict) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """The flat search space every searcher samples: the family, and every knob of every
    family (a point reads only its family's knobs)."""
    dists = {"family": optuna.distributions.CategoricalDistribution(list(space))}
    for family, knobs in space.items():
        for knob, values in knobs.items():
            dists[f"{family}.{knob}"] = optuna.distributions.CategoricalDistribution(list(values))
    return dists


def decode(params: dict, space: dict) -> Candidate:
    family = params["family"]
    return Candidate(family, tuple((k, int(params[f"{family}.{k}"])) for k in space[family]))


def cheapest_latency(space: dict, input_shape: tuple[int, ...], num_classes: int) -> tuple[str, float]:
    """The point of fewest multiply-accumulates and its batch-1 latency (ms), measured by a
    probe process of its own."""
    from deploy.cost import LatencyProbe

    costs = Costs(input_shape, num_classes)
    cheapest = min(points(space), key=lambda c: costs.of(c.model, latency=False)["macs"])
    model = cheapest.model
    with LatencyProbe() as probe:
        return cheapest.name, probe.latency(model.arch, model.kwargs, tuple(input_shape), num_classes, batch=1)["median_ms"]


class Costs:
    """What each point costs, worked out once per point: parameters and MACs in this
    process, batch-1 latency from ``probe`` (one thread, a process of its own) when a
    latency limit or measure needs it.

    Latency moves with the machine's load, and a search reads its points over minutes or
    hours: a limit read at one moment and a point read at another are not comparable (on
    CIFAR-10 a point 17% slower than the hand-picked student on an idle machine passed a
    limit read while the machine was slow).  So each point's reading is paired with a
    reading of ``anchor`` (the hand-picked student) taken right after it, and reported at
    the load of the anchor's first reading: ``point_now * anchor_first / anchor_now``.  The
    raw readings are kept beside it."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, probe=None, anchor: ModelConfig | None = None):
        self.input_shape, self.num_classes, self.probe, self._seen = tuple(input_shape), num_classes, probe, {}
        self.anchor, self.anchor_ms = anchor, None

    def of(self, model: ModelConfig, latency: bool) -> dict:
        key = (model.arch, repr(sorted(model.kwargs.items())))
        cost = self._seen.setdefault(key, {})
        if "params" not in cost:
            net = build_model(model.arch, self.input_shape, self.num_classes, **model.kwargs)
            cost.update(params=count_parameters(net), macs=count_macs(net, self.input_shape))
        if latency and "latency_ms" not in cost:
            cost.update(self._latency(model))
        return cost

    def _latency(self, model: ModelConfig) -> dict:
        read = lambda m: self.probe.latency(m.arch, m.kwargs, self.input_shape, self.num_classes, batch=1)
        reading = read(model)
        out = {"latency_ms": reading["median_ms"], "latency_spread_pct": reading["spread_pct"]}
        if self.anchor is None:
            return out
        anchor_now = read(self.anchor)["median_ms"]
        self.anchor_ms = self.anchor_ms or anchor_now  # the first reading sets the scale
        return {**out, "latency_ms": reading["median_ms"] * self.anchor_ms / anchor_now,
                "latency_raw_ms": reading["median_ms"], "anchor_latency_ms": anchor_now}


@dataclass(frozen=True)
class Budget:
    """The limits a point must meet (``student.budget``, or the hand-picked student's cost
    on ``arch_search.default_budget``) and the reward that weighs accuracy against them."""

    limits: dict[str, float]
    mode: str = "hard"
    exponent: float = -0.07
    latency_slack: float = 0.05
    source: str = "student.budget"

    @classmethod
    def of(cls, budget: BudgetConfig, reference_cost: dict | None, default: str) -> Budget:
        limits = {m: float(v) for m, v in budget.limits().items()}
        source = "student.budget"
        if not limits and reference_cost is not None:
            measure = {"latency": "latency_ms", "macs": "macs", "params": "params"}[default]
            limits, source = {measure: float(reference_cost[measure])}, f"the hand-picked student's {default}"
        return cls(limits, budget.mode, budget.exponent, budget.latency_slack, source)

    @property
    def needs_latency(self) -> bool:
        return "latency_ms" in self.limits

    def over(self, cost: dict) -> str | None:
        """Which limit the point breaks, with its value; None when it meets them all."""
        for measure, value, limit in over_limits(self.limits, cost, self.latency_slack)[:1]:
            return f"{measure} {_fmt(value)} > {_fmt(limit)}" + (
                f" (+{self.latency_slack:.0%} slack)" if measure == "latency_ms" and self.latency_slack else "")
        return None

    def reward(self, accuracy: float, cost: dict) -> float:
        """hard: the accuracy, 0 over a limit; soft: MnasNet's accuracy x prod (cost/limit)^w."""
        if self.mode == "hard":
            return 0.0 if self.over(cost) else accuracy
        return accuracy * math.prod((cost[m] / limit) ** self.exponent for m, limit in self.limits.items())

    def describe(self) -> str:
        if not self.limits:
            return "no limit"
        return ", ".join(f"{m} <= {_fmt(v)}" for m, v in self.limits.items()) + f" ({self.mode}; {self.source})"


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
