"""Paired-seed comparison of the teaching methods against standard practice.

    python -m benchmarks.distill_quality [--preset NAME] [--set k=v ...] [--seeds N] \
        [--rows a,b,...] --json PATH
    python -m benchmarks.distill_quality --smoke --json PATH  # seconds: every row, tiny networks, 2 seeds

Rows (``--rows``, default all), each a student method with the teacher it learns from:

- ``scratch``: labels only;
- ``standard_practice@original``: standard practice, the supervised teacher and the best of
  tuned KD, DKD and DIST on the held-out labels; ``kd_tuned@original``,
  ``dkd_tuned@original``, ``dist_kd_tuned@original``: each of the three alone;
- ``kd@original``, ``kd@improved``, ``kd_tuned@improved``: plain and tuned KD, from the
  labelled teacher or the one improved on the transfer split (``teacher.improve``), kept or
  not;
- ``meta_distill``: the default, from the teacher the pipeline keeps (the improved one only
  when it beats the original on the held-out labels beyond noise), its head co-trained, the
  guard, the kd reference; ``meta_distill@noreference`` without the kd reference;
  ``meta_distill@feedback0`` and ``@feedback1``, without and with the student's feedback
  (the JSON of commit f170c51 has ``meta_distill`` at feedback 1, that commit's default);
  ``meta_distill@temperature``, with the long-horizon temperature learned too, and
  ``meta_distill@temperature20``, learned over the first 20% of the steps only.

Every row trains the same student network with the same budget for each seed; a seed
fixes the data order and the initialisation, so the per-seed differences are paired.
The teacher's training and improvement count in the costs with what they took to train
(recorded beside their cached weights, so a rerun that reuses them still counts them):
standard practice is the teacher's training plus the three grids and its student; the
``meta_distill`` pipeline, the teacher's training, its improvement and the
student.  Accuracies are fractions.  The bar chart and the JSON go to MLflow (experiment
``<tracking.experiment>-quality``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROWS = ("scratch", "standard_practice@original", "kd_tuned@original", "dkd_tuned@original", "dist_kd_tuned@original",
        "kd@original", "kd@improved", "kd_tuned@improved", "meta_distill", "meta_distill@noreference",
        "meta_distill@feedback0", "meta_distill@feedback1", "meta_distill@temperature", "meta_distill@temperature20")
VARIANTS = {"noreference": ["meta_distill.reference=none"],
            "feedback0": ["meta_distill.feedback.weight=0"], "feedback1": ["meta_distill.feedback.weight=1"],
            "temperature": ["meta_distill.temperature.learn=true"],
            "temperature20": ["meta_distill.temperature.learn=true", "meta_distill.temperature.share=0.2"]}
STANDARD = "standard_practice@original"
# --smoke: every row and every stage (a transfer split, so the teacher is improved) at a size
# that runs in seconds.
SMOKE = ["--seeds", "2", *[x for item in (
    "data.label_budget=300", "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5",
    "teacher.improve.steps=3", "student.train.steps=4", "meta_distill.interval=2", "meta_distill.guard.every=2",
    "kd.grid_alpha=[0.9]", "kd.grid_temperature=[2.0, 4.0]", "dkd.grid_beta=[8.0]", "dkd.grid_temperature=[4.0]",
    "dist_kd.grid_beta=[1.0]", "dist_kd.grid_temperature=[1.0, 4.0]") for x in ("--set", item)]]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import paired_stats, parse_args, write_json
    from pipelines import data as data_stage
    from pipelines import tracking
    from pipelines.common import home
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config
    from pipelines.evaluate.metrics import evaluate
    from pipelines.students.context import StudentContext
    from pipelines.students.fit import run_student
    from pipelines.students.tuned import TUNINGS, grid_search
    from pipelines.teacher import sources
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher, teacher_spec
    from pipelines.teacher.improve import improve_teacher, judge_improvement
    from pipelines.tracking import plots

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seed-start", type=int, default=0, help="seeds seed_start .. seed_start + seeds - 1")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        print(f"distill_quality: unknown row(s) {unknown}; allowed: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    seeds = f"student.seeds={list(range(args.seed_start, args.seed_start + args.seeds))}"
    try:
        cfg = load_config(args.preset, args.config, args.overrides + [seeds])
        variants = {name: load_config(args.preset, args.config, args.overrides + [seeds, *extra])
                    for name, extra in VARIANTS.items()}
        sources.preflight(cfg)  # teacher.source / student.init: refused before any work
    except ConfigError as exc:
        print(f"distill_quality: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    prepared = data_stage.prepare(cfg.data)
    test = (prepared.x("test"), prepared.y("test"), prepared.num_classes)
    ctx = TeacherContext.from_config(cfg, prepared)
    teacher = obtain_teacher(ctx)
    improved = improve_teacher(ctx, teacher.model)
    verdict = judge_improvement(teacher.model, improved.model, prepared, cfg.teacher.improve.keep_p)
    # The default pipeline's students learn from the teacher it keeps.
    teachers = {"original": teacher.model, "improved": improved.model,
                "pipeline": improved.model if verdict.kept else teacher.model}
    teacher_acc = {k: evaluate(m, *test).accuracy for k, m in teachers.items() if k != "pipeline"}
    print(verdict.reason, flush=True)
    print(f"teacher {cfg.teacher.model.arch}: {100 * teacher_acc['original']:.2f}, improved "
          f"{100 * teacher_acc['improved']:.2f} ({improved.train_seconds} s); splits {prepared.counts}", flush=True)
    accs: dict[str, np.ndarray] = {}
    seconds: dict[str, list[float]] = {}
    final_temperatures: dict[str, list[float | None]] = {}  # meta_distill's KD temperature at the end, per seed

    def record() -> dict:
        return {
            "dataset": cfg.data.name, "preset": cfg.preset, "overrides": args.overrides,
            "seeds": cfg.student.seeds,
            "teacher_test_acc": teacher_acc["original"], "improved_teacher_test_acc": teacher_acc["improved"],
            "teacher_seconds": teacher.train_seconds, "teacher_cached": teacher.cached,
            "improve_seconds": improved.train_seconds, "improve_cached": improved.cached,
            "improve_mask_rate": improved.mask_rate, "improve_verdict": verdict.as_json(),
            "teacher_source": cfg.teacher.source, "teacher_arch": teacher_spec(ctx)["arch"],
            "splits": prepared.counts, "student_steps": cfg.student.train.steps,
            "units": "accuracies and their differences as fractions (0.01 = 1 point); seconds of compute",
            "methods": {r: {"mean": float(a.mean()), "std": float(a.std(ddof=1)), "n": len(a), "per_seed": a.tolist(),
                            "compute_seconds": float(np.mean(seconds[r])),
                            **({"final_temperature": final_temperatures[r]} if r in final_temperatures else {})}
                        for r, a in accs.items()},
        }

    for row in rows:
        method, _, variant = row.partition("@")
        row_cfg = variants.get(variant, cfg)
        row_teacher = teachers[variant if variant in ("original", "improved") else "pipeline"]
        outcomes, temperatures = [], []
        for seed in cfg.student.seeds:
            last: dict[str, float] = {}
            outcomes.append(run_student(method, row_cfg, prepared, row_teacher, seed,
                                        on_log=lambda step, metrics, last=last: last.update(metrics)))
            temperatures.append(last.get("kd_temperature"))
        if any(t is not None for t in temperatures):
            final_temperatures[row] = temperatures
        accs[row] = np.array([o.evaluation.accuracy for o in outcomes])
        seconds[row] = [o.result.seconds for o in outcomes]
        print(f"{row:>24}: {100 * accs[row].mean():.2f} ± {100 * accs[row].std(ddof=1):.2f} "
              f"({np.mean(seconds[row]):.1f} s)", flush=True)
        # The rows so far, so that a long run stopped early still leaves what it measured.
        home.write_json(Path(args.json), {**record(), "complete": False}, indent=2)
    result = {**record(), "complete": True}
    for base in (STANDARD, "kd_tuned@original", "kd_tuned@improved", "kd@improved", "meta_distill@feedback0"):
        if base in accs:
            result[f"vs_{base}"] = {r: paired_stats(a - accs[base]) for r, a in accs.items() if r != base}
    grids = {}  # cached by the runs above: no retraining
    for name, model in teachers.items():
        ctx_s = StudentContext.from_config(cfg, prepared, model, cfg.kd.grid_seed)
        searched = {m for m in TUNINGS if f"{m}_tuned@{name}" in accs or
                    (f"standard_practice@{name}" in accs)}
        if searched and name != "pipeline":
            grids[name] = {m: grid_search(ctx_s, TUNINGS[m]) for m in sorted(searched)}
    result["tuned_grids"] = grids
    result["costs"] = costs(result, grids)
    result["wall_seconds"] = time.perf_counter() - start
    bars = [{"method": r, "test_acc": v["mean"], "ci": 1.96 * v["std"] / np.sqrt(v["n"])}
            for r, v in result["methods"].items()]
    with tracking.pipeline_run(f"{cfg.tracking.experiment}-quality", f"quality-{cfg.preset}", {"kind": "quality"}) as run:
        fig = plots.comparison_bars(bars, f"{cfg.data.name}: test accuracy, 95% CI over {args.seeds} seeds", "ci")
        run.log_figure(fig, "quality.png")
        plots.close(fig)
        run.log_text(json.dumps(result, indent=2), "quality.json")
    write_json(args.json, result)
    return 0


def costs(result: dict, grids: dict) -> dict:
    """End-to-end seconds of standard practice and of the ``meta_distill`` pipeline (left
    out when a cached teacher stage has no recorded cost), and the learned student's step cost
    (``meta_distill@noreference``) over ``kd``'s with the same teacher.  A tuned row's compute already includes its grids."""
    methods, out = result["methods"], {}
    trained = result["teacher_seconds"] is not None and result["improve_seconds"] is not None
    if STANDARD in methods and "meta_distill" in methods and trained:
        standard = result["teacher_seconds"] + methods[STANDARD]["compute_seconds"]
        ours = result["teacher_seconds"] + result["improve_seconds"] + methods["meta_distill"]["compute_seconds"]
        out.update({"standard_practice_seconds": standard, "meta_distill_pipeline_seconds": ours,
                    "pipeline_ratio": ours / standard})
    kd_row = "kd@improved" if result["improve_verdict"]["kept"] else "kd@original"  # the pipeline's teacher
    if kd_row in methods and "meta_distill@noreference" in methods:
        # The learned student alone: meta_distill's own seconds include its reference's training.
        out["meta_distill_step_vs_kd"] = (methods["meta_distill@noreference"]["compute_seconds"]
                                          / methods[kd_row]["compute_seconds"])
    out["grid_seconds"] = {name: {m: g["grid_seconds"] for m, g in by.items()} for name, by in grids.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
