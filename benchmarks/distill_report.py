"""Markdown tables from ``distill_quality.py`` JSON files, so the docs quote the JSON.

    python -m benchmarks.distill_report docs/benchmarks/distill_quality_{mnist,fashion_mnist}.json [--out F.md]
    python -m benchmarks.distill_report --smoke  # the tables of every published distill_quality JSON

Three tables: accuracy per row (mean ± std over the seeds), the paired comparisons the
targets name (with the worst seed against its paired ``kd``), and the costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMOKE = [str(p.relative_to(REPO)) for p in sorted((REPO / "docs" / "benchmarks").glob("distill_quality_*.json"))]

COMPARISONS = [("meta_distill", "standard_practice@original"), ("meta_distill", "meta_distill@noreference"),
               ("dkd_tuned@original", "kd_tuned@original"), ("dist_kd_tuned@original", "kd_tuned@original"),
               ("meta_distill", "kd_tuned@original"), ("meta_distill", "kd_tuned@improved"),
               ("meta_distill", "meta_distill@feedback0"), ("meta_distill@temperature", "kd_tuned@original"),
               ("meta_distill@temperature", "kd_tuned@improved"), ("meta_distill@temperature", "meta_distill"),
               ("kd_tuned@improved", "kd_tuned@original"), ("kd@improved", "kd@original")]


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def _delta(a: np.ndarray, b: np.ndarray) -> str:
    from benchmarks.common import paired_stats, paired_text

    return paired_text(paired_stats(a - b), scale=100)


def tables(paths: list[str]) -> str:
    results = [(Path(p).stem.removeprefix("distill_quality_"), json.loads(Path(p).read_text())) for p in paths]
    rows = list(dict.fromkeys(m for _, r in results for m in r["methods"]))
    lines = ["| setting | teacher | improved teacher | " + " | ".join(rows) + " |", "|---" * (len(rows) + 3) + "|"]
    for name, r in results:
        cells = [f"{_pts(r['methods'][m]['mean'])} ± {_pts(r['methods'][m]['std'])}" if m in r["methods"] else "-"
                 for m in rows]
        lines.append(f"| {name} | {_pts(r['teacher_test_acc'])} | {_pts(r['improved_teacher_test_acc'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| setting | comparison | Δ points [95% CI], p (Wilcoxon) |", "|---|---|---|"]
    for name, r in results:
        seeds = {m: np.array(v["per_seed"]) for m, v in r["methods"].items()}
        for a, b in COMPARISONS:
            if a in seeds and b in seeds:
                lines.append(f"| {name} | {a} − {b} | {_delta(seeds[a], seeds[b])} |")
        for m in ("meta_distill", "meta_distill@temperature"):
            for kd in ("kd@improved", "kd@original"):
                if m in seeds and kd in seeds:
                    worst = float((seeds[m] - seeds[kd]).min())
                    lines.append(f"| {name} | worst seed of {m} − {kd} | {100 * worst:+.2f} |")
    lines += ["", "| setting | teacher s | improvement s | grid s (original, improved) | standard practice s | "
              "meta_distill pipeline s | pipeline ratio | meta_distill step / kd step | kd_tuned points (α, T) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        c = r["costs"]
        # Older JSON: one kd grid per teacher (kd_tuned_grids, seconds as numbers); newer: the
        # three tuned methods' grids per teacher (tuned_grids, seconds by method).
        grids = {k: sum(g.values()) if isinstance(g, dict) else g for k, g in c.get("grid_seconds", {}).items()}
        tuned = r.get("tuned_grids") or {k: {"kd": g} for k, g in r.get("kd_tuned_grids", {}).items()}
        points = "; ".join(f"{k}: {g['kd']['point']['alpha']}, {g['kd']['point']['temperature']}"
                           for k, g in tuned.items() if "kd" in g)
        lines.append(f"| {name} | {r['teacher_seconds']:.0f} | {r['improve_seconds']:.0f} | "
                     f"{grids.get('original', float('nan')):.0f}, {grids.get('improved', float('nan')):.0f} | "
                     f"{c.get('standard_practice_seconds', float('nan')):.0f} | "
                     f"{c.get('meta_distill_pipeline_seconds', float('nan')):.0f} | "
                     f"{c.get('pipeline_ratio', float('nan')):.2f} | {c.get('meta_distill_step_vs_kd', float('nan')):.2f} | "
                     f"{points} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="distill_quality JSON files (relative ones from the repository root)")
    parser.add_argument("--out", type=Path, help="also write the tables here")
    args = parse_args(parser, argv, SMOKE)
    text = tables([str(p if Path(p).is_absolute() or Path(p).exists() else REPO / p) for p in args.paths])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
