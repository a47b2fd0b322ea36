"""Progress bars (rich) that vanish with --quiet or --json; all of it goes to stderr."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self._bar = None
        if self.enabled:
            self._bar = RichProgress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=False)

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()

    def add(self, description: str, total: int):
        return self._bar.add_task(description, total=total) if self._bar else None

    def advance(self, task, n: int = 1):
        if self._bar is not None and task is not None:
            self._bar.advance(task, n)
