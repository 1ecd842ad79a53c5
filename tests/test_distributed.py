"""Training stages as real torchrun workers (gloo, loopback): the same parameters as one
process, elastic recovery from checkpoints after SIGKILL, and failures that leave nothing
behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from models.weights import load_weights
from pipelines.config.loader import load_config
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
BASE = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=30",
        "student.train.log_every=5", "dist.checkpoint_every=5"]


# Stream storage with the unlabeled transfer split, so both stream readers feed each step.
STREAM = ["data.storage=stream", "data.label_budget=600", "data.workers=1"]
STORAGES = ([], STREAM)


@pytest.fixture(scope="module")
def stage_home(tmp_path_factory):
    """A project home with the digits data prepared and a small teacher trained, as the
    flow leaves them before its student stages."""
    from pipelines import data as data_stage
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    home = tmp_path_factory.mktemp("dist-home")
    before = os.environ.get("METADISTILL_HOME")
    os.environ["METADISTILL_HOME"] = str(home)
    try:
        cfg = load_config(overrides=BASE)
        prepared = data_stage.prepare(cfg.data)
        ctx = TeacherContext.from_config(cfg, prepared)
        obtain_teacher(ctx)
        teacher = ctx.teacher_folder
        for storage in STORAGES:  # prepared once here, not raced for by the ranks
            data_stage.prepare(load_config(overrides=BASE + storage).data)
    finally:
        if before is None:
            del os.environ["METADISTILL_HOME"]
        else:
            os.environ["METADISTILL_HOME"] = before
    return home, teacher


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "METADISTILL_HOME": str(home), "METADISTILL_PROGRESS": "0", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def _write_config(tmp_path: Path, overrides: list[str], name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(load_config(overrides=BASE + overrides).model_dump_json())
    return path


def _stage_args(config: Path, teacher: Path, method: str, out: Path) -> list[str]:
    return ["-m", "pipelines.orchestrate.worker", "--config", str(config), "--stage", "student", "--method", method,
            "--seed", "0", "--teacher", str(teacher), "--out", str(out)]


def _torchrun(nproc: int, port: int, nnodes: int = 1, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", str(restarts)]


def _run(cmd: list[str], home: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(home), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a: Path, b: Path) -> float:
    ma, _ = load_weights(a)
    mb, _ = load_weights(b)
    return max((p - q).abs().max().item() for p, q in zip(ma.parameters(), mb.parameters()))


def _moved(folder: Path, seed: int = 0) -> float:
    """How far training took the student from its seeded initialisation (as the worker
    builds it), so that an equality of two runs means they both learned the same thing."""
    from models.registry import build_model

    trained, spec = load_weights(folder)
    torch.manual_seed(seed)
    start = build_model(spec["arch"], tuple(spec["input_shape"]), spec["num_classes"], **spec["kwargs"])
    return max((p - q).abs().max().item() for p, q in zip(trained.parameters(), start.parameters()))


def test_two_nodes_train_like_one_process(stage_home, tmp_path):
    """Two torchrun agents ("nodes", one process each, c10d rendezvous on 127.0.0.1)
    end with the parameters of one process with the same global batch."""
    home, teacher = stage_home
    config = _write_config(tmp_path, ["student.train.steps=12", "dist.nnodes=2", "dist.nproc=1",
                                      "dist.rdzv_endpoint=127.0.0.1:29400"], "kd")
    port = free_port()
    agents = [subprocess.Popen(_torchrun(1, port, nnodes=2) + _stage_args(config, teacher, "kd", tmp_path / "two"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(home), cwd=REPO)
              for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "(node 1)" in "".join(outputs)
    _run([sys.executable] + _stage_args(config, teacher, "kd", tmp_path / "one"), home)
    assert _moved(tmp_path / "one" / "model") > 1e-3
    assert _max_diff(tmp_path / "two" / "model", tmp_path / "one" / "model") <= 1e-5


def test_stream_over_two_ranks_equals_one_process(stage_home, tmp_path):
    """Each rank decodes its half of every global batch from the shards (a DataLoader
    worker each), labelled and transfer rows, and its half of the quiz for the teacher's
    meta-step: the model equals one process reading whole batches."""
    home, teacher, method = *stage_home, "meta_distill_pilot"
    config = _write_config(tmp_path, STREAM + ["student.train.steps=12", "dist.nproc=2",
                                               "meta_distill_pilot.interval=2",
                                               "meta_distill_pilot.learn=[kd_params, calibration]"], method)
    _run(_torchrun(2, free_port()) + _stage_args(config, teacher, method, tmp_path / "two"), home)
    _run([sys.executable] + _stage_args(config, teacher, method, tmp_path / "one"), home)
    assert _moved(tmp_path / "one" / "model") > 1e-3
    assert _max_diff(tmp_path / "two" / "model", tmp_path / "one" / "model") <= 1e-5


@pytest.mark.parametrize("method,overrides", [
    ("maml_init", ["maml.meta_steps=2", "maml.meta_batch=4", "maml.shots=2", "maml.queries=2",
                   "student.train.steps=1"]),
    ("meta_distill_pilot", ["meta_distill_pilot.interval=1", "meta_distill_pilot.teacher_lr=1e-3",
                            "student.train.steps=3", "meta_distill_pilot.learn=[teacher]"]),
    # Knobs on a frozen teacher, with transfer examples in every batch and in the pilot.
    ("meta_distill_pilot", ["meta_distill_pilot.interval=1", "meta_distill_pilot.knob_lr=0.1", "student.train.steps=4",
                            "meta_distill_pilot.learn=[kd_params, calibration, weights]", "data.label_budget=600"]),
    # The default: the co-trained head (feedback, trust region), the guard, and the temperature's tangent.
    ("meta_distill", ["meta_distill.interval=1", "meta_distill.head.lr=0.05", "student.train.steps=6",
                      "meta_distill.feedback.weight=1",
                      "meta_distill.guard.every=3", "meta_distill.temperature.learn=true",
                      "meta_distill.temperature.window=2", "meta_distill.temperature.lr=0.3", "data.label_budget=600",
                      "meta_distill.reference=none"]),  # the learned student itself, not the one returned
])
def test_meta_step_over_two_ranks_equals_one_process(stage_home, tmp_path, method, overrides):
    """Distributed MAML steps (each rank: half the tasks, meta-gradients all-reduced) and
    distributed teacher meta-steps (each rank: half the batch and quiz) equal the steps of
    one process over all of them -- for the student and the learned teacher."""
    home, teacher = stage_home
    config = _write_config(tmp_path, overrides + ["dist.nproc=2"], method)
    _run(_torchrun(2, free_port()) + _stage_args(config, teacher, method, tmp_path / "two"), home)
    _run([sys.executable] + _stage_args(config, teacher, method, tmp_path / "one"), home)
    assert _moved(tmp_path / "one" / "model") > 1e-4
    assert _max_diff(tmp_path / "two" / "model", tmp_path / "one" / "model") <= 1e-5
    if "meta_distill_pilot.learn=[teacher]" in overrides or "meta_distill.head.lr=0.05" in overrides:
        moved = _max_diff(tmp_path / "one" / "learned_teacher", teacher)
        assert moved > 1e-4  # the teacher really learned, so equality below means something
        assert _max_diff(tmp_path / "two" / "learned_teacher", tmp_path / "one" / "learned_teacher") <= 1e-5


@pytest.mark.parametrize("storage,steps", [([], 800), (STREAM, 400)], ids=["memory", "stream"])
def test_sigkilled_worker_resumes_from_checkpoint(stage_home, tmp_path, storage, steps):
    """SIGKILL one worker mid-training: torchrun restarts both, they resume from the last
    complete checkpoint and end where an uninterrupted run ends.  Streamed, the readers
    restart at the checkpoint's position in the seeded order."""
    home, teacher = stage_home
    every = steps // 8
    config = _write_config(tmp_path, storage + [f"student.train.steps={steps}", f"student.train.log_every={every}",
                                                f"dist.checkpoint_every={every}", "dist.nproc=2"], "long")
    proc = subprocess.Popen(_torchrun(2, free_port(), restarts=1) + _stage_args(config, teacher, "scratch", tmp_path / "killed"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(home), cwd=REPO)
    lines, pids, killed_after = [], {}, None
    try:
        for line in proc.stdout:  # the two ranks share the pipe: lines may be glued together
            lines.append(line)
            for rank, pid in re.findall(r"rank (\d+)/2 \(node \d+\) pid (\d+)", line):
                pids[int(rank)] = int(pid)
            saved = [int(s) for s in re.findall(r"checkpoint train step (\d+)", line)]
            if killed_after is None and saved and saved[-1] >= 2 * every:
                killed_after = saved[-1]
                os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, "".join(lines)[-12000:]
    finally:
        if proc.poll() is None:  # the workers die with their agent (PR_SET_PDEATHSIG)
            proc.kill()
    log = "".join(lines)
    assert killed_after is not None and killed_after < steps, log[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", log)]
    assert len(resumed) == 2 and resumed[0] == resumed[1], log[-3000:]  # both ranks, same checkpoint
    # The checkpoint loaded is the last one written before the kill or a later one
    # (rank 0 may finish one more before torchrun stops it): at most one interval redone.
    assert resumed[0] >= killed_after, log[-3000:]
    assert "restart 1" in log
    _run(_torchrun(2, free_port()) + _stage_args(config, teacher, "scratch", tmp_path / "clean"), home)
    assert _max_diff(tmp_path / "killed" / "model", tmp_path / "clean" / "model") <= 1e-5


def _leftover_workers(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(pid))
    return found


def _client(home) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


TINY_FLOW = BASE + ["tracking.cost_card=false",  # measured in test_cost and test_integration
                    "teacher.train.steps=40", "student.train.steps=30", "student.seeds=[0]", "maml.meta_steps=4",
                    "maml.log_every=2", "dist.nproc=2", "tracking.experiment=dist-digits",
                    "meta_distill.reference=kd"]  # the sweep's kd, reused (no grids)


def test_pipeline_runs_every_stage_under_torchrun(home, prefect_server):
    """`--set dist.nproc=2`: the teacher and every student method train as 2 torchrun
    workers; rank 0 logs into each stage's child run; the best student is registered."""
    from pipelines.orchestrate.flow import metadistill_flow

    summary = metadistill_flow(config=load_config(overrides=TINY_FLOW))
    assert set(summary["methods"]) == {"scratch", "kd", "maml_init", "meta_distill"}
    assert summary["registered_model"]["alias"] == "champion"
    client = _client(home)
    runs = client.search_runs([client.get_experiment_by_name("dist-digits").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    for name in ("teacher", "student/kd/seed0", "student/maml_init/seed0", "student/meta_distill/seed0"):
        run = by_name[name]
        assert run.data.tags["dist.world_size"] == "2" and run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, "train_loss")
        assert "system/node0/max_rss_mb" in run.data.metrics
    assert client.get_metric_history(by_name["student/maml_init/seed0"].info.run_id, "meta_query_acc")
    assert not list((home / "cache" / "stages").iterdir())  # stage folders removed after success


def test_failing_torchrun_stage_fails_the_run_and_leaves_nothing(home, prefect_server):
    """A worker raises (nccl asked for, with training tensors on the CPU): the stage and the pipeline
    run are FAILED in Prefect and MLflow, no process is left, nothing is registered."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    from pipelines.orchestrate.flow import metadistill_flow
    from pipelines.orchestrate.launch import StageFailed

    cfg = load_config(overrides=TINY_FLOW + ["dist.backend=nccl", "dist.max_restarts=0",
                                             "tracking.experiment=dist-fail"])
    started = time.time()
    with pytest.raises(StageFailed, match="nccl needs CUDA tensors"):
        metadistill_flow(config=cfg)
    assert time.time() - started < 120
    assert _leftover_workers(str(home / "cache" / "stages")) == []
    client = _client(home)
    runs = client.search_runs([client.get_experiment_by_name("dist-fail").experiment_id])
    status = {("pipeline" if "mlflow.parentRunId" not in r.data.tags else r.info.run_name): r.info.status
              for r in runs}
    assert status == {"pipeline": "FAILED", "data": "FINISHED", "augmentation": "FINISHED", "teacher": "FAILED"}
    assert client.search_registered_models("name = 'dist-fail-student'") == []
    with get_client(sync_client=True) as prefect:
        parent = client.search_runs([client.get_experiment_by_name("dist-fail").experiment_id],
                                    "tags.preset = 'digits'")[0]
        flow_run = prefect.read_flow_run(parent.data.tags["prefect.flow_run_id"])
        assert flow_run.state.is_failed()
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
        assert {t.name.rsplit("-", 1)[0]: t.state.type.value for t in tasks}["train-teacher"] == "FAILED"


def test_torn_checkpoint_is_never_loaded(tmp_path):
    from pipelines.engine.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, every=10)
    (tmp_path / "train.pt.tmp999").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    assert ckpt.load("train") is None
    ckpt.save("train", {"step": 10, "w": torch.ones(3)})
    (tmp_path / "train.pt.tmp998").write_bytes(b"a later, torn one")
    state = ckpt.load("train")
    assert state["step"] == 10 and torch.equal(state["w"], torch.ones(3))
    assert [ckpt.due(s, 25) for s in (9, 10, 20, 25)] == [False, True, True, True]


def test_stage_command_per_launcher(tmp_path):
    from pipelines.orchestrate.launch import torchrun_command

    local = torchrun_command(load_config(overrides=["dist.nproc=2"]), tmp_path / "c.json", ["--stage", "teacher"])
    assert local[1:4] == ["-m", "torch.distributed.run", "--nnodes"] and "--nproc-per-node" in local
    endpoint = local[local.index("--rdzv-endpoint") + 1]
    assert endpoint.startswith("127.0.0.1:") and not endpoint.endswith(":0")  # a free port was chosen
    slurm = torchrun_command(load_config(overrides=["dist.launcher=srun", "dist.nnodes=2", "dist.nproc=4",
                                                    "dist.rdzv_endpoint=node-a:29400"]),
                             tmp_path / "c.json", ["--stage", "teacher"])
    assert slurm[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert slurm[slurm.index("--rdzv-endpoint") + 1] == "node-a:29400"
    with pytest.raises(Exception, match="dist.rdzv_endpoint=HOST:PORT"):
        load_config(overrides=["dist.nnodes=2"])
    with pytest.raises(Exception, match="does not split evenly over 3 processes"):
        load_config(overrides=["dist.nproc=3"])


def test_teacher_improvement_over_two_ranks_equals_one_process(stage_home, tmp_path):
    """The improve stage under torchrun: each rank trains on its half of the labelled and
    transfer rows, with the strong views' second forward beside DDP's (seeded per row and
    step, so the shards draw what one process draws): the improved teacher equals one
    process's."""
    home, teacher = stage_home
    config = _write_config(tmp_path, ["data.label_budget=600", "teacher.improve.steps=4", "teacher.improve.threshold=0",
                                      "teacher.improve.batch_size=16", "dist.nproc=2"], "improve")

    def stage(out: Path) -> list[str]:
        return ["-m", "pipelines.orchestrate.worker", "--config", str(config), "--stage", "improve",
                "--teacher", str(teacher), "--out", str(out)]

    _run(_torchrun(2, free_port()) + stage(tmp_path / "two"), home)
    _run([sys.executable] + stage(tmp_path / "one"), home)
    assert _max_diff(tmp_path / "one" / "model", teacher) > 1e-4
    assert _max_diff(tmp_path / "two" / "model", tmp_path / "one" / "model") <= 1e-5
