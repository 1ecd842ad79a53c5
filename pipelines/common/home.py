"""The project home, and the three patterns everything written below it follows: a cache
key is a pure function of what went into the artifact, a write is atomic (a reader sees
the old file or the whole new one, never a torn one), and what must happen once is made
under a lock on the home (runs that overlap, as two schedules firing together do, take
turns at it: the first makes it, the others wait and read it)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")


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


_held = threading.local()  # the names of the home locks this thread holds


@contextlib.contextmanager
def home_lock(name: str) -> Iterator[None]:
    """An exclusive lock named ``name`` over every process (and thread) that shares the
    project home: ``flock`` on ``locks/<name>.lock``, released by the kernel if the holder
    dies, so a killed run never leaves it stuck.  Re-entrant within a thread (a stage that
    holds it may call a function that takes it again).  Works across machines only where
    the home's filesystem honours ``flock``."""
    held = getattr(_held, "names", None)
    if held is None:
        held = _held.names = set()
    if name in held:
        yield
        return
    folder = project_home() / "locks"
    folder.mkdir(exist_ok=True)
    with open(folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        held.add(name)
        try:
            yield
        finally:
            held.discard(name)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def made_once(name: str, load: Callable[[], T | None], make: Callable[[], T]) -> T:
    """``load()`` when the artifact exists; else, under ``home_lock(name)``, ``load()``
    again (another run may have made it while this one waited) or ``make()``.  A cache hit
    never waits; two runs that miss together make the artifact once."""
    found = load()
    if found is not None:
        return found
    with home_lock(name):
        found = load()
        return found if found is not None else make()
