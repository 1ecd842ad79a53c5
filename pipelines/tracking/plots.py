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
