"""Wall seconds per student step of ``meta_distill`` (or ``--method meta_distill_pilot``,
the pilot update) against ``kd`` on the same networks, measured in one run (same data,
same teacher, same student budget).

    python -m benchmarks.distill_cost [--preset digits] [--method M] [--set k=v ...] --json PATH
    python -m benchmarks.distill_cost --smoke --json PATH  # seconds: an MLP teacher, 4 student steps

Target: ratio <= 2.0 at the default teacher-update interval.  ``pilot_steps`` and ``order``
are the pilot update's (null for ``meta_distill``, which has no pilot); the JSON of commit
8006016 measured the pilot update, then named ``meta_distill``.
"""

from __future__ import annotations

import argparse
import sys

METHODS = ("meta_distill", "meta_distill_pilot")
SMOKE = ["--repeats", "1", "--set", "teacher.model.arch=mlp", "--set", "teacher.model.kwargs={hidden: [16]}",
         "--set", "teacher.train.steps=5", "--set", "student.train.steps=4", "--set", "meta_distill.interval=2",
         "--set", "meta_distill_pilot.interval=2"]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json
    from pipelines import data as data_stage
    from pipelines.config.loader import load_config
    from pipelines.engine import distributed
    from pipelines.students.fit import run_student
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--method", default="meta_distill", choices=METHODS, help="measured against kd")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest counts")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    cfg = load_config(args.preset, None, args.overrides)
    prepared = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
    teacher = obtain_teacher(TeacherContext.from_config(cfg, prepared)).model
    seconds: dict[str, list[float]] = {"kd": [], args.method: []}
    for r in range(args.repeats):
        for method in seconds:
            outcome = run_student(method, cfg, prepared, teacher, seed=r)
            seconds[method].append(outcome.result.seconds / outcome.result.steps)
    per_step = {m: min(v) for m, v in seconds.items()}
    section = getattr(cfg, args.method)
    pilot = args.method == "meta_distill_pilot"
    result = {"preset": cfg.preset, "method": args.method, "interval": section.interval,
              "pilot_steps": section.pilot_steps if pilot else None, "order": section.order if pilot else None,
              "seconds_per_step": per_step, "all_seconds_per_step": seconds,
              "ratio": per_step[args.method] / per_step["kd"], "target_ratio_max": 2.0}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
