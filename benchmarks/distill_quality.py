"""Paired-seed comparison of student methods against ``kd``.

    python benchmarks/distill_quality.py [--preset NAME] [--set k=v ...] [--seeds N] \
        [--methods a,b,...] --json PATH

Every method trains the same student network with the same budget for each seed; a seed
fixes the data order and the initialisation, so the per-seed differences to ``kd`` are
paired.  Reports per method mean ± std test accuracy and, against ``kd``, the mean paired
difference with a 95% t-interval and the p-value of a paired t-test.  The bar chart with
intervals and the JSON go to MLflow (experiment ``<tracking.experiment>-quality``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def paired_stats(diffs: np.ndarray) -> dict:
    from scipy import stats

    n = len(diffs)
    mean = float(diffs.mean())
    if n < 2 or np.allclose(diffs, diffs[0]):
        return {"diff": mean, "ci95": [mean, mean], "p": 1.0 if np.allclose(diffs, 0) else 0.0}
    sem = diffs.std(ddof=1) / np.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1) * sem)
    return {"diff": mean, "ci95": [mean - half, mean + half], "p": float(stats.ttest_1samp(diffs, 0.0).pvalue)}


def main() -> int:
    from pipelines import data as data_stage
    from pipelines import plots, stages, tracking
    from benchmarks.common import write_json
    from pipelines.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="scratch,kd,maml_init,meta_distill")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    methods = args.methods.split(",")
    if "kd" not in methods:
        methods.insert(0, "kd")
    try:
        cfg = load_config(args.preset, args.config, args.overrides + [f"student.methods={json.dumps(methods)}",
                                                                    f"student.seeds={list(range(args.seeds))}"])
    except ConfigError as exc:
        print(f"distill_quality: {exc}", file=sys.stderr)
        return 2
    prepared = data_stage.prepare(cfg.data)
    teacher = stages.train_teacher(cfg, prepared)
    teacher_acc = stages.evaluate(teacher.model, prepared.x("test"), prepared.y("test"), prepared.num_classes).accuracy
    accs: dict[str, np.ndarray] = {}
    for method in methods:
        accs[method] = np.array([stages.train_student(method, cfg, prepared, teacher.model, seed).evaluation.accuracy
                                 for seed in cfg.student.seeds])
        print(f"{method:>24}: {100 * accs[method].mean():.2f} ± {100 * accs[method].std(ddof=1):.2f}", flush=True)
    result = {
        "dataset": cfg.data.name, "preset": cfg.preset, "teacher_test_acc": teacher_acc,
        "train_examples": prepared.counts["train"],
        "methods": {m: {"mean": float(a.mean()), "std": float(a.std(ddof=1)), "n": len(a), "per_seed": a.tolist()}
                    for m, a in accs.items()},
        "vs_kd": {m: paired_stats(a - accs["kd"]) for m, a in accs.items() if m != "kd"},
    }
    rows = [{"method": m, "test_acc": v["mean"], "ci": 1.96 * v["std"] / np.sqrt(v["n"])}
            for m, v in result["methods"].items()]
    with tracking.pipeline_run(f"{cfg.tracking.experiment}-quality", f"quality-{cfg.preset}", {"kind": "quality"}) as run:
        fig = plots.comparison_bars(rows, f"{cfg.data.name}: test accuracy, 95% CI over {args.seeds} seeds", "ci")
        run.log_figure(fig, "quality.png")
        plots.close(fig)
        run.log_text(json.dumps(result, indent=2), "quality.json")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
