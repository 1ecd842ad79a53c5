"""The pipeline on a busy machine: one CPU-bound process beside it, as on a laptop, a
shared box or a CI runner, against the same machine idle, side by side in one run.

    python -m benchmarks.busy_machine --json docs/benchmarks/busy_machine.json
    python -m benchmarks.busy_machine --smoke --json PATH  # 3 steps on 8x8 only; a tiny pipeline

Part 1, training steps/s of resnet8 (digits 8x8 and random 32x32 images, batch 64) with
2 threads (spinning OpenMP waits, torch's default), 2 threads with passive waits, and 1
thread, idle and busy: why the thread count must follow the free cores.  Part 2, the
default pipeline (``metadistill run``, data and teacher not cached: a fresh project home
each time) idle and busy with today's thread rule, and idle with the old rule (as many
threads as cores, ``--set dist.threads=<cores>``).  Targets: busy <= 2.5x idle; idle no
slower than the old rule (ratios of runs in this one process).
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

STEPS = """
import sys, time, torch
from models.registry import build_model
side, steps = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
if side == 8:
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = torch.tensor(d.images[:, None] / 16, dtype=torch.float32), torch.tensor(d.target)
else:
    x, y = torch.randn(2048, 3, side, side), torch.randint(0, 10, (2048,))
model = build_model("resnet8", tuple(x.shape[1:]), 10)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(0)
def step():
    i = torch.randint(len(y), (64,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(10):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(steps / (time.perf_counter() - start))
"""
BURNER = "while True: pass"
SMOKE = ["--sides", "8", "--steps", "3", *[x for item in (
    "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5", "teacher.improve.method=none",
    "student.train.steps=4", "student.seeds=[0]", "student.methods=[scratch]") for x in ("--set", item)]]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                            "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, "METADISTILL_PROGRESS": "0", **extra}


def steps_per_second(side: int, steps: int, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, str(side), str(steps)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def pipeline(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="md-busy-") as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--summary", str(summary),
               *[x for o in overrides for x in ("--set", o)]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(METADISTILL_HOME=str(Path(tmp) / "home")), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"metadistill run failed with exit code {proc.returncode}")
        data = json.loads(summary.read_text())
    return {"wall_s": wall, "threads": data.get("threads"), "timings": data["timings"],
            "test_acc": {m: v["test_acc"] for m, v in data["methods"].items()}}


class Busy:
    """One CPU-bound process beside the measured one, for the length of the block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BURNER])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed to metadistill run")
    parser.add_argument("--with-old-busy", action="store_true",
                        help="also run the pipeline busy under the old rule (slow: the case this fixes)")
    parser.add_argument("--sides", default="8,32", help="image sides of part 1 (8: digits; else random images)")
    parser.add_argument("--steps", default="300,60", help="timed steps of part 1, one count per side")
    args = parse_args(parser, argv, SMOKE)
    sides = [int(v) for v in args.sides.split(",")]
    counts = [int(v) for v in args.steps.split(",")]
    if len(counts) != len(sides):
        parser.error(f"--steps {args.steps}: one count per side of --sides {args.sides}")
    cores = len(os.sched_getaffinity(0))
    settings = {"2 threads, spinning waits": _env(OMP_NUM_THREADS="2"),
                "2 threads, passive waits": _env(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE"),
                "1 thread": _env(OMP_NUM_THREADS="1")}
    steps = {}
    for load in ("idle", "busy"):
        with Busy() if load == "busy" else _Idle():
            for side, n in zip(sides, counts):
                for name, env in settings.items():
                    steps[f"{load} | {side}x{side} | {name}"] = steps_per_second(side, n, env)
                    print(f"{load} {side}x{side} {name}: {steps[f'{load} | {side}x{side} | {name}']:.1f} steps/s",
                          flush=True)
    runs = {"idle": pipeline(args.overrides)}
    with Busy():
        runs["busy"] = pipeline(args.overrides)
    runs["idle, old rule"] = pipeline([*args.overrides, f"dist.threads={cores}"])
    if args.with_old_busy:
        with Busy():
            runs["busy, old rule"] = pipeline([*args.overrides, f"dist.threads={cores}"])
    for name, r in runs.items():
        print(f"pipeline {name}: {r['wall_s']:.1f} s, {r['threads']} thread(s)", flush=True)
    result = {"cores": cores, "machine": "the 2-core reference machine" if cores == 2 else f"{cores} usable CPUs",
              "resnet8_steps_per_second": steps, "pipeline": runs,
              "busy_over_idle": runs["busy"]["wall_s"] / runs["idle"]["wall_s"],
              "idle_over_old_rule": runs["idle"]["wall_s"] / runs["idle, old rule"]["wall_s"],
              "targets": {"busy_over_idle_max": 2.5, "idle_over_old_rule_max": 1.0}}
    write_json(args.json, result)
    return 0


class _Idle:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
