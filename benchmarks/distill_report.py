"""Markdown tables from ``distill_quality.py`` JSON files, so the docs quote the JSON.

    python -m benchmarks.distill_report docs/benchmarks/distill_quality_{mnist,fashion_mnist,cifar10}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def _delta(stats: dict) -> str:
    lo, hi = stats["ci95"]
    return (f"{100 * stats['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], "
            f"p = {stats['p']:.2g} ({stats['p_wilcoxon']:.2g})")


def tables(paths: list[str]) -> str:
    results = [(Path(p).stem.removeprefix("distill_quality_"), json.loads(Path(p).read_text())) for p in paths]
    methods = list(dict.fromkeys(m for _, r in results for m in r["methods"]))
    lines = ["| setting | teacher | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for name, r in results:
        cells = [f"{_pts(r['methods'][m]['mean'])} ± {_pts(r['methods'][m]['std'])}" if m in r["methods"] else "-"
                 for m in methods]
        lines.append(f"| {name} | {_pts(r['teacher_test_acc'])} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | comparison | Δ points [95% CI], p (Wilcoxon) |", "|---|---|---|"]
    for name, r in results:
        for m, stats in r["vs_kd"].items():
            if m == "scratch":  # read the other way round: what distillation adds
                flipped = {**stats, "diff": -stats["diff"], "ci95": [-stats["ci95"][1], -stats["ci95"][0]]}
                lines.append(f"| {name} | kd − scratch | {_delta(flipped)} |")
            elif m != "kd_tuned":
                lines.append(f"| {name} | {m} − kd | {_delta(stats)} |")
        for m, stats in r.get("vs_kd_tuned", {}).items():
            if m not in ("kd", "scratch"):
                lines.append(f"| {name} | {m} − kd_tuned | {_delta(stats)} |")
    lines += ["", "| setting | compute s: " + " | ".join(methods) + " | meta_distill / kd | meta_distill / grid | "
              "kd_tuned point (α, T) |", "|---" * (len(methods) + 4) + "|"]
    for name, r in results:
        secs = [f"{r['methods'][m]['compute_seconds']:.1f}" if m in r["methods"] else "-" for m in methods]
        point = r.get("kd_tuned_grid", {}).get("point", {})
        lines.append(f"| {name} | " + " | ".join(secs) + f" | {r.get('meta_distill_cost_vs_kd', float('nan')):.2f} | "
                     f"{r.get('meta_distill_compute_vs_grid', float('nan')):.3f} | "
                     f"{point.get('alpha')}, {point.get('temperature')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(tables(sys.argv[1:]))
