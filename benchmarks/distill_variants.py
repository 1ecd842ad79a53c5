"""Side-by-side variants of student methods over paired seeds: the search behind the
learning-to-teach defaults (docs/distill_ablation.md).

    python -m benchmarks.distill_variants --preset mnist --seeds 3 \
        --variant kd=kd \
        --variant "kd_T1=kd:kd.temperature=1" \
        --variant "md_kdp=meta_distill_pilot:meta_distill_pilot.learn=[kd_params],meta_distill_pilot.knob_lr=0.03" \
        --json docs/benchmarks/ablation/mnist_search.json
    python -m benchmarks.distill_variants --smoke --json PATH  # seconds: three variants, tiny networks, 2 seeds

Each ``--variant NAME=METHOD[:k=v,k=v...]`` trains METHOD with those overrides on top of
the preset for seeds 0..N-1 (same data, same teacher).  The first variant is the
reference: every other one gets its mean paired difference to it.  Accuracies are
fractions.  (Overrides are split on commas outside brackets.)  The JSON of
docs/benchmarks/ablation was measured before the pilot update became its own method: its
``meta_distill:meta_distill.learn=[...]`` variants are ``meta_distill_pilot:meta_distill_pilot.learn=[...]``
now.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

# --smoke: the reference and two variants (the default method and the pilot update), tiny networks.
SMOKE = ["--seeds", "2", "--variant", "kd=kd", "--variant", "md=meta_distill:meta_distill.interval=2",
         "--variant", "md_kdp=meta_distill_pilot:meta_distill_pilot.learn=[kd_params],meta_distill_pilot.interval=2",
         *[x for item in ("teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5",
                          "student.train.steps=4") for x in ("--set", item)]]


def split_overrides(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in items + [current] if i]


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    name, sep, rest = text.partition("=")
    method, _, overrides = rest.partition(":")
    if not sep or not name or not method:
        raise SystemExit(f"distill_variants: --variant {text!r}: expected NAME=METHOD[:k=v,...]")
    return name, method, split_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import paired_stats, parse_args, write_json
    from pipelines import data as data_stage
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config
    from pipelines.evaluate.metrics import evaluate
    from pipelines.students.fit import run_student
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    variants = [parse_variant(v) for v in args.variant]
    try:
        configs = {name: load_config(args.preset, None, args.overrides + overrides) for name, _, overrides in variants}
    except ConfigError as exc:
        print(f"distill_variants: {exc}", file=sys.stderr)
        return 2
    base = load_config(args.preset, None, args.overrides)
    prepared = data_stage.prepare(base.data)
    teacher = obtain_teacher(TeacherContext.from_config(base, prepared)).model
    teacher_acc = evaluate(teacher, prepared.x("test"), prepared.y("test"), prepared.num_classes).accuracy
    print(f"teacher: {100 * teacher_acc:.2f}", flush=True)
    rows, reference = {}, None
    for name, method, overrides in variants:
        outcomes = [run_student(method, configs[name], prepared, teacher, seed) for seed in range(args.seeds)]
        accs = np.array([o.evaluation.accuracy for o in outcomes])
        reference = accs if reference is None else reference
        rows[name] = {"method": method, "overrides": overrides, "mean": float(accs.mean()),
                      "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "per_seed": accs.tolist(),
                      "compute_seconds": float(np.mean([o.result.seconds for o in outcomes])),
                      "vs_first": paired_stats(accs - reference)}
        print(f"{name:>28}: {100 * accs.mean():.2f}  vs {variants[0][0]} {100 * (accs - reference).mean():+.2f}",
              flush=True)
    write_json(args.json, {"preset": base.preset, "overrides": args.overrides, "seeds": args.seeds,
                           "teacher_test_acc": teacher_acc, "reference": variants[0][0], "variants": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
