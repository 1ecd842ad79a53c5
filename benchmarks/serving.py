"""Serving throughput: `metadistill serve` against `mlflow models serve`, same registered
student, same load generator, one server after the other, in one run.

    python -m benchmarks.serving --json results/serving.json [--home PATH] [--seconds 30]
    python -m benchmarks.serving --smoke --json PATH  # a tiny pipeline's champion, 1 s of load per server

Load: wrk (Debian package) with 16 keep-alive connections on 4 threads, one image per
POST.  The generator's own ceiling is shown against the server's trivial /health route,
and the model's in-process batched forward throughput is the ceiling for the model.
Uses the `champion` of ``--model`` (default metadistill-digits-student, 1x8x8 digits) in --home
(default $METADISTILL_HOME or a fresh temporary home, where the default pipeline is run first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.common.net import free_port, wait_http

MODEL = "metadistill-digits-student"
SMOKE = ["--seconds", "1", "--trivial-seconds", "1", "--ceiling-seconds", "0.5", *[x for item in (
    "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5", "teacher.improve.method=none",
    "student.train.steps=4", "student.seeds=[0]", "student.methods=[scratch]") for x in ("--set", item)]]


def wrk(url: str, seconds: int, body: str | None, connections: int = 16, threads: int = 4) -> dict:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency", url]
    script = None
    if body is not None:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = [==[{body}]==]\n")  # long bracket: the JSON holds ]]
        script.close()
        cmd[1:1] = ["-s", script.name]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    if script:
        os.unlink(script.name)

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return {"rps": rps, "p50_ms": ms("50"), "p99_ms": ms("99"), "errors": errors}


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def ceiling(home: Path, seconds: float = 3.0, name: str = MODEL) -> float:
    os.environ["METADISTILL_HOME"] = str(home)
    import torch

    from deploy.registry import load_registered

    torch.set_num_threads(1)
    registered = load_registered(name)
    model = registered.model
    x = torch.rand(64, *registered.spec["input_shape"])
    with torch.inference_mode():
        model(x)
        start_t, n = time.perf_counter(), 0
        while time.perf_counter() - start_t < seconds:
            model(x)
            n += 64
    return n / (time.perf_counter() - start_t)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--home", default=os.environ.get("METADISTILL_HOME"))
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1, help="metadistill serve --workers")
    parser.add_argument("--model", default=MODEL, help="the registered model whose champion is served (1x8x8 inputs)")
    parser.add_argument("--trivial-seconds", type=int, default=10, help="load on the /health route")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="in-process forward passes")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="passed to the default pipeline's run, when --home has none")
    args = parse_args(parser, argv, SMOKE)
    if shutil.which("wrk") is None:
        raise SystemExit("serving benchmark: install wrk (apt-get install wrk)")
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="md-serve-"))
    env = {**os.environ, "METADISTILL_HOME": str(home), "METADISTILL_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if not (home / "mlflow.db").exists():
        subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *[x for o in args.overrides for x in ("--set", o)]],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    image = json.dumps([[[[0.5] * 8] * 8]])  # one 1x8x8 digit, raw pixels
    results: dict = {}

    port = free_port()
    proc = start([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), "--poll-seconds", "0",
                  "--workers", str(args.workers), "--model", args.model], env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 180)
        results["generator_vs_trivial_route"] = wrk(f"http://127.0.0.1:{port}/health", args.trivial_seconds, None)
        results["metadistill"] = wrk(f"http://127.0.0.1:{port}/predict", args.seconds, f'{{"instances": {image}}}')
    finally:
        stop(proc)

    port = free_port()
    # `mlflow models serve` execs `uvicorn` from PATH: put this interpreter's bin folder first.
    mlflow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    proc = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{args.model}@champion",
                  "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], mlflow_env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180)
        results["mlflow"] = wrk(f"http://127.0.0.1:{port}/invocations", args.seconds, f'{{"inputs": {image}}}')
    finally:
        stop(proc)

    results["ratio_vs_mlflow"] = results["metadistill"]["rps"] / results["mlflow"]["rps"]
    results["ceiling_rps"] = ceiling(home, args.ceiling_seconds, args.model)
    results["load"] = {"connections": 16, "threads": 4, "seconds": args.seconds, "tool": "wrk",
                       "server_workers": args.workers}
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
