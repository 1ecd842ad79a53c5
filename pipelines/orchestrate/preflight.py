"""Every input checked before any work: settings the data cannot satisfy, data folders,
brought weights and the training device fail here with one line naming the problem
(exit 2), before an MLflow run, a Prefect flow or a torch process starts."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.common.net import answers, basic_auth, status_of
from pipelines.config.errors import ConfigError
from pipelines.config.pipeline import PipelineConfig, check_models, dataset_shape
from pipelines.data.errors import DataError
from pipelines.data.readers import class_counts, imbalance_note, list_transfer_root, source_size
from pipelines.engine.distributed import check_device
from pipelines.evaluate.compare import held_out_warnings
from pipelines.teacher.sources import preflight as check_sources


def split_sizes(n: int, has_test: bool, classes: int, cfg: PipelineConfig) -> dict[str, int]:
    """The labelled splits' sizes as ``pipelines.data.splits.split_indices`` will cut them from a
    pool of ``n`` (exact, except that a test share carved per class may hold up to
    ``classes`` images fewer than the whole pool's share: counted in the training split's favour)."""
    d = cfg.data
    pool = n if has_test else n - max(0, int(round(n * d.test_fraction)) - classes)
    keep = int(round(pool * d.train_fraction))
    if d.label_budget is not None:
        keep = min(keep, d.label_budget)
    val, quiz = int(round(keep * d.val_fraction)), max(1, int(round(keep * d.quiz_fraction)))
    test = {} if has_test else {"test": int(round(n * d.test_fraction))}  # a test folder's is not listed here
    return {"train": keep - val - quiz, "val": val, "quiz": quiz, **test}


def train_split_size(n: int, has_test: bool, classes: int, cfg: PipelineConfig) -> int:
    return split_sizes(n, has_test, classes, cfg)["train"]


def check_inputs(cfg: PipelineConfig, sources: bool = True) -> list[str]:
    """Raise :class:`ConfigError` for the first input that cannot work; return warnings
    about inputs that work but may mislead (printed once every check has passed)."""
    try:
        n, has_test, classes = source_size(cfg.data)
        if cfg.data.transfer_root is not None:
            list_transfer_root(Path(cfg.data.transfer_root).expanduser())
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.data.name == "imagefolder":  # its class count is known now: the checks that need it
        try:
            check_models(cfg, dataset_shape(cfg.data)[0], classes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    sizes = split_sizes(n, has_test, classes, cfg)
    train = sizes["train"]
    batches = {"teacher.train.batch_size": cfg.teacher.train.batch_size if not cfg.teacher.brought() else None,
               "teacher.finetune.batch_size": cfg.teacher.finetune.batch_size
               if cfg.teacher.brought() and cfg.teacher.finetune.mode != "none" else None,
               "student.train.batch_size": cfg.student.train.batch_size}
    for key, batch in batches.items():
        if batch is not None and batch > train:
            raise ConfigError(f"{key}={batch} exceeds the {train} training examples that {cfg.data.name} leaves after "
                              f"the splits (label_budget, train_fraction, val_fraction, quiz_fraction): lower it")
    check_device(cfg.dist.device)
    check_latency_budget(cfg)
    if sources:
        check_sources(cfg, classes)
    return [note for note in [imbalance_note(cfg.data), *held_out_warnings(sizes)] if note is not None]


def check_latency_budget(cfg: PipelineConfig) -> None:
    """With a latency limit, the architecture search needs a point that meets it: the point
    of fewest multiply-accumulates is measured here (one thread, a process of its own), and
    a limit even it breaks stops the run now, naming the key."""
    budget = cfg.student.budget
    if not cfg.arch_search.enabled or budget.latency_ms is None or budget.mode != "hard":
        return
    from pipelines.arch.space import cheapest_latency

    name, reading = cheapest_latency(cfg.arch_search.space, dataset_shape(cfg.data)[0], dataset_shape(cfg.data)[1] or 2)
    if reading > budget.latency_ms * (1 + budget.latency_slack):
        raise ConfigError(f"no point of arch_search.space meets student.budget.latency_ms={budget.latency_ms:g}: the "
                          f"cheapest, {name}, takes {reading:.3g} ms at batch 1 on this machine (one thread): raise "
                          f"the limit or add smaller points to arch_search.space")


def check_champion(cfg: PipelineConfig) -> None:
    """The champion this run's student would be compared with takes the same inputs and
    classes as this run's data, or the run stops now, naming ``tracking.experiment``,
    rather than at registration after all the training.  A store that does not exist yet
    holds no champion: it is not created here."""
    from pipelines import tracking
    from pipelines.register.student import champion_inputs, champion_mismatch

    uri = tracking.tracking_uri()
    if not cfg.tracking.register_best or (uri.startswith("sqlite:///") and not Path(uri[10:]).exists()):
        return
    model_name = f"{cfg.tracking.experiment}-student"
    if (champion := champion_inputs(model_name)) is None:
        return
    try:  # an image folder's classes by name, from one listing; the built-in sets' are fixed
        counts = class_counts(cfg.data)
        classes = len(counts) if counts is not None else source_size(cfg.data)[2]
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    names = list(counts) if counts is not None else None
    if (why := champion_mismatch(champion, model_name, dataset_shape(cfg.data)[0], classes, names)) is not None:
        raise ConfigError(why)


def check_servers() -> None:
    """A tracking server or Prefect API named by the environment must answer now: a run
    that would fail at its first log fails here, before any work, naming the URL."""
    from pipelines.tracking import is_server, tracking_uri

    uri = tracking_uri()
    if is_server(uri) and not answers(f"{uri.rstrip('/')}/health", timeout=10):
        raise ConfigError(f"no MLflow tracking server answers at MLFLOW_TRACKING_URI={uri}: start it "
                          f"(`metadistill services`, README: Team set-up) or unset MLFLOW_TRACKING_URI for the "
                          f"project home's own store")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if is_server(uri) and status_of(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                    headers=basic_auth(user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
                                    if user else None, timeout=30) == 401:
        raise ConfigError(f"the MLflow server at {uri} refused " + (
            f"the credentials of MLFLOW_TRACKING_USERNAME={user}" if user else
            "a caller without credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") +
            " (README: Team set-up)")
    api = os.environ.get("PREFECT_API_URL")
    if api and not answers(f"{api.rstrip('/')}/health", timeout=10):
        raise ConfigError(f"no Prefect server answers at PREFECT_API_URL={api}: start it (`metadistill services` "
                          f"or `metadistill server`) or unset PREFECT_API_URL for a run's own API")
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if api and status_of(f"{api.rstrip('/')}/flows/filter", "POST", {"limit": 1}, timeout=30,
                         headers=basic_auth(*auth.split(":", 1)) if auth and ":" in auth else None) == 401:
        raise ConfigError(f"the Prefect server at {api} refused " + (
            "the auth string in PREFECT_API_AUTH_STRING" if auth else
            "a caller without its auth string: set PREFECT_API_AUTH_STRING") + " (README: Team set-up)")
