"""The data stage's errors."""

from __future__ import annotations

from pipelines.config.errors import ConfigError


class DataError(RuntimeError):
    """Missing or corrupt data; the message names the file and the expected layout."""


class DataLayoutError(DataError, ConfigError):
    """A data set whose classes cannot be used as given (exit 2, like bad settings)."""
