"""Split the default pipeline's wall time into stage compute, start-up (imports) and
orchestration + tracking overhead (Prefect server and task runs, MLflow logging), for a
first run in a fresh project home and a second identical run (cached data and teacher).

    python -m benchmarks.pipeline_overhead --json results/pipeline_overhead.json
    python -m benchmarks.pipeline_overhead --smoke --json PATH  # both runs of a tiny pipeline (TINY)

Targets on the 2-core reference machine: first run <= 180 s including start-up,
orchestration + tracking <= 15% of wall time, second run <= 60% of the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A default pipeline at a size that runs in seconds (the stages' compute is not the point there).
TINY = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5",
        "teacher.improve.method=none", "student.train.steps=4", "student.seeds=[0]", "student.methods=[scratch]"]
SMOKE = [x for item in TINY for x in ("--set", item)]


def run_once(home: Path, summary: Path, extra: list[str]) -> dict:
    env = {**os.environ, "METADISTILL_HOME": str(home), "METADISTILL_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--summary", str(summary), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"metadistill run failed with exit code {proc.returncode}")
    data = json.loads(summary.read_text())
    compute = sum(data["timings"].values())
    startup = data["import_seconds"]
    overhead = wall - compute - startup
    return {"wall_s": wall, "compute_s": compute, "stage_compute_s": data["timings"],
            "startup_imports_s": startup, "orchestration_tracking_s": overhead,
            "overhead_fraction": overhead / wall, "overhead_incl_startup_fraction": (overhead + startup) / wall,
            "test_acc": {m: v["test_acc"] for m, v in data["methods"].items()}}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed to metadistill run")
    args = parse_args(parser, argv, SMOKE)
    extra = [x for o in args.overrides for x in ("--set", o)]
    with tempfile.TemporaryDirectory(prefix="md-bench-") as tmp:
        home = Path(tmp) / "home"
        first = run_once(home, Path(tmp) / "first.json", extra)
        second = run_once(home, Path(tmp) / "second.json", extra)
    result = {
        "first_run": first, "second_run": second,
        "second_over_first": second["wall_s"] / first["wall_s"],
        "targets": {"first_run_wall_s_max": 180, "overhead_fraction_max": 0.15, "second_over_first_max": 0.60},
    }
    result["meets_targets"] = {
        "first_run_wall": first["wall_s"] <= 180,
        "overhead_first": first["overhead_fraction"] <= 0.15,
        "overhead_second": second["overhead_fraction"] <= 0.15,
        "second_over_first": result["second_over_first"] <= 0.60,
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
