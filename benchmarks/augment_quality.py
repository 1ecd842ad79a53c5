"""Teacher test accuracy under each augmentation policy, over paired seeds, in one run.

    python -m benchmarks.augment_quality [--preset P] [--set k=v ...]
        [--policies learned,trivialaugment,randaugment,fixed,none,unsearched] [--seeds 5]
        [--first-seed 0] [--threads N] [--row-set ROW:k=v ...] [--versus ROW] --json F
    python -m benchmarks.augment_quality --merge A.json B.json ... [--versus ROW] --json F
    python -m benchmarks.augment_quality --smoke --json F  # seconds: learned, fixed, unsearched; tiny sizes

Seed s trains one teacher per policy with ``teacher.seed=s`` (same data, same budget);
the learned policy is searched with ``data.augment_search.seed=s`` first, and its cost is
reported against one teacher training (``search_cost_ratio``: mean search seconds over the
mean seconds of a teacher training).  Each row is compared with the ``--versus`` row
(``learned``): the paired difference (the ``--versus`` row minus it), its 95% CI and the paired
t-test's p-value.  ``unsearched`` is the ablation of the search: the learned policy's
starting point (equal probabilities, ``init_magnitude``, the same depth and sampling),
used as it is.

A row is a policy, or ``NAME=POLICY`` with overrides of its own (``--row-set NAME:k=v``),
e.g. ``--policies population=learned --row-set population:data.augment_search.method=population``.

A long table can be measured in parts, then combined by ``--merge`` (which recomputes the
statistics): parts over disjoint seeds with the same rows, or parts over the same seeds
with different rows.  Parts must share the preset, the ``--set`` overrides and
``--threads`` (a teacher's numbers depend on its thread count); a merge refuses any other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# what every part of one table must share
_SETTINGS = ("preset", "overrides", "threads")
# --smoke: the search, a search-free policy and the search's ablation, 2 seeds, tiny sizes.
SMOKE = ["--seeds", "2", "--policies", "learned,fixed,unsearched", *[x for item in (
    "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5",
    "data.augment_search.steps=4") for x in ("--set", item)]]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--policies", default="learned,trivialaugment,randaugment,fixed,none")
    parser.add_argument("--row-set", dest="row_sets", action="append", default=[],
                        help="ROW:key=value, an override for one row only")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--merge", nargs="+", type=Path, help="JSON of parts of one table, to combine")
    parser.add_argument("--versus", default="learned", help="the row every other is compared with")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    raw = _merged([json.loads(p.read_text()) for p in args.merge], parser) if args.merge else measure(args, parser)
    write_json(args.json, summarise(raw, args.versus))
    return 0


def _rows(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Row name -> policy, and row name -> its own overrides."""
    rows = dict(item.split("=", 1) if "=" in item else (item, item) for item in args.policies.split(","))
    own: dict[str, list[str]] = {row: [] for row in rows}
    for item in args.row_sets:
        row, _, override = item.partition(":")
        if row not in rows or "=" not in override:
            parser.error(f"--row-set {item!r}: expected ROW:key=value with ROW one of {', '.join(rows)}")
        own[row].append(override)
    return rows, own


def measure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Per-seed accuracies and seconds of every row, and the searches' seconds."""
    import torch

    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search
    from pipelines.config.loader import load_config
    from pipelines.engine import distributed
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import fit_teacher, teacher_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, own = _rows(args, parser)
    unsearched = Path(tempfile.mkdtemp())
    raw = {"preset": args.preset or "digits", "overrides": args.overrides, "threads": torch.get_num_threads(),
           "policies_run": list(rows), "row_policy": rows, "row_overrides": own, "seed_list": [],
           "acc": {r: [] for r in rows}, "seconds": {r: [] for r in rows},
           "search_seconds": {r: [] for r, p in rows.items() if p == "learned"}, "learned_policy_first_seed": {}}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        raw["seed_list"].append(seed)
        for row, policy in rows.items():
            overrides = [*args.overrides, *own[row]]
            if policy == "unsearched":
                start_cfg = load_config(args.preset, None, overrides)
                path = unsearched / f"{row}.json"
                initial = augment_search.starting_policy(start_cfg.data.augment_search)
                path.write_text(json.dumps(augment_search.policy_spec(start_cfg.data, initial)))
                chosen = ["data.augment_policy=learned", f"data.augment_policy_file={path}"]
            else:
                chosen = [f"data.augment_policy={policy}"]
            cfg = load_config(args.preset, None, [*overrides, *chosen, f"teacher.seed={seed}",
                                                  f"data.augment_search.seed={seed}"])
            data = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
            if policy == "learned":
                searched = augment_search.learned_policy(augment_search.AugmentContext.from_config(cfg, data))
                raw["search_seconds"][row].append(searched.seconds)
                raw["learned_policy_first_seed"].setdefault(row, searched.spec)
            start = time.perf_counter()
            source, augment = teacher_inputs(TeacherContext.from_config(cfg, data))
            model, _ = fit_teacher(cfg.teacher, data, augment, source=source)
            raw["seconds"][row].append(time.perf_counter() - start)
            raw["acc"][row].append(evaluate(model, data.x("test"), data.y("test"), data.num_classes).accuracy)
            print(f"seed {seed} {row}: test acc {raw['acc'][row][-1]:.4f} ({raw['seconds'][row][-1]:.0f} s)",
                  flush=True)
    return raw


