"""Figures for MLflow: learning curves, confusion matrices, the method comparison."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

# Figures are built with the object API, not pyplot: no global figure registry, so
# students trained concurrently in threads can draw their curves at the same time.


def learning_curve(curve: dict[str, list[tuple[int, float]]], title: str):
    fig = Figure(figsize=(9, 3.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    if curve.get("train_loss"):
        ax_loss.plot(*zip(*curve["train_loss"]), label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    for name in ("train_acc", "val_acc"):
        if curve.get(name):
            ax_acc.plot(*zip(*curve[name]), label=name.replace("_", " "))
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: np.ndarray, class_names: list[str], title: str):
    n = len(class_names)
    fig = Figure(figsize=(4 + n * 0.25, 3.5 + n * 0.25))
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def comparison_bars(rows: list[dict], title: str, err_key: str = "test_acc_std"):
    """Bar per method of mean test accuracy, error bar ``err_key`` (std or CI half-width)."""
    fig = Figure(figsize=(max(5.5, 1.6 + 1.1 * len(rows)), 3.5))
    ax = fig.subplots()
    names = [r["method"] for r in rows]
    means = [100 * r["test_acc"] for r in rows]
    errs = [100 * r.get(err_key, 0.0) for r in rows]
    ax.bar(names, means, yerr=errs, capsize=4, color="#4C72B0")
    low = min(m - e for m, e in zip(means, errs))
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + e for m, e in zip(means, errs)) + 2))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    for i, m in enumerate(means):
        ax.text(i, m, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    """Free the figure's artists now (nothing global holds it)."""
    fig.clear()


def pareto_front(trials: list[dict], reference: dict, chosen: dict, measure: str, limit: float | None, title: str):
    """Held-out accuracy against cost, every trial of an architecture search: dots by family
    (hollow: stopped early by successive halving; grey crosses: over the budget, never
    trained), the front of the trained points as a step line, the hand-picked student as a
    star and the chosen point circled; the budget as a dashed line."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    label = {"latency_ms": "batch-1 CPU latency (ms, one thread)", "macs": "multiply-accumulates",
             "params": "parameters"}[measure]
    trained = [t for t in trials if not t.get("over_budget") and t.get("repeat_of") is None]
    over = [t for t in trials if t.get("over_budget")]
    scored = [100 * t["held_out_acc"] for t in trained] + [100 * reference["held_out_acc"]]
    low, high = max(0.0, min(scored) - 5), min(100.0, max(scored) + 2)
    if over:  # on the floor of the plot: they have no accuracy
        ax.scatter([t["cost"][measure] for t in over], [low + 0.3] * len(over), marker="x", c="0.6", s=18,
                   label="over budget (not trained)")
    for i, family in enumerate(sorted({t["candidate"].split()[0] for t in trained})):
        mine = [t for t in trained if t["candidate"].split()[0] == family]
        for stopped in (False, True):
            pts = [t for t in mine if (t.get("stopped_at") is not None) == stopped]
            if pts:
                ax.scatter([t["cost"][measure] for t in pts], [100 * t["held_out_acc"] for t in pts],
                           facecolors="none" if stopped else f"C{i}", edgecolors=f"C{i}", s=28,
                           label=f"{family}{' (stopped early)' if stopped else ''}")
    full = sorted((t for t in trained if t.get("stopped_at") is None), key=lambda t: t["cost"][measure])
    front, best = [], -1.0
    for t in full:
        if t["held_out_acc"] > best:
            front.append(t)
            best = t["held_out_acc"]
    if front:
        ax.step([t["cost"][measure] for t in front], [100 * t["held_out_acc"] for t in front], where="post",
                c="k", lw=0.8, alpha=0.6, label="front")
    ax.scatter([reference["cost"][measure]], [100 * reference["held_out_acc"]], marker="*", s=180, c="gold",
               edgecolors="k", zorder=5, label="hand-picked student")
    pick = next((t for t in full if t["arch"] == chosen["arch"] and t["kwargs"] == chosen["kwargs"]), None)
    if pick is not None:
        ax.scatter([pick["cost"][measure]], [100 * pick["held_out_acc"]], s=260, facecolors="none", edgecolors="r",
                   lw=1.5, zorder=6, label="chosen")
    if limit is not None:
        ax.axvline(limit, ls="--", c="r", lw=0.8, label="budget")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out accuracy at the proxy budget (%)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(low, high)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
