"""The architecture stage measured: every searcher side by side on one teacher and one
budget (the hand-picked student's batch-1 latency, read beside every point, unless
``--set student.budget...``), over
search seeds, each search's chosen student retrained at the full budget by ``kd`` over
paired student seeds against the hand-picked student; a plain grid of the families'
standard sizes as a second baseline; the teacher-aware reward against the scratch reward;
the search's compute against standard practice (the teacher's training and kd_tuned's grid).

    python -m benchmarks.arch_search --preset fashion-mnist [--set k=v ...] [--searchers random,evolution,...] \\
        [--search-seeds 5] [--trials 16] [--seeds 10] --json PATH
    python -m benchmarks.arch_search --smoke --json PATH  # seconds: digits, tiny budgets

Run it in a fresh ``METADISTILL_HOME`` on an idle machine: latency limits are read on this
machine, and a cached teacher reports its loading time, not its training time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

# The families' standard sizes: the plain grid every searcher must also beat.
GRID = {"mlp": {"depth": [1], "width": [32, 64, 128, 256]},
        "cnn": {"stages": [2], "width": [8, 16, 32], "depth": [1], "kernel": [3]},
        "resnet": {"depth": [8], "width": [4, 8, 16]}}
SMOKE = ["--preset", "digits", "--search-seeds", "1", "--seeds", "2", "--trials", "3", "--searchers", "random,evolution",
         *[x for item in ("teacher.train.steps=30", "student.train.steps=40", "arch_search.proxy_steps=20",
                          "kd.grid_alpha=[0.9]", "kd.grid_temperature=[4.0]", "arch_search.default_budget=macs",
                          "student.budget.macs=5000")
           for x in ("--set", item)]]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import paired_stats, parse_args, write_json
    from models.space import points
    from pipelines.config.arch import SEARCHERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-mnist")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--searchers", default=",".join(SEARCHERS))
    parser.add_argument("--search-seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=10, help="student seeds of each full-budget retrain")
    parser.add_argument("--no-scratch", action="store_true", help="skip the scratch-reward searches")
    parser.add_argument("--no-grid", action="store_true", help="skip the plain grid of the families' standard sizes")
    parser.add_argument("--json", help="where the result goes")
    parser.add_argument("--report", metavar="JSON", help="print the docs' table of a result instead of running")
    args = parse_args(parser, argv, SMOKE)
    if args.report:
        print(report(json.loads(open(args.report).read())))
        return 0
    if not args.json:
        parser.error("--json PATH is required (or --report JSON)")

    from pipelines import data as data_stage
    from pipelines.arch.stage import ArchContext, latency_probe, needs_latency, search
    from pipelines.config.loader import load_config
    from pipelines.config.training import ModelConfig
    from pipelines.students.context import StudentContext
    from pipelines.students.fit import run_student
    from pipelines.students.tuned import TUNINGS, grid_search
    from pipelines.teacher import improve
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    base = [*args.overrides, "arch_search.enabled=true", f"arch_search.trials={args.trials}"]
    cfg = load_config(args.preset, None, base)
    prepared = data_stage.prepare(cfg.data)
    start = time.perf_counter()
    tctx = TeacherContext.from_config(cfg, prepared)
    outcome = obtain_teacher(tctx)
    teacher, teacher_seconds = outcome.model, outcome.train_seconds or outcome.seconds
    if improve.improves(cfg.teacher.improve, prepared):
        better = improve.improve_teacher(tctx, teacher)
        teacher_seconds += better.train_seconds or better.seconds
        # As the flow: the improved teacher only when it beats the original beyond noise.
        if improve.judge_improvement(teacher, better.model, prepared, cfg.teacher.improve.keep_p).kept:
            teacher = better.model
    grid_seconds = grid_search(StudentContext.from_config(cfg, prepared, teacher, 0), TUNINGS["kd"])["grid_seconds"]
    standard = teacher_seconds + grid_seconds
    print(f"teacher and kd_tuned grid: {standard:.0f} s ({time.perf_counter() - start:.0f} s wall)", flush=True)

    searches: dict[str, list[dict]] = {}
    readings: list[float] = []
    with latency_probe(needs_latency(cfg.arch_search, cfg.student.budget)) as probe:
        if probe is not None and cfg.student.budget.latency_ms is None:
            # The limit is the hand-picked student's batch-1 latency, which each search reads
            # beside every point (pipelines.arch.space.Costs); here, how well 5 readings agree.
            hand = cfg.student.model
            readings = [probe.latency(hand.arch, hand.kwargs, prepared.input_shape, prepared.num_classes)["median_ms"]
                        for _ in range(5)]
            print(f"hand-picked latency: {float(np.median(readings)):.4g} ms (readings {readings})", flush=True)
        def run_search(label: str, extra: list[str]) -> dict:
            c = load_config(args.preset, None, base + extra)
            result = search(ArchContext.from_config(c, prepared, teacher, probe), say=lambda m: print(m, flush=True))
            trained = [t for t in result.trials if not t["over_budget"] and t["repeat_of"] is None]
            chosen_trial = next((t for t in trained if t["state"] == "complete" and t["arch"] == result.chosen["arch"]
                                 and t["kwargs"] == result.chosen["kwargs"]), None)
            return {"search": label, "chosen": result.chosen, "reason": result.reason, "seconds": result.seconds,
                    "trained": len(trained), "budget": result.budget, "reference": result.reference,
                    "chosen_proxy_acc": (chosen_trial or result.reference)["held_out_acc"],
                    "best_proxy_acc_seen": max([t["held_out_acc"] for t in trained
                                                if t["state"] == "complete"] or [0.0])}

        for searcher in args.searchers.split(","):
            searches[searcher] = [run_search(searcher, [f"arch_search.searcher={searcher}", f"arch_search.seed={k}"])
                                  for k in range(args.search_seeds)]
        if not args.no_grid:
            grid_points = len(points(GRID))
            searches["grid"] = [run_search("grid", ["arch_search.searcher=random", f"arch_search.trials={grid_points}",
                                                    "arch_search.halving=false", f"arch_search.space={json.dumps(GRID)}"])]
        default = cfg.arch_search.searcher
        if not args.no_scratch:
            searches["scratch_reward"] = [run_search("scratch", [f"arch_search.searcher={default}", f"arch_search.seed={k}",
                                                                 "arch_search.reward=scratch"])
                                          for k in range(args.search_seeds)]

        # Each chosen network's batch-1 latency over the hand-picked one's, read in turn (7 pairs):
        # what the budget was meant to hold, checked once more after the searches.
        latency_ratio = {}
        if probe is not None:
            hand = cfg.student.model
            for runs in searches.values():
                for r in runs:
                    if (key := _key(r["chosen"])) not in latency_ratio:
                        pairs = [(probe.latency(r["chosen"]["arch"], r["chosen"]["kwargs"], prepared.input_shape,
                                                prepared.num_classes)["median_ms"],
                                  probe.latency(hand.arch, hand.kwargs, prepared.input_shape,
                                                prepared.num_classes)["median_ms"]) for _ in range(7)]
                        latency_ratio[key] = float(np.median([a / b for a, b in pairs]))

    # Every distinct chosen network (and the hand-picked one) retrained at the full budget by kd.
    archs = {_key(cfg.student.model.model_dump(mode="json")): cfg.student.model.model_dump(mode="json")}
    for runs in searches.values():
        for r in runs:
            archs.setdefault(_key(r["chosen"]), r["chosen"])
    seeds = list(range(args.seeds))
    full: dict[str, dict] = {}
    for key, model in archs.items():
        c = load_config(args.preset, None, base).model_copy(deep=True)
        c.student.model = ModelConfig(**model)
        accs, secs = [], []
        for seed in seeds:
            o = run_student("kd", c, prepared, teacher, seed)
            accs.append(o.evaluation.accuracy)
            secs.append(o.result.seconds)
        full[key] = {"model": model, "test_acc": accs, "mean": float(np.mean(accs)), "train_seconds": float(np.mean(secs))}
        print(f"{key}: kd test {100 * np.mean(accs):.2f}% over {len(seeds)} seeds", flush=True)

    hand = np.array(full[_key(cfg.student.model.model_dump(mode="json"))]["test_acc"])

    def summary(runs: list[dict]) -> dict:
        per_seed = np.mean([full[_key(r["chosen"])]["test_acc"] for r in runs], axis=0)  # over search seeds
        stats = paired_stats(100 * (per_seed - hand))
        return {"runs": runs, "chosen": [_key(r["chosen"]) for r in runs], "test_acc": float(per_seed.mean()),
                "vs_hand_picked": stats, "search_seconds": float(np.mean([r["seconds"] for r in runs])),
                "cost_vs_standard_practice": float(np.mean([r["seconds"] for r in runs]) / standard)}

    first = searches[args.searchers.split(",")[0]][0]
    spread = 100 * (max(readings) - min(readings)) / float(np.median(readings)) if readings else None
    result = {"preset": args.preset, "overrides": args.overrides, "budget": first["budget"], "trials": args.trials,
              "latency_readings_ms": readings, "latency_readings_spread_pct": spread,
              "chosen_latency_vs_hand_picked": latency_ratio,
              "seeds": seeds,
              "search_seeds": args.search_seeds, "default_searcher": cfg.arch_search.searcher,
              "hand_picked": {"model": cfg.student.model.model_dump(mode="json"), "test_acc": float(hand.mean())},
              "standard_practice_seconds": standard, "teacher_seconds": teacher_seconds, "kd_grid_seconds": grid_seconds,
              "searches": {name: summary(runs) for name, runs in searches.items()}, "retrained": full}
    ranked = sorted((n for n in searches if n not in ("scratch_reward",)), key=lambda n: -result["searches"][n]["test_acc"])
    result["best_searcher"] = ranked[0]
    if "scratch_reward" in searches:
        aware = np.mean([full[_key(r["chosen"])]["test_acc"] for r in searches[default]], axis=0)
        scratch = np.mean([full[_key(r["chosen"])]["test_acc"] for r in searches["scratch_reward"]], axis=0)
        result["teacher_aware_vs_scratch"] = {
            "same_choice": [a["chosen"] == b["chosen"] for a, b in zip(searches[default], searches["scratch_reward"])],
            "diff_after_kd": paired_stats(100 * (aware - scratch))}
    write_json(args.json, result)
    return 0


def report(result: dict) -> str:
    """The docs' table of a result: per search, its chosen networks, the retrained students'
    test accuracy, the paired difference from the hand-picked student, and the compute."""
    from benchmarks.common import paired_text

    rows = ["| search | chosen (per search seed) | `kd` student test acc % | vs hand-picked, points (95% CI, p) | "
            "search s | x standard practice |", "|---|---|---|---|---|---|"]
    hand = result["hand_picked"]
    rows.append(f"| hand-picked: {_key(hand['model'])} | | {100 * hand['test_acc']:.2f} | | | |")
    for name, s in result["searches"].items():
        counts: dict[str, int] = {}
        for c in s["chosen"]:
            counts[c] = counts.get(c, 0) + 1
        chosen = ", ".join(f"{c}" + (f" x{n}" if n > 1 else "") for c, n in counts.items())
        v = s["vs_hand_picked"]
        rows.append(f"| {name} | {chosen} | {100 * s['test_acc']:.2f} | {paired_text(v)} | {s['search_seconds']:.0f} | "
                    f"{s['cost_vs_standard_practice']:.2f} |")
    lines = ["\n".join(rows)]
    if aware := result.get("teacher_aware_vs_scratch"):
        d = aware["diff_after_kd"]
        lines.append(f"Teacher-aware ({result['default_searcher']}) against the scratch reward: a different network in "
                     f"{sum(not x for x in aware['same_choice'])} of {len(aware['same_choice'])} search seeds; after "
                     f"`kd`, {paired_text(d)} points.")
    return "\n\n".join(lines)


def _key(model: dict) -> str:
    return f"{model['arch']} {json.dumps(model.get('kwargs') or {}, sort_keys=True)}"


if __name__ == "__main__":
    raise SystemExit(main())
