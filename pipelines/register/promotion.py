"""The promotion gate: does a candidate become ``champion`` or stay ``challenger``?

The decision is pure logic over numbers (a paired test on the same test images, so an
identical re-run never wins and a fraction of a point on a few hundred images is not
taken for progress); ``promote`` and ``rollback`` move the aliases and record who, when
and why, for the pipeline's registration step and the commands alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import binom

from models.cost import Cost, cost_change
from pipelines import tracking
from pipelines.config.students import BudgetConfig, over_limits


@dataclass(frozen=True)
class Decision:
    alias: str  # "champion" or "challenger"
    reason: str
    delta: float | None  # candidate minus champion test accuracy, on the same split
    p_value: float | None = None  # one-sided exact McNemar test that the candidate is better
    cost_change: str | None = None  # "+12% parameters, +12% MACs, -3% batch-1 latency" against the champion


@dataclass(frozen=True)
class Paired:
    """Two models' predictions on the same test images: how many each got right that the
    other got wrong (the only images a paired comparison can learn from)."""

    only_candidate: int  # right for the candidate, wrong for the champion
    only_champion: int  # right for the champion, wrong for the candidate
    images: int

    @classmethod
    def of(cls, candidate_correct, champion_correct) -> Paired:
        candidate, champion = np.asarray(candidate_correct, bool), np.asarray(champion_correct, bool)
        if candidate.shape != champion.shape:
            raise ValueError(f"paired comparison over different images: {candidate.shape} vs {champion.shape}")
        return cls(int((candidate & ~champion).sum()), int((champion & ~candidate).sum()), len(candidate))

    def p_value(self) -> float:
        """One-sided exact McNemar p-value: the chance of ``only_candidate`` or more wins out
        of the discordant images if neither model were better (Binomial(n, 1/2))."""
        n = self.only_candidate + self.only_champion
        if n == 0:
            return 1.0
        return float(binom.sf(self.only_candidate - 1, n, 0.5))


def decide(candidate_acc: float, champion_acc: float | None, champion_version: str | None = None,
           paired: Paired | None = None, alpha: float = 0.05, min_delta: float = 0.0, *, cost: Cost | None = None,
           champion_cost: Cost | None = None, budget: BudgetConfig | None = None) -> Decision:
    """Does the candidate take ``champion``?  ``champion_acc`` is the champion's accuracy
    on the candidate's own test split (None: no champion yet).  With ``paired`` (both
    models' predictions on those images) it must win McNemar's exact test at ``alpha``;
    in every case it must beat the champion by more than ``min_delta``, and stay within
    ``budget`` (its cost card ``cost``).  The reason ends with the cost change against the
    champion's card (``champion_cost``, from its tags) where both are known."""
    accuracy = _by_accuracy(candidate_acc, champion_acc, champion_version, paired, alpha, min_delta)
    change = cost_change(cost, champion_cost) if cost is not None and champion_cost is not None else None
    reason = accuracy.reason + (f"; cost vs champion v{champion_version}: {change}" if change else "")
    over = over_budget(cost, budget)
    if over:  # a limit the run was given: never promoted past it, however accurate
        return replace(accuracy, alias="challenger", reason=f"over budget: {'; '.join(over)}; {reason}",
                       cost_change=change)
    return replace(accuracy, reason=reason, cost_change=change)


def _by_accuracy(candidate_acc: float, champion_acc: float | None, champion_version: str | None,
                 paired: Paired | None, alpha: float, min_delta: float) -> Decision:
    if champion_acc is None:
        return Decision("champion", "no champion yet", None)
    delta = candidate_acc - champion_acc
    versus = f"champion v{champion_version} on the same test split: {candidate_acc:.4f} vs {champion_acc:.4f} ({delta:+.4f})"
    p = paired.p_value() if paired is not None else None
    test = "" if paired is None else (f"; McNemar exact p = {p:.3g} (right only for the candidate: "
                                      f"{paired.only_candidate}, only for the champion: {paired.only_champion}, "
                                      f"of {paired.images} images), needs < {alpha:g}")
    margin = f"; needs a gain over {min_delta:g}" if min_delta > 0 else ""
    if delta > min_delta and (p is None or p < alpha):
        return Decision("champion", f"beats {versus}{test}{margin}", delta, p)
    return Decision("challenger", f"does not beat {versus}{test}{margin}", delta, p)


