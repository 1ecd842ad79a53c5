"""The project home: every artifact a run leaves lives below it."""

from __future__ import annotations

import hashlib
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


def sha256_of(path: Path, digest=None) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time (fed into ``digest`` when given)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
