"""A team's two costs, measured side by side in one run:

1. **Overlap:** 4 default pipelines started together on one fresh project home, against the
   same 4 one after another on another fresh home (target: together <= 1.3x in wall time;
   all finish, versions 1-4, one champion).
2. **Tracking over HTTP:** the default pipeline with MLflow on a real tracking server (on
   PostgreSQL, artifacts through the server, all started by ``metadistill services``'s
   code) against the project home's own SQLite store, fresh homes, pairs in alternating
   order (target: at most 10% more wall time).

    python -m benchmarks.team_runs --json docs/benchmarks/team_runs.json
    python -m benchmarks.team_runs --smoke --json PATH  # 2 overlapping tiny pipelines, 1 sqlite/http pair

Nothing else may run on the machine meanwhile (every run takes both cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.common.net import free_port
from pipelines.orchestrate.services import Ports, Services

SMOKE = ["--runs", "2", "--pairs", "1", *[x for item in (
    "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5", "teacher.improve.method=none",
    "student.train.steps=4", "student.seeds=[0]", "student.methods=[scratch]") for x in ("--set", item)]]


def start_run(home: Path, env_extra: dict[str, str], extra: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    env.update({"METADISTILL_HOME": str(home), "METADISTILL_PROGRESS": "0", **env_extra})
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", *extra], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait() != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"metadistill run failed with exit code {proc.returncode} (log {log})")


def timed(home: Path, env_extra: dict[str, str], extra: list[str], log: Path) -> float:
    start = time.perf_counter()
    finish(start_run(home, env_extra, extra, log), log)
    return time.perf_counter() - start


def registry(home: Path, name: str = "metadistill-digits-student") -> dict:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return {"versions": versions, "champion": int(client.get_model_version_by_alias(name, "champion").version),
            "no_champion_yet": [v.tags.get("promotion_reason") for v in client.search_model_versions(f"name='{name}'")
                                ].count("no champion yet")}


def overlap(tmp: Path, runs: int, extra: list[str]) -> dict:
    sequential_home, together_home = tmp / "sequential", tmp / "together"
    start = time.perf_counter()
    one_by_one = [timed(sequential_home, {}, extra, tmp / f"seq{i}.log") for i in range(runs)]
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    procs = [start_run(together_home, {}, extra, tmp / f"together{i}.log") for i in range(runs)]
    for i, proc in enumerate(procs):
        finish(proc, tmp / f"together{i}.log")
    together = time.perf_counter() - start
    errors = sum("Traceback" in (tmp / f"together{i}.log").read_text() for i in range(runs))
    return {"runs": runs, "sequential_s": sequential, "sequential_each_s": one_by_one, "together_s": together,
            "together_over_sequential": together / sequential, "logs_with_a_traceback": errors,
            "registry_sequential": registry(sequential_home), "registry_together": registry(together_home)}


def http_tracking(tmp: Path, pairs: int, extra: list[str]) -> dict:
    services = Services(tmp / "services", Ports(postgres=free_port(), mlflow=free_port(), prefect=free_port()))
    services.start()
    try:
        local, server = [], []
        for i in range(pairs):  # alternate which goes first, so drift over time hits both alike
            order = [("sqlite", {}), ("http", {"MLFLOW_TRACKING_URI": services.tracking_uri})]
            for kind, env_extra in order if i % 2 == 0 else order[::-1]:
                # An experiment of its own: no champion to compare with, as on a fresh local home.
                own = [*extra, "--set", f"tracking.experiment=team-bench-{kind}{i}"]
                seconds = timed(tmp / f"{kind}{i}", env_extra, own, tmp / f"{kind}{i}.log")
                (local if kind == "sqlite" else server).append(seconds)
    finally:
        services.stop()
    return {"pairs": pairs, "sqlite_s": local, "http_postgres_s": server,
            "http_over_sqlite": statistics.mean(server) / statistics.mean(local),
            "paired_ratios": [s / q for s, q in zip(server, local)]}


def team_folder(prefix: str) -> Path:
    """A fresh folder for a benchmark's servers and homes, which PostgreSQL's own user can
    enter (it refuses to run as root; mkdtemp's folders are private)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    tmp.chmod(0o711)
    return tmp


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--runs", type=int, default=4, help="overlapping runs (default 4)")
    parser.add_argument("--pairs", type=int, default=2, help="sqlite/http pairs (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed to metadistill run")
    args = parse_args(parser, argv, SMOKE)
    extra = [x for o in args.overrides for x in ("--set", o)]
    tmp = team_folder("md-team-")
    try:
        result = {"overlap": overlap(tmp, args.runs, extra), "http_tracking": http_tracking(tmp, args.pairs, extra),
                  "settings": args.overrides, "cpus": os.cpu_count()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["targets"] = {"together_over_sequential_max": 1.3, "http_over_sqlite_max": 1.10}
    result["met"] = {"overlap": result["overlap"]["together_over_sequential"] <= 1.3
                     and result["overlap"]["logs_with_a_traceback"] == 0
                     and result["overlap"]["registry_together"]["versions"] == list(range(1, args.runs + 1))
                     and result["overlap"]["registry_together"]["no_champion_yet"] == 1,
                     "http_tracking": result["http_tracking"]["http_over_sqlite"] <= 1.10}
    write_json(Path(args.json), result)
    print({k: result["overlap"][k] for k in ("sequential_s", "together_s", "together_over_sequential")},
          {k: result["http_tracking"][k] for k in ("sqlite_s", "http_postgres_s", "http_over_sqlite")}, result["met"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