def over_budget(cost: Cost | None, budget: BudgetConfig | None) -> list[str]:
    """Each limit of ``budget`` that the card ``cost`` exceeds, named with its measured value
    (a card that was not measured passes no set limit)."""
    limits = budget.limits() if budget is not None else {}
    if not limits:
        return []
    if cost is None:
        return [f"no cost card was measured to check student.budget ({', '.join(limits)})"]
    measured = {"params": cost["parameters"], "macs": cost.get("macs"),
                "latency_ms": (cost.get("latency_b1") or {}).get("median_ms")}
    texts = {"params": lambda v, limit: f"{v:,} parameters > student.budget.params={limit:,}",
             "macs": lambda v, limit: f"{_or_unmeasured(v, '{:,}')} MACs > student.budget.macs={limit:,}",
             "latency_ms": lambda v, limit: (f"batch-1 latency {_or_unmeasured(v, '{:.3g}')} ms > "
                                             f"student.budget.latency_ms={limit:g} (+{budget.latency_slack:.0%} "
                                             f"slack: {limit * (1 + budget.latency_slack):.3g} ms)")}
    return [texts[m](v, limit) for m, v, limit in over_limits(limits, measured, budget.latency_slack)]


def _or_unmeasured(value, fmt: str) -> str:
    return "unmeasured" if value is None else fmt.format(value)


def _who() -> str:
    """The authenticated user where the tracking server asks for one, else the OS user."""
    import getpass
    import os

    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"]

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promote(model_name: str, version: str, reason: str, actor: str | None = None) -> dict:
    """Move ``champion`` to ``version`` by hand; the old champion becomes ``challenger``.
    Who, when, why and the metric delta are recorded in the version's tags."""
    with tracking.registry_lock(model_name):
        return _promote(model_name, version, reason, actor)


def _promote(model_name: str, version: str, reason: str, actor: str | None) -> dict:
    target = tracking.resolve_version(model_name, version=str(version))  # names what exists when it does not
    current = tracking.model_version_by_alias(model_name, "champion")
    if current is not None and current["version"] == str(version):
        raise ValueError(f"{model_name} v{version} is already the champion")
    tags = {"promoted_by": actor or _who(), "promoted_at": _now(), "promotion_reason": reason or "manual promotion"}
    if current is not None:
        tags["previous_champion"] = current["version"]
        delta = _delta(target["tags"], current["tags"])
        if delta is not None:
            tags["delta_vs_champion"] = f"{delta:+.6f}"
        elif "delta_vs_champion" in target["tags"]:  # measured by the pipeline on its own split
            tags["delta_vs_champion"] = target["tags"]["delta_vs_champion"]
    tracking.set_alias(model_name, "champion", str(version), tags)
    if current is not None:
        tracking.set_alias(model_name, "challenger", current["version"], {"demoted_at": tags["promoted_at"]})
    return {"name": model_name, "version": str(version), "previous": current["version"] if current else None, **tags}


def rollback(model_name: str, reason: str = "", actor: str | None = None) -> dict:
    """Move ``champion`` back to the version that held it before the current one."""
    with tracking.registry_lock(model_name):
        return _rollback(model_name, reason, actor)


def _rollback(model_name: str, reason: str, actor: str | None) -> dict:
    current = tracking.model_version_by_alias(model_name, "champion")
    if current is None:
        raise ValueError(f"{model_name} has no champion to roll back")
    previous = current["tags"].get("previous_champion")
    if not previous:
        raise ValueError(f"{model_name} v{current['version']} records no previous champion; nothing to roll back to")
    tags = {"promoted_by": actor or _who(), "promoted_at": _now(),
            "promotion_reason": f"rollback from v{current['version']}" + (f": {reason}" if reason else "")}
    target = tracking.model_version(model_name, previous)
    delta = _delta(target["tags"], current["tags"])
    if delta is not None:
        tags["delta_vs_champion"] = f"{delta:+.6f}"
    # After the rollback, "previous" of the restored version must not point back at the
    # version we are leaving, or a second rollback would undo this one.
    tags["previous_champion"] = target["tags"].get("previous_champion", "")
    tracking.set_alias(model_name, "champion", previous, tags)
    tracking.set_alias(model_name, "challenger", current["version"], {"rolled_back_at": tags["promoted_at"]})
    return {"name": model_name, "version": previous, "previous": current["version"], **tags}


def _delta(new_tags: dict, old_tags: dict) -> float | None:
    try:
        if new_tags.get("data_key") != old_tags.get("data_key"):
            return None  # different test splits: not comparable
        return float(new_tags["test_acc"]) - float(old_tags["test_acc"])
    except (KeyError, ValueError):
        return None
