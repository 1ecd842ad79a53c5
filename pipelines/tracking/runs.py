"""MLflow runs: the tracking URI and client, experiments, and logging into a run by id.

Runs are addressed by id through ``MlflowClient`` (no fluent active-run state), so a stage
can be handed its child run id and log into it from anywhere, including rank 0 of a
torchrun job.  The embedded default store is SQLite plus a local artifact folder under
the project home; ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.common.home import home_lock, project_home
from pipelines.common.proc import alive, process_start

_clients: dict[str, MlflowClient] = {}


EXPERIMENT_KIND = "mlflow.experimentKind"

# What MLflow raises when its store or server fails (a server that stopped answering too),
# for callers that must not import mlflow.
TrackingError = MlflowException


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / 'mlflow.db'}"


def artifact_root() -> Path:
    return project_home() / "mlartifacts"


def client() -> MlflowClient:
    """The client on the project's store, one per tracking URI; the first call creates or
    upgrades the database, before any parallel writer could race MLflow's migrations."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # for the fluent calls (log_model, load_model) too
    mlflow.set_registry_uri(uri)
    if uri not in _clients:
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # Runs that start together on a fresh home would both create and migrate the schema
        # (MLflow's "table ... already exists"); the first does it, the others wait for it.
        with contextlib.nullcontext() if is_server(uri) else home_lock("tracking-store"):
            c.search_experiments(max_results=1)
        _clients[uri] = c
    return _clients[uri]


def is_server(uri: str) -> bool:
    """A tracking server (HTTP): it owns its store, so the client creates nothing."""
    return uri.startswith(("http://", "https://"))


def ensure_experiment(name: str) -> str:
    c = client()
    found = c.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:  # made by an older version of this pipeline
            c.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (artifact_root() / name).as_uri()
    try:
        # MLflow 3's UI opens an experiment of this kind on its training runs, not the GenAI overview.
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"})
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


@dataclass
class RunLogger:
    """Logs into one existing run; metrics are buffered and sent in batches."""

    run_id: str
    _pending: list[Metric] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)
    _quiet_until: float = 0.0  # after a failed periodic flush, the next try waits until then

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        # Batched for speed, but never older than a few seconds, so the UI follows along.
        due = len(self._pending) >= 200 or time.monotonic() - self._last_flush > 5.0
        if due and time.monotonic() >= self._quiet_until:
            try:
                self.flush()
            except MlflowException:
                # The tracking server is away: the training that logs goes on (its weights reach
                # the cache, so a rerun reuses them); the metrics wait, and the stage's own end
                # (the run's final flush, or its next tag) raises.
                self._quiet_until = time.monotonic() + 60.0

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._pending:
            client().log_batch(self.run_id, metrics=self._pending[:1000])
            self._pending = self._pending[1000:]  # dropped once sent, kept for the next try if not

    def log_params(self, params: dict[str, object]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client().log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, object]) -> None:
        client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_description(self, text: str) -> None:
        """The run page's description (markdown; the UI shows it above the run's details)."""
        self.set_tags({"mlflow.note.content": text if len(text) <= 5000 else text[:4998] + "…\n"})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        client().log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        client().log_text(self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        client().log_figure(self.run_id, figure, name)

    def log_dataset(self, name: str, digest: str, source: str, context: str, counts: dict[str, int]) -> None:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        dataset = MetaDataset(CodeDatasetSource({"source": source, **{f"n_{k}": v for k, v in counts.items()}}),
                              name=name, digest=digest[:36])
        inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        try:
            client().log_inputs(self.run_id, inputs)
        except MlflowException:
            # Two runs of one experiment that log the same dataset at once race for the server's
            # row of (experiment, name, digest) (on PostgreSQL one gets an IntegrityError); the
            # second try finds the row.  A second failure is a real one.
            time.sleep(0.5)
            client().log_inputs(self.run_id, inputs)


def _process_tags(pid: int | None = None) -> dict[str, str]:
    """Which process a run belongs to: host, pid and the process's start (so a reused pid is
    not taken for the run's own process)."""
    import socket

    pid = os.getpid() if pid is None else pid
    return {"metadistill.host": socket.gethostname(), "metadistill.pid": str(pid),
            "metadistill.process_start": process_start(pid) or ""}


def reap_orphans(experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` whose process, on this host, is gone:
    a run whose tracking server was away when it ended could not say so then.  Runs of
    other hosts are left alone (nothing here can tell whether they live).  Returns their ids."""
    import socket

    c, host, reaped = client(), socket.gethostname(), []
    for run in c.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=200):
        tags = run.data.tags
        if tags.get("metadistill.host") != host or not tags.get("metadistill.pid", "").isdigit():
            continue
        if alive(int(tags["metadistill.pid"]), tags.get("metadistill.process_start", "")):
            continue
        c.set_tag(run.info.run_id, "metadistill.failed_reason",
                  f"its process (pid {tags['metadistill.pid']} on {host}) ended while the tracking server was "
                  f"away; marked FAILED by the next run on this host")
        c.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        reaped.append(run.info.run_id)
    return reaped


@contextlib.contextmanager
def _run(experiment_id: str, name: str, tags: dict[str, str], parent: str | None) -> Iterator[RunLogger]:
    c = client()
    tags = {**tags, **_process_tags()}
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent}
    run = c.create_run(experiment_id, run_name=name, tags=tags)
    logger = RunLogger(run.info.run_id)
    try:
        yield logger
    except BaseException:  # KeyboardInterrupt too: the run must not stay RUNNING
        with contextlib.suppress(Exception):
            logger.flush()
        c.set_terminated(logger.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    logger.flush()
    c.set_terminated(logger.run_id, RunStatus.to_string(RunStatus.FINISHED))


def pipeline_run(experiment: str, name: str, tags: dict[str, str]) -> contextlib.AbstractContextManager[RunLogger]:
    experiment_id = ensure_experiment(experiment)
    reap_orphans(experiment_id)
    return _run(experiment_id, name, tags, parent=None)


def child_run(parent: RunLogger, name: str, tags: dict[str, str] | None = None):
    experiment_id = client().get_run(parent.run_id).info.experiment_id
    return _run(experiment_id, name, tags or {}, parent=parent.run_id)


def log_student_model(run: RunLogger, model, example: np.ndarray, weights_dir: Path) -> str:
    """``model`` should take raw [0, 1] pixels (see ``models.normalize.Normalized``)."""
    """Log ``model`` as an MLflow model (torch.export "pt2": loads without unpickling), with
    signature and input example, plus its safetensors weights and spec; returns the model URI."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    signature.inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))])
    signature.outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, output.shape[1]))])
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run.run_id):
        # Explicit requirements: inferring them imports the model in a subprocess (seconds).
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pt2",
                                        input_example=example, signature=signature,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                          f"numpy=={np.__version__}"])
        mlflow.log_artifacts(str(weights_dir), "weights")
    # start_run(run_id=...) ended the run as FINISHED; the caller's context ends it again, harmlessly.
    return info.model_uri


def find_run_by_tag(experiment: str, key: str, value: str) -> str | None:
    """The parent run (no parent tag) of ``experiment`` whose tag ``key`` equals ``value``."""
    c = client()
    found = c.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = c.search_runs([found.experiment_id], f"tags.`{key}` = '{value}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents[0].info.run_id if parents else None


def download_artifacts(run_id: str, path: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="metadistill-"))
    return Path(client().download_artifacts(run_id, path, str(target)))
