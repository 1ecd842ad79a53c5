"""The promotion gate: does a candidate become ``champion`` or stay ``challenger``?

Pure logic over numbers, shared by the pipeline's registration step and the
``promote``/``rollback`` commands, so both record the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines import tracking


@dataclass(frozen=True)
class Decision:
    alias: str  # "champion" or "challenger"
    reason: str
    delta: float | None  # candidate minus champion test accuracy, on the same split


def decide(candidate_acc: float, champion_acc: float | None, champion_version: str | None = None,
           min_delta: float = 0.0) -> Decision:
    """``champion_acc`` is the champion's accuracy on the candidate's own test split
    (None when there is no champion yet)."""
    if champion_acc is None:
        return Decision("champion", "no champion yet", None)
    delta = candidate_acc - champion_acc
    if delta > min_delta:
        return Decision("champion", f"beats champion v{champion_version} on the same test split: "
                                    f"{candidate_acc:.4f} vs {champion_acc:.4f} (+{delta:.4f})", delta)
    return Decision("challenger", f"does not beat champion v{champion_version} on the same test split: "
                                  f"{candidate_acc:.4f} vs {champion_acc:.4f} ({delta:+.4f})", delta)


def _who() -> str:
    import getpass

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
    target = tracking.model_version(model_name, version)
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
