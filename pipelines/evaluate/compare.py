"""Comparing the students of a sweep: the outcome of one student, the per-method summary
over seeds, the choice of the student to register, and the comparison tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from models.cost import cost_text
from pipelines.config.students import TEACHER_METHODS
from pipelines.engine.loop import TrainResult
from pipelines.evaluate.metrics import Evaluation


@dataclass
class StudentOutcome:
    """One trained student of the sweep: its method and seed, the network, its curves, its
    test evaluation and validation accuracy (and loss, which breaks ties), and its MLflow run."""

    method: str
    seed: int
    model: nn.Module
    result: TrainResult
    evaluation: Evaluation
    val_acc: float
    run_id: str = ""
    learned_teacher: nn.Module | None = None
    val_loss: float | None = None  # mean cross-entropy on validation (None: not measured)
    val_images: int = 0  # how many images the validation split holds




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


def _mean_val_loss(runs: list[StudentOutcome]) -> float | None:
    losses = [o.val_loss for o in runs]
    return None if any(v is None for v in losses) else float(np.mean(losses))


def _tie_order(candidates: list, loss_of) -> list:
    """``candidates`` (tied on validation accuracy, in listed order) by the stated rule: the
    lower validation loss first, then the listed order (an unknown loss counts as the highest)."""
    return sorted(candidates, key=lambda c: (loss_of(c) is None, loss_of(c) or 0.0))  # stable


def _tie_note(first: str, other: str, first_loss: float | None, other_loss: float | None) -> str:
    if first_loss is not None and other_loss is not None and first_loss < other_loss:
        return f"broken by the lower mean validation loss ({first_loss:.4f} vs {other_loss:.4f})"
    return f"broken by the listed order ({first} before {other}; validation loss gives no order)"


TIE = 1e-12


def choose_student(outcomes: list[StudentOutcome]) -> Choice:
    """The method with the best mean validation accuracy over its seeds, then that
    method's seed with the best validation accuracy.  Ties, stated in the reason: the lower
    mean validation loss, then the order the methods (seeds) are listed in.  A method is
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
    tied = [m for m in ranked if means[ranked[0]] - means[m] < TIE]
    losses = {m: _mean_val_loss(by_method[m]) for m in tied}
    tied = _tie_order(tied, losses.get)
    ranked = tied + [m for m in ranked if m not in tied]
    method = ranked[0]
    runs = by_method[method]
    top = max(o.val_acc for o in runs)
    seeds = _tie_order([o for o in runs if top - o.val_acc < TIE], lambda o: o.val_loss)
    best = seeds[0]
    if len(tied) > 1:
        others = ", ".join(tied[1:])
        images = f" on {best.val_images} validation images" if best.val_images else ""
        runner_up = (f"; tied with {others} at {means[method]:.4f}{images}: "
                     + _tie_note(method, tied[1], losses[method], losses[tied[1]]))
    else:
        runner_up = f"; next {ranked[1]} {means[ranked[1]]:.4f}" if len(ranked) > 1 else ""
    seed_tie = ""
    if len(seeds) > 1:
        note = _tie_note(f"seed {best.seed}", f"seed {seeds[1].seed}", best.val_loss, seeds[1].val_loss)
        seed_tie = f", tied with seed {', '.join(str(o.seed) for o in seeds[1:])}: {note.replace('mean ', '')}"
    reason = (f"{method} has the best mean validation accuracy over its {len(by_method[method])} seed(s): "
              f"{means[method]:.4f}{runner_up}; its seed {best.seed} scored best on validation ({best.val_acc:.4f})"
              f"{seed_tie}")
    return Choice(best, reason)


