"""TODO."""

from pipelines.tracking.runs import EXPERIMENT_KIND, tracking_uri, artifact_root, client, ensure_experiment, RunLogger, pipeline_run, child_run, log_student_model, find_run_by_tag, download_artifacts
from pipelines.tracking.registry import Registration, current_champion, model_version_by_alias, model_version, VersionNotFound, resolve_version, register_weights, set_alias, register_model, delete_version
from pipelines.tracking.ui import experiment_links, serve_ui

__all__ = ['EXPERIMENT_KIND', 'tracking_uri', 'artifact_root', 'client', 'ensure_experiment', 'RunLogger', 'pipeline_run', 'child_run', 'log_student_model', 'find_run_by_tag', 'download_artifacts', 'Registration', 'current_champion', 'model_version_by_alias', 'model_version', 'VersionNotFound', 'resolve_version', 'register_weights', 'set_alias', 'register_model', 'delete_version', 'experiment_links', 'serve_ui']
