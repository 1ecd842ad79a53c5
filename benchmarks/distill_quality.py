"""Paired-seed comparison of student methods against ``kd`` and ``kd_tuned``.

    python -m benchmarks.distill_quality [--preset NAME] [--set k=v ...] [--seeds N] \
        [--methods a,b,...] --json PATH

Every method trains the same student network with the same budget for each seed; a seed
fixes the data order and the initialisation, so the per-seed differences are paired.
Reports per method the mean ± std test accuracy (fractions, as every accuracy in the
JSON) and its compute seconds (``kd_tuned``'s
include its whole validation grid; ``maml_init``'s its meta-training), and against
``kd`` and ``kd_tuned`` the mean paired difference with a 95% t-interval, the
p-value of a paired t-test and that of a Wilcoxon signed-rank test.  The bar chart and
the JSON go to MLflow (experiment ``<tracking.experiment>-quality``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    from benchmarks.common import paired_stats, write_json
    from pipelines import data as data_stage
    from pipelines import tracking
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config
    from pipelines.evaluate.metrics import evaluate
    from pipelines.students.context import StudentContext
    from pipelines.students.fit import run_student
    from pipelines.students.kd import kd_grid
    from pipelines.teacher import sources
    from pipelines.teacher.fit import obtain_teacher, teacher_spec
    from pipelines.tracking import plots

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--methods", default="scratch,kd,kd_tuned,meta_distill")
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
    try:
        sources.preflight(cfg)  # teacher.source / student.init: refused before any work
    except ConfigError as exc:
        print(f"distill_quality: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    prepared = data_stage.prepare(cfg.data)
    teacher = obtain_teacher(cfg, prepared)
    teacher_acc = evaluate(teacher.model, prepared.x("test"), prepared.y("test"), prepared.num_classes).accuracy
    print(f"teacher {cfg.teacher.model.arch}: {100 * teacher_acc:.2f}; splits {prepared.counts}", flush=True)
    accs: dict[str, np.ndarray] = {}
    seconds: dict[str, list[float]] = {}
    for method in methods:
        outcomes = [run_student(method, cfg, prepared, teacher.model, seed) for seed in cfg.student.seeds]
        accs[method] = np.array([o.evaluation.accuracy for o in outcomes])
        seconds[method] = [o.result.seconds for o in outcomes]
        print(f"{method:>24}: {100 * accs[method].mean():.2f} ± {100 * accs[method].std(ddof=1):.2f} "
              f"({np.mean(seconds[method]):.1f} s)", flush=True)
    result = {
        "dataset": cfg.data.name, "preset": cfg.preset, "overrides": args.overrides,
        "teacher_test_acc": teacher_acc, "teacher_seconds": teacher.seconds, "teacher_cached": teacher.cached,
        "teacher_source": cfg.teacher.source, "teacher_arch": teacher_spec(cfg, prepared)["arch"],
        "splits": prepared.counts,
        "train_examples": prepared.counts["train"], "transfer_examples": prepared.counts["transfer"],
        "student_steps": cfg.student.train.steps,
        "units": "accuracies and their differences as fractions (0.01 = 1 point); seconds of compute",
        "methods": {m: {"mean": float(a.mean()), "std": float(a.std(ddof=1)), "n": len(a), "per_seed": a.tolist(),
                        "compute_seconds": float(np.mean(seconds[m]))} for m, a in accs.items()},
        "vs_kd": {m: paired_stats(a - accs["kd"]) for m, a in accs.items() if m != "kd"},
        "wall_seconds": time.perf_counter() - start,
    }
    if "kd_tuned" in accs:
        grid = kd_grid(StudentContext.from_config(cfg, prepared, teacher.model, cfg.kd.grid_seed))
        result["kd_tuned_grid"] = grid  # cached by the runs above: no retraining
        result["vs_kd_tuned"] = {m: paired_stats(a - accs["kd_tuned"]) for m, a in accs.items() if m != "kd_tuned"}
        if "meta_distill" in accs:
            result["meta_distill_compute_vs_grid"] = (result["methods"]["meta_distill"]["compute_seconds"]
                                                      / grid["grid_seconds"])
    if "meta_distill" in accs:
        result["meta_distill_cost_vs_kd"] = (result["methods"]["meta_distill"]["compute_seconds"]
                                             / result["methods"]["kd"]["compute_seconds"])
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
