"""MLflow: the one package that imports ``mlflow``.

Owns: the tracking URI and client, runs and their logging (``runs``), the model registry
(``registry``), the UI command (``ui``) and the figures logged to runs (``plots``).
Re-exports the public names of ``runs``, ``registry`` and ``ui``.
May import: ``pipelines.common``.
"""

from pipelines.tracking.registry import (
    NotAllowed,
    Registration,
    VersionNotFound,
    current_champion,
    delete_version,
    model_version,
    model_version_by_alias,
    register_model,
    register_weights,
    registry_lock,
    resolve_version,
    set_alias,
)
from pipelines.tracking.runs import (
    EXPERIMENT_KIND,
    RunLogger,
    TrackingError,
    artifact_root,
    child_run,
    client,
    download_artifacts,
    ensure_experiment,
    find_run_by_tag,
    is_server,
    log_student_model,
    pipeline_run,
    tracking_uri,
)
from pipelines.tracking.ui import experiment_links, serve_ui

__all__ = [
    'NotAllowed',
    'EXPERIMENT_KIND',
    'TrackingError',
    'tracking_uri',
    'is_server',
    'artifact_root',
    'client',
    'ensure_experiment',
    'RunLogger',
    'pipeline_run',
    'child_run',
    'log_student_model',
    'find_run_by_tag',
    'download_artifacts',
    'Registration',
    'current_champion',
    'model_version_by_alias',
    'model_version',
    'VersionNotFound',
    'resolve_version',
    'register_weights',
    'registry_lock',
    'set_alias',
    'register_model',
    'delete_version',
    'experiment_links',
    'serve_ui',
]
