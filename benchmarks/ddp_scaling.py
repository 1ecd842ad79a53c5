"""Weak scaling of torchrun training stages on this machine: 2 ranks x 1 thread against
1 rank x 1 thread, the same per-rank work (the per-rank batch is fixed, so the 2-rank
global batch is twice as large), for plain student training (``kd``) and for the pilot
update of learning to teach (``meta_distill_pilot``, learning ``[kd_params, weights]`` as
when the JSON was first published: its pilot step's gradient goes through a differentiable
all_reduce, and its meta-gradient is all-reduced by hand).

    python -m benchmarks.ddp_scaling [--steps N] [--repeats R] [--set k=v ...] --json PATH
    python -m benchmarks.ddp_scaling --steps 200 --repeats 2 --json docs/benchmarks/ddp_scaling.json  # published
    python -m benchmarks.ddp_scaling --smoke --json PATH  # seconds: digits, an MLP teacher, 4 steps

Throughput is global training examples per second of the training loop (no validation split, so
no evaluation in it; process start, data loading, rendezvous excluded); efficiency = throughput_2 / (2 * throughput_1).
Runs are interleaved and the best of ``--repeats`` counts.  Target: >= 0.85 for both.
The JSON's ``throughput`` and ``efficiency`` are keyed ``train`` and by the meta method
(``meta_distill_pilot``; the JSON of commit 660a6a1 calls the same measurement
``meta_distill``, the name the pilot update had then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
META = "meta_distill_pilot"

# Big enough that a step is compute (tens of ms), not all_reduce latency (gloo's is
# about 1 ms here, even for one float).
WORKLOAD = ["data.name=mnist", "data.val_fraction=0", "teacher.model.arch=resnet8", "teacher.train.steps=200",
            "student.model.arch=resnet8", "student.model.kwargs={base_width: 8}", "student.must_be_smaller=false",
            "student.train.log_every=1000", "dist.checkpoint_every=100000", "dist.threads=1",
            f"{META}.learn=[kd_params, weights]", f"{META}.interval=10"]
# --smoke: the same stages at a size that runs in seconds.
SMOKE = ["--steps", "4", "--batch-per-rank", "8", "--repeats", "1", "--set", "data.name=digits",
         "--set", "teacher.model.arch=mlp", "--set", "teacher.model.kwargs={hidden: [16]}",
         "--set", "teacher.train.steps=5", "--set", f"{META}.interval=2"]


def expected_meta_bytes(cfg, prepared, student: int) -> int:
    """float32 bytes all-reduced per teacher meta-step: the pilot's gradient, twice (forward
    and backward of its differentiable all_reduce) per pilot step, and the meta-gradient of
    what ``meta_distill_pilot.learn`` learns (the teacher's weights and/or the teaching knobs)."""
    from meta.teaching import TeachingKnobs
    from models.registry import build_model, count_parameters

    pilot = getattr(cfg, META)
    learned = count_parameters(TeachingKnobs(prepared.num_classes, 4.0, 0.9, "kl",
                                             [k for k in pilot.learn if k != "teacher"]))
    if "teacher" in pilot.learn:
        learned += count_parameters(build_model(cfg.teacher.model.arch, prepared.input_shape, prepared.num_classes,
                                                **cfg.teacher.model.kwargs))
    return 4 * (2 * pilot.pilot_steps * student + learned)


def run_stage(config: Path, teacher: Path, method: str, nproc: int, out: Path) -> dict:
    from pipelines.common.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "pipelines.orchestrate.worker", "--config", str(config),
           "--stage", "student", "--method", method, "--teacher", str(teacher), "--out", str(out)]
    env = {**os.environ, "METADISTILL_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} with {nproc} ranks failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="over the workload")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    home = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    try:
        return measure(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def measure(args: argparse.Namespace, home: Path) -> int:
    from benchmarks.common import write_json
    from models.registry import build_model, count_parameters
    from pipelines import data as data_stage
    from pipelines.config.loader import load_config
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    os.environ["METADISTILL_HOME"] = str(home)
    shared = REPO.parent / "shared" / "data"
    if "METADISTILL_DATA" not in os.environ and shared.is_dir():
        os.environ["METADISTILL_DATA"] = str(shared)
    configs, per_rank = {}, args.batch_per_rank
    for nproc in (1, 2):
        cfg = load_config(overrides=WORKLOAD + args.overrides + [
            f"student.train.steps={args.steps}", f"dist.nproc={nproc}", f"student.train.batch_size={per_rank * nproc}",
            f"{META}.quiz_batch_size={per_rank * nproc}"])
        configs[nproc] = home / f"config{nproc}.json"
        configs[nproc].write_text(cfg.model_dump_json())
    prepared = data_stage.prepare(cfg.data)
    ctx = TeacherContext.from_config(cfg, prepared)
    obtain_teacher(ctx)
    teacher = ctx.teacher_folder

    kinds = {"train": "kd", META: META}
    throughput: dict[str, dict[int, float]] = {kind: {1: 0.0, 2: 0.0} for kind in kinds}
    meta_bytes = 0
    for r in range(args.repeats):
        for kind, method in kinds.items():
            for nproc in (1, 2):
                out = home / f"{kind}-{nproc}-{r}"
                result = run_stage(configs[nproc], teacher, method, nproc, out)
                rate = per_rank * nproc * result["steps"] / result["seconds"]
                throughput[kind][nproc] = max(throughput[kind][nproc], rate)
                print(f"round {r} {kind:>18} {nproc} rank(s): {rate:8.1f} examples/s", flush=True)
                if kind == META and nproc == 2:
                    meta_bytes = result["allreduce_bytes"]
    pilot = getattr(cfg, META)
    updates = -(-args.steps // pilot.interval)
    student = count_parameters(build_model(cfg.student.model.arch, prepared.input_shape, prepared.num_classes,
                                           **cfg.student.model.kwargs))
    per_meta_step = expected_meta_bytes(cfg, prepared, student)
    result = {
        "workload": {"student": _arch(cfg.student.model), "teacher": _arch(cfg.teacher.model), "data": cfg.data.name,
                     "batch_per_rank": per_rank, "steps": args.steps, "threads_per_rank": cfg.dist.threads,
                     "method": META, "learn": list(pilot.learn), "interval": pilot.interval,
                     "pilot_steps": pilot.pilot_steps},
        "throughput": {k: {f"{n}_ranks": v for n, v in t.items()} for k, t in throughput.items()},
        "efficiency": {k: t[2] / (2 * t[1]) for k, t in throughput.items()},
        "allreduce_bytes_per_meta_step": per_meta_step,
        # measured: includes the forward-only pilot that every 10th update runs for the quiz-loss curve
        "allreduce_bytes_measured_per_meta_step": meta_bytes / updates,
        "ddp_gradient_bytes_per_student_step": 4 * student,
        "target_efficiency_min": 0.85,
    }
    write_json(args.json, result)
    return 0


def _arch(model) -> str:
    """``resnet8 (base_width 8)``: the network and its arguments."""
    kwargs = ", ".join(f"{k} {v}" for k, v in model.kwargs.items())
    return f"{model.arch} ({kwargs})" if kwargs else model.arch


if __name__ == "__main__":
    sys.exit(main())
