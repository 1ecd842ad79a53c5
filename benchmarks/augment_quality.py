"""Teacher test accuracy under each augmentation policy, over paired seeds, in one run.

    python -m benchmarks.augment_quality [--preset P] [--set k=v ...]
        [--policies learned,trivialaugment,randaugment,fixed,none,unsearched] [--seeds 5] --json F

Seed s trains one teacher per policy with ``teacher.seed=s`` (same data, same budget);
the learned policy is searched with ``data.augment_search.seed=s`` first, and its cost is
reported against one teacher training (``search_cost_ratio``: mean search seconds over the
mean seconds of a teacher training).  Against ``learned``, each other policy gets the
paired difference (learned minus it), its 95% CI and the paired t-test's p-value.
``unsearched`` is the ablation of the search: the learned policy's starting point (equal
probabilities, ``init_magnitude``, the same depth and sampling), used as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    import numpy as np

    from benchmarks.common import paired_stats, write_json
    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search
    from pipelines.config.loader import load_config
    from pipelines.engine import distributed
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.fit import fit_teacher, teacher_inputs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--policies", default="learned,trivialaugment,randaugment,fixed,none")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    policies = args.policies.split(",")
    unsearched = Path(tempfile.mkdtemp()) / "unsearched.json"
    base_cfg = load_config(args.preset, None, args.overrides)
    unsearched.write_text(json.dumps(augment_search.policy_spec(base_cfg, augment_search.starting_policy(base_cfg))))
    acc: dict[str, list[float]] = {p: [] for p in policies}
    seconds: dict[str, list[float]] = {p: [] for p in policies}
    search_seconds: list[float] = []
    learned_seed0 = None
    for seed in range(args.seeds):
        for policy in policies:
            chosen = ["data.augment_policy=learned", f"data.augment_policy_file={unsearched}"] \
                if policy == "unsearched" else [f"data.augment_policy={policy}"]
            cfg = load_config(args.preset, None, [*args.overrides, *chosen, f"teacher.seed={seed}",
                                                  f"data.augment_search.seed={seed}"])
            data = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
            if policy == "learned":
                searched = augment_search.learned_policy(cfg, data)
                search_seconds.append(searched.seconds)
                learned_seed0 = learned_seed0 or searched.spec
            start = time.perf_counter()
            source, augment = teacher_inputs(cfg, data)
            model, _ = fit_teacher(cfg.teacher, data, augment, source=source)
            seconds[policy].append(time.perf_counter() - start)
            acc[policy].append(evaluate(model, data.x("test"), data.y("test"), data.num_classes).accuracy)
            print(f"seed {seed} {policy}: test acc {acc[policy][-1]:.4f} ({seconds[policy][-1]:.0f} s)", flush=True)
    result = {"preset": args.preset or "digits", "overrides": args.overrides, "seeds": args.seeds,
              "policies": {p: {"test_acc": float(np.mean(acc[p])), "test_acc_std": float(np.std(acc[p], ddof=1))
                               if args.seeds > 1 else 0.0, "seconds": float(np.mean(seconds[p])),
                               "per_seed": acc[p]} for p in policies}}
    if "learned" in policies:
        result["vs_learned"] = {}
        for p in policies:
            if p == "learned":
                continue
            diff = np.array(acc["learned"]) - np.array(acc[p])
            paired = paired_stats(diff) if len(diff) > 1 else {"ci95": [float("nan")] * 2, "p": float("nan")}
            result["vs_learned"][p] = {"diff": float(diff.mean()), "ci95": paired["ci95"][1] - float(diff.mean()),
                                       "p": paired["p"]}
        teacher_seconds = float(np.mean([s for p in policies for s in seconds[p]]))
        result["learned_policy_seed0"] = learned_seed0
        result["search_seconds"] = float(np.mean(search_seconds))
        result["search_cost_ratio"] = result["search_seconds"] / teacher_seconds
        result["target_search_cost_ratio_max"] = 1.5
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