def _upgraded(raw: dict) -> dict:
    """A part written before rows had names and overrides of their own."""
    rows, searched, first = raw["policies_run"], raw["search_seconds"], raw.get("learned_policy_first_seed")
    if not isinstance(searched, dict):  # one list, of the row "learned"
        searched = {"learned": searched} if searched else {}
    if first is None or "ops" in first:  # one policy (or none), of the row "learned"
        first = {"learned": first} if first else {}
    return {**raw, "row_policy": raw.get("row_policy", {r: r for r in rows}),
            "row_overrides": raw.get("row_overrides", {r: [] for r in rows}),
            "search_seconds": searched, "learned_policy_first_seed": first}


def _merged(parts: list[dict], parser: argparse.ArgumentParser) -> dict:
    """One table out of its parts (each part's ``raw``): over disjoint seeds with the same
    rows, or over the same seeds with different rows."""
    raws = [_upgraded(part["raw"]) for part in parts]
    for key in _SETTINGS:
        if any(r[key] != raws[0][key] for r in raws):
            parser.error(f"--merge: the parts differ in {key}: {[r[key] for r in raws]}")
    same_rows = all((r["row_policy"], r["row_overrides"]) == (raws[0]["row_policy"], raws[0]["row_overrides"])
                    for r in raws)
    if same_rows:
        seeds = [s for r in raws for s in r["seed_list"]]
        if len(set(seeds)) != len(seeds):
            parser.error(f"--merge: a seed appears in two parts: {seeds}")
        merged = {**raws[0], "seed_list": seeds, "parts": len(raws)}
        for key in ("acc", "seconds", "search_seconds"):
            merged[key] = {row: [v for r in raws for v in r[key][row]] for row in raws[0][key]}
        return merged
    names = [row for r in raws for row in r["policies_run"]]
    if any(r["seed_list"] != raws[0]["seed_list"] for r in raws) or len(set(names)) != len(names):
        parser.error("--merge: parts must share their rows (and differ in seeds) or their seeds (and differ in "
                     f"rows); got rows {[r['policies_run'] for r in raws]}, seeds {[r['seed_list'] for r in raws]}")
    merged = {**raws[0], "policies_run": names, "parts": len(raws)}
    for key in ("row_policy", "row_overrides", "acc", "seconds", "search_seconds", "learned_policy_first_seed"):
        merged[key] = {row: value for r in raws for row, value in r[key].items()}
    return merged


def summarise(raw: dict, versus: str = "learned") -> dict:
    """Means, spreads and the paired comparisons against the ``versus`` row."""
    import numpy as np

    from benchmarks.common import paired_stats

    raw = _upgraded(raw)
    acc, seconds, rows, n = raw["acc"], raw["seconds"], raw["policies_run"], len(raw["seed_list"])
    result = {"preset": raw["preset"], "overrides": raw["overrides"], "seeds": n, "seed_list": raw["seed_list"],
              "threads": raw["threads"],
              "policies": {r: {"policy": raw["row_policy"][r], "overrides": raw["row_overrides"][r],
                               "test_acc": float(np.mean(acc[r])),
                               "test_acc_std": float(np.std(acc[r], ddof=1)) if n > 1 else 0.0,
                               "seconds": float(np.mean(seconds[r])), "per_seed": acc[r]} for r in rows}}
    if versus in rows:
        result["versus"] = versus
        result[f"vs_{versus}"] = {}
        for r in rows:
            if r == versus:
                continue
            diff = np.array(acc[versus]) - np.array(acc[r])
            paired = paired_stats(diff)  # one seed, or no spread: no interval (None)
            half = paired["ci95"][1] - paired["diff"] if paired["ci95"] is not None else None
            result[f"vs_{versus}"][r] = {"diff": paired["diff"], "ci95": half, "p": paired["p"]}
    teacher_seconds = float(np.mean([s for r in rows for s in seconds[r]]))
    result["search_seconds"] = {r: float(np.mean(v)) for r, v in raw["search_seconds"].items() if v}
    result["search_cost_ratio"] = {r: v / teacher_seconds for r, v in result["search_seconds"].items()}
    result["target_search_cost_ratio_max"] = 1.5
    result["learned_policy_first_seed"] = raw["learned_policy_first_seed"]
    result["raw"] = raw
    return result


if __name__ == "__main__":
    sys.exit(main())
