"""Progress bars for long work: shown on a terminal, silent elsewhere (tests, CI, pipes).

``TESSERA_PROGRESS=1`` forces them on, ``TESSERA_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def enabled() -> bool:
    forced = os.environ.get("TESSERA_PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false", "no")
    return sys.stderr.isatty()


class Bar:
    """A thread-safe counter that drives a rich bar, or does nothing when bars are off."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._progress = progress
        self._task = task
        self._lock = threading.Lock()

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None and self._task is not None:
            with self._lock:
                self._progress.advance(self._task, amount)


@contextmanager
def bar(
    description: str, total: float | None, *, bytes: bool = False, show: bool = True
) -> Iterator[Bar]:
    """A progress bar over ``total`` items (or bytes), shown only if ``show`` and enabled()."""
    if not (show and enabled()):
        yield Bar(None, None)
        return
    counter = (DownloadColumn(), TransferSpeedColumn()) if bytes else (MofNCompleteColumn(),)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *counter,
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield Bar(progress, task)
