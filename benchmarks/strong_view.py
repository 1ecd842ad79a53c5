"""The strong view of the teacher's consistency training: FixMatch's RandAugment against
the learned policy, over paired seeds, in one run.

    python -m benchmarks.strong_view [--preset P] [--set k=v ...] [--seeds 5] [--threads N] --json F
    python -m benchmarks.strong_view --smoke --json F  # seconds: digits with a transfer split, tiny sizes

Seed s trains the labelled teacher once (``teacher.seed=s``), then improves it on the
transfer split twice from that same teacher, once per ``teacher.improve.strong``
(``randaugment``, ``learned``; the learned policy searched with
``data.augment_search.seed=s``, the ``--set`` overrides choosing its space).  Reported:
each teacher's test accuracy (the labelled one too), the paired difference learned minus
randaugment with its 95% CI and the t-test's p-value, and the seconds of each stage.
A teacher's numbers depend on its thread count (``--threads``, recorded in the JSON).
"""

from __future__ import annotations

import argparse
import sys
import time

VIEWS = ("randaugment", "learned")
# --smoke: 2 seeds, a transfer split on digits, tiny teacher, improvement and search.
SMOKE = ["--seeds", "2", *[x for item in (
    "data.label_budget=300", "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5",
    "teacher.improve.steps=3", "data.augment_search.steps=4") for x in ("--set", item)]]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from benchmarks.common import paired_stats, parse_args, write_json
    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search
    from pipelines.config.loader import load_config
    from pipelines.engine import distributed
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher
    from pipelines.teacher.improve import improve_teacher, improves

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    acc: dict[str, list[float]] = {v: [] for v in ("labelled", *VIEWS)}
    seconds: dict[str, list[float]] = {v: [] for v in ("labelled", *VIEWS, "search")}
    for seed in range(args.seeds):
        for view in VIEWS:
            cfg = load_config(args.preset, None, [*args.overrides, f"teacher.improve.strong={view}",
                                                  f"teacher.seed={seed}", f"data.augment_search.seed={seed}"])
            data = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
            if not improves(cfg.teacher.improve, data):
                parser.error("the teacher is not improved here: set teacher.improve.method=consistency and keep "
                             "a transfer split (data.label_budget or data.train_fraction)")
            ctx = TeacherContext.from_config(cfg, data)
            teacher = obtain_teacher(ctx)  # trained for the first view, cached for the second
            if view == VIEWS[0]:
                seconds["labelled"].append(teacher.train_seconds or 0.0)
                acc["labelled"].append(evaluate(teacher.model, data.x("test"), data.y("test"),
                                                data.num_classes).accuracy)
            else:
                seconds["search"].append(augment_search.learned_policy(ctx.augmentation).seconds)
            start = time.perf_counter()
            improved = improve_teacher(ctx, teacher.model)
            seconds[view].append(time.perf_counter() - start)
            acc[view].append(evaluate(improved.model, data.x("test"), data.y("test"), data.num_classes).accuracy)
            print(f"seed {seed} strong={view}: test acc {acc[view][-1]:.4f} (labelled {acc['labelled'][-1]:.4f}; "
                  f"{seconds[view][-1]:.0f} s)", flush=True)
    diff = np.array(acc["learned"]) - np.array(acc["randaugment"])
    paired = paired_stats(diff)
    result = {"preset": args.preset or "digits", "overrides": args.overrides, "seeds": args.seeds,
              "threads": torch.get_num_threads(),
              "teachers": {v: {"test_acc": float(np.mean(a)), "test_acc_std": float(np.std(a, ddof=1))
                               if len(a) > 1 else 0.0, "per_seed": a} for v, a in acc.items()},
              "seconds": {k: float(np.mean(v)) for k, v in seconds.items()},
              "learned_minus_randaugment": {"diff": paired["diff"], "ci95": paired["ci95"], "p": paired["p"]}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