def paired_vs_kd(outcomes: list[StudentOutcome], baseline: str = "kd") -> dict[str, dict]:
    """Each teacher-based method's paired difference in test accuracy from ``baseline``
    (seed for seed): ``{"diff": mean, "seeds": n}``, plus ``"ci95": [lo, hi]`` (Student's t
    over the n paired differences) when there are 3 seeds or more.  Empty without kd."""
    from scipy.stats import t

    base = {o.seed: o.evaluation.accuracy for o in outcomes if o.method == baseline}
    found: dict[str, dict] = {}
    for method in dict.fromkeys(o.method for o in outcomes):
        if method == baseline or method not in TEACHER_METHODS:
            continue
        diffs = np.array([o.evaluation.accuracy - base[o.seed] for o in outcomes
                          if o.method == method and o.seed in base])
        if not len(diffs):
            continue
        entry: dict = {"diff": float(diffs.mean()), "seeds": len(diffs)}
        if len(diffs) >= 3:
            half = float(t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
            entry["ci95"] = [entry["diff"] - half, entry["diff"] + half]
        found[method] = entry
    return found


def vs_kd_text(entry: dict | None) -> str:
    """``+0.67 [-0.20, +1.54]`` (points, 95% CI), or ``+0.67 (2 seeds, no CI)``; "" for none."""
    if not entry:
        return ""
    diff = f"{100 * entry['diff']:+.2f}"
    if "ci95" in entry:
        lo, hi = entry["ci95"]
        return f"{diff} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"{diff} ({entry['seeds']} seed{'s' if entry['seeds'] != 1 else ''}, no CI)"


def held_out_warnings(counts: dict[str, int]) -> list[str]:
    """A warning for a validation or test split under 100 images: what one image moves and
    how close two methods can be and still be told apart (95%, two independent proportions
    near 50%)."""
    notes = []
    for split, keys in (("val", "data.label_budget or data.val_fraction"), ("test", "data.test_fraction")):
        n = counts.get(split, 0)
        if 0 < n < 100:
            name = "validation" if split == "val" else "test"
            notes.append(f"the {name} split holds {n} images (quiz {counts.get('quiz', 0)}, validation "
                         f"{counts.get('val', 0)}, test {counts.get('test', 0)}): one image moves a method's "
                         f"accuracy by {100 / n:.1f} points, so methods closer than about "
                         f"{196 * math.sqrt(0.5 / n):.0f} points cannot be told apart; raise {keys}")
    return notes


def comparison_markdown(rows: list[dict]) -> str:
    """The comparison table; with a "Δ vs kd" column when a row carries ``vs_kd``."""
    delta = any("vs_kd" in r for r in rows)
    lines = ["| method | test acc (mean ± std) | test loss | ECE | train s | seeds |"
             + (" Δ vs kd, points (95% CI) |" if delta else ""),
             "|---|---|---|---|---|---|" + ("---|" if delta else "")]
    lines += [f"| {r['method']} | {100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} | "
              f"{r['test_loss']:.4f} | {r['test_ece']:.4f} | {r['train_seconds']:.1f} | {r['seeds']} |"
              + (f" {vs_kd_text(r.get('vs_kd'))} |" if delta else "") for r in rows]
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    keys = ["method", "test_acc", "test_acc_std", "test_loss", "test_ece", "train_seconds", "seeds"]
    return "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n"


def arch_text(model: dict) -> str:
    """``mlp {"hidden": [16]}``: an architecture and its arguments."""
    return model["arch"] + (f" {json.dumps(model['kwargs'])}" if model.get("kwargs") else "")


def student_text(student: dict) -> str:
    """``mlp {"hidden": [16]}, 1,210 parameters``."""
    return f"{arch_text(student)}, {student['parameters']:,} parameters"


def cost_lines(summary: dict) -> list[str]:
    """One line per cost card measured: ``student mlp {"hidden": [16]}: 1,210 params · 1,184
    MACs · ...``, then the teacher's."""
    student, teacher = summary.get("student_model") or {}, summary.get("teacher") or {}
    lines = [f"student {arch_text(student)}: {cost_text(student['cost'])}"] if student.get("cost") else []
    if teacher.get("cost"):
        lines.append(f"teacher {teacher.get('arch') or summary.get('teacher_arch', '?')}: {cost_text(teacher['cost'])}")
    return lines


def architecture_line(summary: dict) -> str | None:
    """The architecture search's result in one line (None when the run did not search)."""
    if not (arch := summary.get("architecture")):
        return None
    cached = "; cached" if arch["cached"] else ""
    return (f"{arch['searcher']} search of {arch['trials']} trials (reward {arch['reward']}; {arch['budget']}{cached}): "
            f"{arch['reason']}")


def network_lines(summary: dict) -> list[str]:
    """What the run's table is followed by: the architecture search's result, the students'
    network and the teacher's, and their cost cards."""
    lines = [f"architecture: {arch}"] if (arch := architecture_line(summary)) else []
    if student := summary.get("student_model"):
        lines.append(f"students: {student_text(student)} each; teacher: {summary.get('teacher_arch', '?')}")
    return lines + cost_lines(summary)


def run_description(summary: dict, rows: list[dict]) -> str:
    """The parent run's description (markdown, the MLflow run page's "Description"): the
    teachers, the student's architecture, the comparison table, the chosen student and why,
    the registration, the held-out sizes and any warnings."""
    parts = []
    teacher = summary.get("teacher") or {}
    line = f"**Teacher:** {summary.get('teacher_arch', '')}, test accuracy {100 * summary['teacher_test_acc']:.2f}%"
    line += " (cached)" if teacher.get("cached") else ""
    improved = summary.get("teacher_improved") or {}
    if "test_acc" in improved:
        line += f"; improved on the transfer data: {100 * improved['test_acc']:.2f}% (" + (
            "the students learn from it)" if improved.get("kept", True) else
            f"not kept: {improved['verdict']['reason']})")
    elif improved.get("skipped"):
        line += f"; improvement skipped: {improved['skipped']}"
    parts.append(line)
    if arch := architecture_line(summary):
        parts.append(f"**Architecture:** {arch}")
    if summary.get("student_model"):
        parts.append(f"**Students:** {student_text(summary['student_model'])}")
    parts += [f"**Cost:** {line}" for line in cost_lines(summary)]
    parts.append(comparison_markdown(rows).rstrip())
    if chosen := summary.get("chosen"):
        parts.append(f"**Chosen:** {chosen['method']} seed {chosen['seed']}: {chosen['reason']}")
    if reg := summary.get("registered_model"):
        parts.append(f"**Registered:** {reg['name']} v{reg['version']} as {reg['alias']}: {reg['reason']}")
    else:
        parts.append("**Registered:** nothing (tracking.register_best=false)")
    if held := summary.get("held_out"):
        parts.append("**Images:** " + ", ".join(f"{k} {v}" for k, v in held.items()))
    parts += [f"**Warning:** {w}" for w in summary.get("warnings", [])]
    return "\n\n".join(parts) + "\n"
