"""What every schema shares: the error raised for a bad configuration (exit 2) and the
strict base model (unknown keys are errors).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
