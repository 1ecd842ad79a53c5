"""The project home: every artifact a run leaves lives below it."""

from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    home = Path(os.environ.get("METADISTILL_HOME", ".metadistill")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(kind: str) -> Path:
    path = project_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
