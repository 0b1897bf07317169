"""Progress reporting that library code emits and the CLI renders (rich) or tests silence."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Silent base: long jobs call `task`, `advance` and `log`; subclasses show them."""

    def task(self, description: str, total: int | None) -> AbstractContextManager[Any]:
        """A context for one long stage of `total` steps (None: unknown, e.g. a live stream)."""
        return _NullContext()

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        """Progress within the current task, with an optional short status (loss, lr)."""

    def log(self, message: str) -> None:
        """A line worth keeping in the terminal."""


class _NullContext(AbstractContextManager):
    def __exit__(self, *exc: object) -> None:
        return None


class RichReporter(Reporter):
    """Progress bars with ETA on stderr via rich."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task_id: Any = None

    def task(self, description: str, total: int | None) -> AbstractContextManager[Any]:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self._progress = progress
        self._task_id = progress.add_task(description, total=total, status="")
        return progress

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self._progress is None:
            return
        fields = {} if status is None else {"status": status}
        self._progress.update(self._task_id, advance=steps, **fields)

    def log(self, message: str) -> None:
        self.console.print(message, markup=False)  # paths and lists may hold [brackets]


class StageProgress(AbstractContextManager):
    """Turns `(stage, done, total)` callbacks into one reporter task per stage."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._stage: str | None = None
        self._done = 0
        self._task: AbstractContextManager[Any] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self._close()
            self._stage, self._done = stage, 0
            self._task = self.reporter.task(stage, total)
            self._task.__enter__()
        if done > self._done:
            self.reporter.advance(done - self._done)
            self._done = done

    def _close(self) -> None:
        if self._task is not None:
            self._task.__exit__(None, None, None)
            self._task = None

    def __exit__(self, *exc: object) -> None:
        self._close()
