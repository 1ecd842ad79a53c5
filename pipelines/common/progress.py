"""Progress of long work: a bar on a terminal, a line every few percent elsewhere (a log
file, CI, a supervisor), nothing with METADISTILL_PROGRESS=0."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LINE_EVERY = 0.05  # a progress line every 5% of the work when stderr is not a terminal


def _mode() -> str:
    if os.environ.get("METADISTILL_PROGRESS", "1") == "0":
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


@contextlib.contextmanager
def progress_bar(desc: str, total: int) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``: one unit of ``total`` done."""
    mode = _mode()
    if mode == "off" or total <= 0:
        yield lambda: None
        return
    if mode == "lines":
        yield _lines(desc, total)
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


def _lines(desc: str, total: int) -> Callable[[], None]:
    start, done = time.perf_counter(), [0]
    every = max(1, int(total * LINE_EVERY))

    def advance() -> None:
        done[0] += 1
        if done[0] % every == 0 or done[0] == total:
            seconds = time.perf_counter() - start
            print(f"{desc}: {100 * done[0] / total:.0f}% ({done[0]}/{total}, {seconds:.0f} s, "
                  f"{done[0] / max(seconds, 1e-9):.1f}/s)", file=sys.stderr, flush=True)

    return advance
