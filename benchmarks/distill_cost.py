"""Wall seconds per student step of ``meta_distill`` against ``kd`` on the same networks,
measured in one run (same data, same teacher, same student budget).

    python -m benchmarks.distill_cost [--preset digits] [--set k=v ...] --json PATH

Target: ratio <= 2.0 at the default teacher-update interval.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    from benchmarks.common import write_json
    from pipelines import data as data_stage
    from pipelines.config.loader import load_config
    from pipelines.engine import distributed
    from pipelines.students.fit import run_student
    from pipelines.teacher.fit import obtain_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest counts")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    cfg = load_config(args.preset, None, args.overrides)
    prepared = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
    teacher = obtain_teacher(cfg, prepared).model
    seconds: dict[str, list[float]] = {"kd": [], "meta_distill": []}
    for r in range(args.repeats):
        for method in seconds:
            outcome = run_student(method, cfg, prepared, teacher, seed=r)
            seconds[method].append(outcome.result.seconds / outcome.result.steps)
    per_step = {m: min(v) for m, v in seconds.items()}
    result = {"preset": cfg.preset, "interval": cfg.meta_distill.interval, "pilot_steps": cfg.meta_distill.pilot_steps,
              "order": cfg.meta_distill.order, "seconds_per_step": per_step, "all_seconds_per_step": seconds,
              "ratio": per_step["meta_distill"] / per_step["kd"], "target_ratio_max": 2.0}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
