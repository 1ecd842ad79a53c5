"""The project home, and the two patterns everything written below it follows: a cache
key is a pure function of what went into the artifact, and a write is atomic (a reader
sees the old file or the whole new one, never a torn one)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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


def cache_key(version: int | None, **parts) -> str:
    """The cache key of an artifact made from ``parts`` (JSON-able) by code of ``version``:
    24 hex digits of the SHA-256 of their sorted JSON, so any change of an input, or a
    version bump when the code that makes the artifact changes, gives a new key."""
    blob = parts if version is None else {"v": version, **parts}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write ``path`` through a temporary file beside it, flushed to disk and renamed into
    place when the block ends without an error (else removed)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value, **dumps) -> None:
    """``value`` as JSON at ``path``, atomically."""
    with atomic_file(path) as fh:
        fh.write(json.dumps(value, **dumps))


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``folder``, renamed to ``folder`` when the
    block ends without an error.  When another process finished the same folder first,
    its copy is kept (the key says both are equivalent) and this one is dropped."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        with contextlib.suppress(OSError):  # another process finished first
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
