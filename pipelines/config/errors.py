"""What every schema shares: the error raised for a bad configuration (exit 2) and the
strict base model (unknown keys are errors).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


class MovedKeyWarning(FutureWarning):
    """A config key that moved: it works for one more release; the message names its new place."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
