"""Does training several students at once pay?  The same sweep (methods x seeds) run by
``metadistill run`` twice in one home, one student at a time and ``--concurrency`` at a
time (Prefect's thread-pool task runner; on one GPU they share it, on the CPU they split
the cores), compared on the sweep's wall seconds and student by student on test accuracy.

    python -m benchmarks.concurrent_students [--concurrency 3] [--set k=v ...] --json PATH
    python -m benchmarks.concurrent_students --smoke --json PATH  # 2 tiny students, 2 at a time

The teacher is trained (or read from the cache) by a first run that is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--concurrency", "2", *[x for item in (
    "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5", "teacher.improve.method=none",
    "student.train.steps=4", "student.seeds=[0]", "student.methods=[scratch, kd]") for x in ("--set", item)]]


def run(overrides: list[str], summary: Path) -> dict:
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-c", "from pipelines.cli import entry; entry()", "run", *sets,
           "--set", "tracking.register_best=false", "--summary", str(summary)]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "METADISTILL_PROGRESS": "0"})
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("METADISTILL_HOME", str(Path(tmp) / "home"))
        run([*args.overrides, "student.methods=[scratch]", "student.seeds=[0]"], Path(tmp) / "warm.json")
        alone = run([*args.overrides, "student.concurrency=1"], Path(tmp) / "alone.json")
        together = run([*args.overrides, f"student.concurrency={args.concurrency}"], Path(tmp) / "together.json")
    by_key = {(s["method"], s["seed"]): s for s in alone["students"]}
    rows = [{"method": s["method"], "seed": s["seed"], "test_acc_alone": by_key[(s["method"], s["seed"])]["test_acc"],
             "test_acc_together": s["test_acc"]} for s in together["students"]]
    diff = max(abs(r["test_acc_alone"] - r["test_acc_together"]) for r in rows)
    sequential, concurrent = alone["students_wall_seconds"], together["students_wall_seconds"]
    write_json(args.json, {
        "device": together["device"], "concurrency": together["student_concurrency"], "students": len(rows),
        "overrides": args.overrides, "sequential_wall_s": sequential, "concurrent_wall_s": concurrent,
        "speedup": sequential / concurrent, "max_abs_test_acc_diff": diff, "seed_for_seed_equal": diff == 0.0,
        "students_table": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
