"""The promotion gate: does a candidate become ``champion`` or stay ``challenger``?

Pure logic over numbers, shared by the pipeline's registration step and the
``promote``/``rollback`` commands, so both record the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass


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
