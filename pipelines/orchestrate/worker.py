"""The torchrun worker: one training stage (the teacher, or one student method and seed).

    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m pipelines.orchestrate.worker --config stage.json --stage student --method kd --seed 0 \\
        --teacher TEACHER_DIR --out OUT_DIR [--run-id MLFLOW_RUN] [--checkpoint-dir DIR]

Every rank reads the same config and data (from the project home's cache), trains its
shard, and resumes from the last checkpoint after a restart.  Rank 0 alone writes the
outputs (``OUT_DIR/model``, ``OUT_DIR/learned_teacher``, ``OUT_DIR/result.json``) and
logs to the stage's MLflow run; the launching flow evaluates and registers.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from models.normalize import unwrap
from models.weights import load_weights, save_weights
from pipelines import data as data_stage
from pipelines.common import entrypoints
from pipelines.common.home import write_json
from pipelines.config.pipeline import PipelineConfig
from pipelines.data.prepared import Prepared, model_spec
from pipelines.engine import distributed
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.loop import TrainResult
from pipelines.students.fit import fit_student
from pipelines.teacher.context import TeacherContext
from pipelines.teacher.fit import fit_teacher, load_teacher, teacher_inputs, teacher_spec
from pipelines.teacher.improve import fit_improved, strong_view
from pipelines.teacher.sources import WeightsSource


def die_with_parent() -> None:
    """If the torchrun agent dies (even by SIGKILL), this worker dies too: no orphans.
    Only under torchrun: a worker started by hand may outlive its shell (nohup, &)."""
    if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the agent was gone before prctl took effect
            os._exit(1)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {entrypoints.WORKER}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path,
                   help="the pipeline config, JSON or YAML (`metadistill config ... > stage.yaml`)")
    p.add_argument("--stage", required=True, choices=["teacher", "improve", "student"])
    p.add_argument("--method", help="student method (stage student)")
    p.add_argument("--seed", type=int, default=0, help="student seed (stage student)")
    p.add_argument("--teacher", type=Path, help="teacher weights folder (stages improve, student)")
    p.add_argument("--source", type=Path, help="the brought teacher's materialised source (stage teacher)")
    p.add_argument("--init", type=Path, help="the student's materialised init source (stage student)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--run-id", default="", help="MLflow run that rank 0 logs into")
    p.add_argument("--checkpoint-dir", type=Path, help="default: OUT/checkpoints")
    args = p.parse_args(argv)
    if args.stage == "student" and (args.method is None or args.teacher is None):
        p.error("--stage student needs --method and --teacher")
    if args.stage == "improve" and args.teacher is None:
        p.error("--stage improve needs --teacher")
    return args


def metric_logger(run_id: str):
    """``on_log`` for every rank: gathers per-node system metrics (a collective), and
    rank 0 logs everything into the stage's MLflow run."""
    run = None
    if run_id and distributed.world().is_main:
        from pipelines import tracking

        run = tracking.RunLogger(run_id)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, **distributed.node_metrics()}
        if run is not None:
            run.log_metrics(metrics, step)

    return on_log, run


def write_result(out: Path, result: TrainResult) -> None:
    write_json(out / "result.json", {"curve": result.curve, "seconds": result.seconds, "steps": result.steps,
                                     "allreduce_bytes": distributed.allreduce_bytes(),
                                     "world_size": distributed.world().size})


def run_stage(args: argparse.Namespace, cfg: PipelineConfig) -> None:
    data = data_stage.place(data_stage.prepare(cfg.data), distributed.device(cfg.dist.device))
    on_log, run = metric_logger(args.run_id)
    checkpoint = Checkpointer(args.checkpoint_dir or args.out / "checkpoints", cfg.dist.checkpoint_every)
    learned_teacher = None
    source = WeightsSource.from_folder(args.source) if args.source else None
    if args.stage == "teacher":
        ctx = TeacherContext.from_config(cfg, data, source)
        source, augment = teacher_inputs(ctx)
        model, result = fit_teacher(ctx.teacher, data, augment, on_log, checkpoint, source)
        spec = teacher_spec(ctx)
    elif args.stage == "improve":
        ctx = TeacherContext.from_config(cfg, data)
        _, weak = teacher_inputs(ctx)
        model, result, _ = fit_improved(load_teacher(args.teacher, data), ctx.teacher.improve, data, weak,
                                        strong_view(ctx), ctx.teacher.seed, on_log)
        spec = json.loads((args.teacher / "spec.json").read_text())
    else:
        teacher = load_teacher(args.teacher, data)
        init = WeightsSource.from_folder(args.init) if args.init else None
        model, result, learned_teacher = fit_student(args.method, cfg, data, teacher, args.seed, on_log,
                                                            checkpoint, init)
        spec = model_spec(cfg.student.model.arch, cfg.student.model.kwargs, data)
    if distributed.world().is_main:
        save_weights(unwrap(model), args.out / "model", spec)
        if learned_teacher is not None:
            learned_spec = json.loads((args.teacher / "spec.json").read_text())
            save_weights(unwrap(learned_teacher), args.out / "learned_teacher", learned_spec)
        write_result(args.out, result)
        if run is not None:
            run.flush()


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse(argv)
    cfg = PipelineConfig.model_validate(yaml.safe_load(args.config.read_text()))  # JSON is YAML too
    threads = cfg.dist.threads or torch.get_num_threads()  # the launcher's OMP_NUM_THREADS, chosen for the node
    torch.set_num_threads(threads)
    distributed.pin_to_cores(threads)
    world = distributed.init(cfg.dist.backend, cfg.dist.device)
    try:
        ranks = distributed.gather(f"rank {world.rank}/{world.size} (node {world.node}) pid {os.getpid()}")
        if world.is_main:  # one line for the rank group, not one per rank
            label = f"student {args.method} seed {args.seed}" if args.stage == "student" else "teacher"
            print(f"{label}, restart "
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}: {', '.join(ranks)}", flush=True)
        run_stage(args, cfg)
    finally:
        distributed.teardown()
    return 0


def load_stage_output(folder: Path, data: Prepared) -> tuple[nn.Module, TrainResult, nn.Module | None]:
    """What rank 0 of a torchrun stage left in ``folder`` (see :func:`main`): the
    trained network as saved (a brought teacher's without its input adapter), its curves,
    and the learned teacher fed from ``data``."""
    raw = json.loads((folder / "result.json").read_text())
    result = TrainResult(curve={k: [tuple(p) for p in v] for k, v in raw["curve"].items()},
                         seconds=raw["seconds"], steps=raw["steps"])
    model, _ = load_weights(folder / "model")
    model = model.to(data.device)
    learned = None
    if (folder / "learned_teacher").is_dir():
        learned = load_teacher(folder / "learned_teacher", data)
    return model, result, learned


if __name__ == "__main__":
    sys.exit(main())
