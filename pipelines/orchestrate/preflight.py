"""Every input checked before any work: settings the data cannot satisfy, data folders,
brought weights and the training device fail here with one line naming the problem
(exit 2), before an MLflow run, a Prefect flow or a torch process starts."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.common.net import answers
from pipelines.config.errors import ConfigError
from pipelines.config.pipeline import PipelineConfig
from pipelines.data.errors import DataError
from pipelines.data.readers import list_transfer_root, source_size
from pipelines.engine.distributed import check_device
from pipelines.teacher.sources import preflight as check_sources


def train_split_size(n: int, has_test: bool, classes: int, cfg: PipelineConfig) -> int:
    """The training split's size as ``pipelines.data.splits.split_indices`` will cut it from a
    pool of ``n`` (exact, except that a test share carved per class may hold up to
    ``classes`` images fewer than the whole pool's share: counted in the split's favour)."""
    d = cfg.data
    pool = n if has_test else n - max(0, int(round(n * d.test_fraction)) - classes)
    keep = int(round(pool * d.train_fraction))
    if d.label_budget is not None:
        keep = min(keep, d.label_budget)
    return keep - int(round(keep * d.val_fraction)) - max(1, int(round(keep * d.quiz_fraction)))


def check_inputs(cfg: PipelineConfig, sources: bool = True) -> None:
    """Raise :class:`ConfigError` for the first input that cannot work."""
    try:
        n, has_test, classes = source_size(cfg.data)
        if cfg.data.transfer_root is not None:
            list_transfer_root(Path(cfg.data.transfer_root).expanduser())
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    train = train_split_size(n, has_test, classes, cfg)
    batches = {"teacher.train.batch_size": cfg.teacher.train.batch_size if not cfg.teacher.brought() else None,
               "teacher.finetune.batch_size": cfg.teacher.finetune.batch_size
               if cfg.teacher.brought() and cfg.teacher.finetune.mode != "none" else None,
               "student.train.batch_size": cfg.student.train.batch_size}
    for key, batch in batches.items():
        if batch is not None and batch > train:
            raise ConfigError(f"{key}={batch} exceeds the {train} training examples that {cfg.data.name} leaves after "
                              f"the splits (label_budget, train_fraction, val_fraction, quiz_fraction): lower it")
    check_device(cfg.dist.device)
    if sources:
        check_sources(cfg)


def check_servers() -> None:
    """A tracking server or Prefect API named by the environment must answer now: a run
    that would fail at its first log fails here, before any work, naming the URL."""
    from pipelines.tracking import is_server, tracking_uri

    uri = tracking_uri()
    if is_server(uri) and not answers(f"{uri.rstrip('/')}/health", timeout=10):
        raise ConfigError(f"no MLflow tracking server answers at MLFLOW_TRACKING_URI={uri}: start it "
                          f"(`metadistill services`, README: Team set-up) or unset MLFLOW_TRACKING_URI for the "
                          f"project home's own store")
    api = os.environ.get("PREFECT_API_URL")
    if api and not answers(f"{api.rstrip('/')}/health", timeout=10):
        raise ConfigError(f"no Prefect server answers at PREFECT_API_URL={api}: start it (`metadistill services` "
                          f"or `metadistill server`) or unset PREFECT_API_URL for a run's own API")
