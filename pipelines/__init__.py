"""Prefect flows, stages, CLI and tracking: composes models/ and meta/ with data and MLflow."""
