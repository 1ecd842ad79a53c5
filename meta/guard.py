"""A guard for learned teaching: it keeps the last accepted snapshot of what it guards (the
student, its optimiser, the learning teacher and its optimiser) with its held-out
accuracy, and when a later check falls behind that accuracy by more than the noise of the
held-out set (``z`` binomial standard errors), it restores the snapshot and damps the
teacher's learning rate by ``damping``.  Pure torch.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol


class HasState(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


class Guard:
    def __init__(self, z: float = 2.0, damping: float = 0.5):
        self.z, self.damping = z, damping
        self.best: float | None = None  # held-out accuracy of the snapshot
        self.snapshot: dict | None = None
        self.scale, self.reverts, self.checks = 1.0, 0, 0

    def margin(self, accuracy: float, n: int) -> float:
        """``z`` standard errors of an accuracy measured on ``n`` images (at least 1/n)."""
        return self.z * math.sqrt(max(accuracy * (1 - accuracy), 1.0 / n) / n)

    def check(self, accuracy: float, n: int, parts: dict[str, HasState]) -> bool:
        """Accept the current state (a new best becomes the snapshot) or, when it is behind
        the snapshot by more than the margin, restore the snapshot into ``parts``, damp,
        and return False."""
        self.checks += 1
        if self.best is not None and accuracy < self.best - self.margin(self.best, n):
            for name, part in parts.items():
                part.load_state_dict(copy.deepcopy(self.snapshot[name]))
            self.scale *= self.damping
            self.reverts += 1
            return False
        if self.best is None or accuracy > self.best:
            self.best = accuracy
            self.snapshot = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "snapshot": self.snapshot, "scale": self.scale, "reverts": self.reverts,
                "checks": self.checks}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.snapshot, self.scale = state["best"], state["snapshot"], state["scale"]
        self.reverts, self.checks = state["reverts"], state["checks"]
