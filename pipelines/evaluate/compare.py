"""Comparing the students of a sweep: the outcome of one student, the per-method summary
over seeds, the choice of the student to register, and the comparison tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from pipelines.engine.loop import TrainResult
from pipelines.evaluate.metrics import Evaluation


@dataclass
class StudentOutcome:
    """One trained student of the sweep: its method and seed, the network, its curves, its
    test evaluation and validation accuracy, and its MLflow run."""

    method: str
    seed: int
    model: nn.Module
    result: TrainResult
    evaluation: Evaluation
    val_acc: float
    run_id: str = ""
    learned_teacher: nn.Module | None = None




def summarise(outcomes: list[StudentOutcome]) -> list[dict]:
    """One row per method: mean and std over seeds of the test metrics, train seconds."""
    rows = []
    for method in dict.fromkeys(o.method for o in outcomes):
        runs = [o for o in outcomes if o.method == method]
        accs = np.array([o.evaluation.accuracy for o in runs])
        rows.append({"method": method, "test_acc": float(accs.mean()),
                     "test_acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                     "test_loss": float(np.mean([o.evaluation.loss for o in runs])),
                     "test_ece": float(np.mean([o.evaluation.ece for o in runs])),
                     "train_seconds": float(np.mean([o.result.seconds for o in runs])),
                     "seeds": len(runs)})
    return rows


class NoStudentLearned(RuntimeError):
    """Every candidate is at chance: nothing may be chosen or registered."""


def at_chance(outcome: StudentOutcome) -> bool:
    """Test accuracy under 1.5x chance (25% of 10 classes would pass, 15% would not)."""
    classes = len(outcome.evaluation.per_class_accuracy)
    return outcome.evaluation.accuracy < 1.5 / classes


@dataclass(frozen=True)
class Choice:
    """The student to register, and why it was chosen."""

    outcome: StudentOutcome
    reason: str


def choose_student(outcomes: list[StudentOutcome]) -> Choice:
    """The method with the best mean validation accuracy over its seeds, then that
    method's seed with the best validation accuracy (ties: the first listed).  A method is
    judged on all its seeds, not on its luckiest one, and on validation, so the test split
    stays an unbiased estimate for the promotion gate.  A student at chance is never chosen
    (nor counted in its method's mean)."""
    learned = [o for o in outcomes if not at_chance(o)]
    if not learned:
        raise NoStudentLearned("every student is at chance on the test split ("
                               + ", ".join(f"{o.method} seed {o.seed}: {o.evaluation.accuracy:.3f}" for o in outcomes)
                               + "); nothing is registered")
    by_method: dict[str, list[StudentOutcome]] = {}
    for o in learned:
        by_method.setdefault(o.method, []).append(o)
    means = {m: float(np.mean([o.val_acc for o in runs])) for m, runs in by_method.items()}
    ranked = sorted(means, key=lambda m: -means[m])  # stable: ties keep the listed order
    method = ranked[0]
    best = max(by_method[method], key=lambda o: o.val_acc)
    runner_up = f"; next {ranked[1]} {means[ranked[1]]:.4f}" if len(ranked) > 1 else ""
    reason = (f"{method} has the best mean validation accuracy over its {len(by_method[method])} seed(s): "
              f"{means[method]:.4f}{runner_up}; its seed {best.seed} scored best on validation ({best.val_acc:.4f})")
    return Choice(best, reason)


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| method | test acc (mean ± std) | test loss | ECE | train s | seeds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} | "
              f"{r['test_loss']:.4f} | {r['test_ece']:.4f} | {r['train_seconds']:.1f} | {r['seeds']} |" for r in rows]
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    keys = ["method", "test_acc", "test_acc_std", "test_loss", "test_ece", "train_seconds", "seeds"]
    return "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n"
