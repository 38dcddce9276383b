"""Progress bars for long work (decode, encode, embed, prepare), on stderr.

Shown when stderr is a terminal, or when GIBLET_PROGRESS=1; GIBLET_PROGRESS=0 hides them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def enabled() -> bool:
    setting = os.environ.get("GIBLET_PROGRESS")
    if setting is not None:
        return setting not in ("0", "", "false", "no")
    return sys.stderr.isatty()


class _Bar:
    def __init__(self, progress: Optional[Progress], task) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def set_total(self, total: Optional[float]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def describe(self, text: str) -> None:
        """Replace the text in front of the bar (e.g. the latest loss and rate)."""
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def bar(description: str, total: Optional[float] = None, show: Optional[bool] = None) -> Iterator[_Bar]:
    """``with bar("decode video", total=n_frames) as b: b.advance(k)``.

    ``show=False`` hides the bar; otherwise it shows where ``enabled()`` says so.
    """
    if show is False or not enabled():
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total))
