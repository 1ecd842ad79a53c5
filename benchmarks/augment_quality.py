"""Teacher test accuracy under each augmentation policy, over paired seeds, in one run.

    python -m benchmarks.augment_quality [--preset P] [--set k=v ...]
        [--policies learned,trivialaugment,randaugment,fixed,none,unsearched] [--seeds 5]
        [--first-seed 0] [--threads N] --json F
    python -m benchmarks.augment_quality --merge A.json B.json ... --json F

Seed s trains one teacher per policy with ``teacher.seed=s`` (same data, same budget);
the learned policy is searched with ``data.augment_search.seed=s`` first, and its cost is
reported against one teacher training (``search_cost_ratio``: mean search seconds over the
mean seconds of a teacher training).  Against ``learned``, each other policy gets the
paired difference (learned minus it), its 95% CI and the paired t-test's p-value.
``unsearched`` is the ablation of the search: the learned policy's starting point (equal
probabilities, ``init_magnitude``, the same depth and sampling), used as it is.

A long table can be measured in parts: runs over disjoint seeds (``--first-seed``) with
the same preset, overrides, policies and ``--threads`` (a teacher's numbers depend on its
thread count), then ``--merge`` of their JSON, which refuses parts that differ in any of
those and recomputes the statistics over every seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# what parts must share to be merged into one table
_SETTINGS = ("preset", "overrides", "policies_run", "threads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--policies", default="learned,trivialaugment,randaugment,fixed,none")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--merge", nargs="+", type=Path, help="JSON of runs over disjoint seeds, to combine")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    from benchmarks.common import write_json

    if args.merge:
        write_json(args.json, summarise(_merged([json.loads(p.read_text()) for p in args.merge], parser)))
        return 0
    write_json(args.json, summarise(measure(args)))
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Per-seed accuracies and seconds of every policy, and the search's seconds."""
    import torch

    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search
    from pipelines.config.loader import load_config
    from pipelines.engine import distributed
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.fit import fit_teacher, teacher_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    policies = args.policies.split(",")
    base_cfg = load_config(args.preset, None, args.overrides)
    unsearched = Path(tempfile.mkdtemp()) / "unsearched.json"
    unsearched.write_text(json.dumps(augment_search.policy_spec(base_cfg, augment_search.starting_policy(base_cfg))))
    raw = {"preset": args.preset or "digits", "overrides": args.overrides, "policies_run": policies,
           "threads": torch.get_num_threads(), "seed_list": [], "acc": {p: [] for p in policies},
           "seconds": {p: [] for p in policies}, "search_seconds": [], "learned_policy_first_seed": None}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        raw["seed_list"].append(seed)
        for policy in policies:
            chosen = ["data.augment_policy=learned", f"data.augment_policy_file={unsearched}"] \
                if policy == "unsearched" else [f"data.augment_policy={policy}"]
            cfg = load_config(args.preset, None, [*args.overrides, *chosen, f"teacher.seed={seed}",
                                                  f"data.augment_search.seed={seed}"])
            data = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
            if policy == "learned":
                searched = augment_search.learned_policy(cfg, data)
                raw["search_seconds"].append(searched.seconds)
                raw["learned_policy_first_seed"] = raw["learned_policy_first_seed"] or searched.spec
            start = time.perf_counter()
            source, augment = teacher_inputs(cfg, data)
            model, _ = fit_teacher(cfg.teacher, data, augment, source=source)
            raw["seconds"][policy].append(time.perf_counter() - start)
            raw["acc"][policy].append(evaluate(model, data.x("test"), data.y("test"), data.num_classes).accuracy)
            print(f"seed {seed} {policy}: test acc {raw['acc'][policy][-1]:.4f} "
                  f"({raw['seconds'][policy][-1]:.0f} s)", flush=True)
    return raw


def _merged(parts: list[dict], parser: argparse.ArgumentParser) -> dict:
    """One measurement out of parts over disjoint seeds (each part's ``raw``)."""
    raws = [part["raw"] for part in parts]
    for key in _SETTINGS:
        if any(r[key] != raws[0][key] for r in raws):
            parser.error(f"--merge: the parts differ in {key}: {[r[key] for r in raws]}")
    seeds = [s for r in raws for s in r["seed_list"]]
    if len(set(seeds)) != len(seeds):
        parser.error(f"--merge: a seed appears in two parts: {seeds}")
    merged = {**raws[0], "seed_list": seeds, "parts": len(raws)}
    for key in ("acc", "seconds"):
        merged[key] = {p: [v for r in raws for v in r[key][p]] for p in raws[0]["policies_run"]}
    merged["search_seconds"] = [v for r in raws for v in r["search_seconds"]]
    return merged


def summarise(raw: dict) -> dict:
    """Means, spreads and the paired comparisons against ``learned``, over the seeds of ``raw``."""
    import numpy as np

    from benchmarks.common import paired_stats

    acc, seconds, policies, n = raw["acc"], raw["seconds"], raw["policies_run"], len(raw["seed_list"])
    result = {"preset": raw["preset"], "overrides": raw["overrides"], "seeds": n, "seed_list": raw["seed_list"],
              "threads": raw["threads"],
              "policies": {p: {"test_acc": float(np.mean(acc[p])), "test_acc_std": float(np.std(acc[p], ddof=1))
                               if n > 1 else 0.0, "seconds": float(np.mean(seconds[p])),
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
        result["learned_policy_seed0"] = raw["learned_policy_first_seed"]
        result["search_seconds"] = float(np.mean(raw["search_seconds"]))
        result["search_cost_ratio"] = result["search_seconds"] / teacher_seconds
        result["target_search_cost_ratio_max"] = 1.5
    result["raw"] = raw
    return result


if __name__ == "__main__":
    sys.exit(main())
