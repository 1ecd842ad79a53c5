"""Weak scaling of torchrun training stages on this machine: 2 ranks x 1 thread against
1 rank x 1 thread, the same per-rank work (the per-rank batch is fixed, so the 2-rank
global batch is twice as large), for plain student training (``kd``) and for
meta-distillation (``meta_distill``, whose teacher meta-gradient is all-reduced by hand).

    python -m benchmarks.ddp_scaling [--steps N] [--repeats R] --json PATH

Throughput is global training examples per second of the training loop (no validation split, so
no evaluation in it; process start, data loading, rendezvous excluded); efficiency = throughput_2 / (2 * throughput_1).
Runs are interleaved and the best of ``--repeats`` counts.  Target: >= 0.85 for both.
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

# Big enough that a step is compute (tens of ms), not all_reduce latency (gloo's is
# about 1 ms here, even for one float).
WORKLOAD = ["data.name=mnist", "data.val_fraction=0", "teacher.model.arch=resnet8", "teacher.train.steps=200",
            "student.model.arch=resnet8", "student.model.kwargs={base_width: 8}", "student.must_be_smaller=false",
            "student.train.log_every=1000", "dist.checkpoint_every=100000", "dist.threads=1",
            "meta_distill.interval=10"]


def expected_meta_bytes(cfg, prepared, student: int) -> int:
    """float32 bytes all-reduced per teacher meta-step: the pilot's gradient, twice (forward
    and backward of its differentiable all_reduce) per pilot step, and the meta-gradient of
    what ``meta_distill.learn`` learns (the teacher's weights and/or the teaching knobs)."""
    from meta.teaching import TeachingKnobs
    from models.registry import build_model, count_parameters

    learned = count_parameters(TeachingKnobs(prepared.num_classes, 4.0, 0.9, "kl",
                                             [k for k in cfg.meta_distill.learn if k != "teacher"]))
    if "teacher" in cfg.meta_distill.learn:
        learned += count_parameters(build_model(cfg.teacher.model.arch, prepared.input_shape, prepared.num_classes))
    return 4 * (2 * cfg.meta_distill.pilot_steps * student + learned)


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


def main() -> int:
    from benchmarks.common import write_json
    from models.registry import build_model, count_parameters
    from pipelines import data as data_stage
    from pipelines.config.loader import load_config
    from pipelines.teacher.fit import obtain_teacher, teacher_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    os.environ["METADISTILL_HOME"] = str(home)
    shared = REPO.parent / "shared" / "data"
    if "METADISTILL_DATA" not in os.environ and shared.is_dir():
        os.environ["METADISTILL_DATA"] = str(shared)
    configs, per_rank = {}, args.batch_per_rank
    for nproc in (1, 2):
        cfg = load_config(overrides=WORKLOAD + [f"student.train.steps={args.steps}", f"dist.nproc={nproc}",
                                                f"student.train.batch_size={per_rank * nproc}",
                                                f"meta_distill.quiz_batch_size={per_rank * nproc}"])
        configs[nproc] = home / f"config{nproc}.json"
        configs[nproc].write_text(cfg.model_dump_json())
    prepared = data_stage.prepare(cfg.data)
    obtain_teacher(cfg, prepared)
    teacher = teacher_folder(cfg, prepared)

    throughput: dict[str, dict[int, float]] = {"train": {1: 0.0, 2: 0.0}, "meta_distill": {1: 0.0, 2: 0.0}}
    meta_bytes = 0
    for r in range(args.repeats):
        for kind, method in (("train", "kd"), ("meta_distill", "meta_distill")):
            for nproc in (1, 2):
                out = home / f"{kind}-{nproc}-{r}"
                result = run_stage(configs[nproc], teacher, method, nproc, out)
                rate = per_rank * nproc * result["steps"] / result["seconds"]
                throughput[kind][nproc] = max(throughput[kind][nproc], rate)
                print(f"round {r} {kind:>12} {nproc} rank(s): {rate:8.1f} examples/s", flush=True)
                if kind == "meta_distill" and nproc == 2:
                    meta_bytes = result["allreduce_bytes"]
    updates = -(-args.steps // cfg.meta_distill.interval)
    student = count_parameters(build_model(cfg.student.model.arch, prepared.input_shape, prepared.num_classes,
                                           **cfg.student.model.kwargs))
    per_meta_step = expected_meta_bytes(cfg, prepared, student)
    result = {
        "workload": {"student": "resnet8 (base width 8)", "teacher": "resnet8", "data": "mnist",
                     "batch_per_rank": per_rank, "steps": args.steps, "threads_per_rank": 1,
                     "meta_distill_interval": cfg.meta_distill.interval, "pilot_steps": cfg.meta_distill.pilot_steps},
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


if __name__ == "__main__":
    sys.exit(main())
