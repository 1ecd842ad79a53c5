"""Progress bars for long work (rich), quiet when output is not a terminal."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("METADISTILL_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress_bar(desc: str, total: int) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``; draws a bar on a terminal, does nothing elsewhere."""
    if not _enabled():
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(desc, total=total)
        pending = [0]

        def advance() -> None:
            pending[0] += 1
            if pending[0] >= 25:  # redraw cost stays out of the step time
                progress.advance(task, pending[0])
                pending[0] = 0

        yield advance
