"""SIGINT and SIGTERM as a stop that finishes cleanly: a stream finalizes its outputs, a training
run saves its state.

`docker stop`, Kubernetes and preempting cluster schedulers send SIGTERM (then SIGKILL a few
seconds later); Python's default is to die at once with nothing saved or finalized. Both handlers
here work in the main thread only (elsewhere they do nothing) and restore the previous handlers
on exit; the CLI then exits with 128 + the signal's number (130, 143), the shell convention.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

_Handlers = TypeVar("_Handlers", bound="SignalHandlers")


class SignalHandlers:
    """Context manager: while active, SIGINT and SIGTERM call `_handle`; `signum` is the first."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    @property
    def name(self) -> str | None:
        """The first signal's name (SIGTERM), or None."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class SignalStop(SignalHandlers):
    """The stream's stop: a signal sets `event` (the stream ends cleanly and its video is
    finalized); a second signal raises KeyboardInterrupt at once."""

    def __init__(self, event: threading.Event | None = None) -> None:
        super().__init__()
        self.event = event or threading.Event()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal (the stream sets `event` as it ends)
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()


class SignalInterrupt(KeyboardInterrupt):
    """A stop asked for by a signal (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignals(SignalHandlers):
    """Training's stop. A signal raises `SignalInterrupt` (a KeyboardInterrupt), so the loop's
    `except KeyboardInterrupt` saves the state as it does for Ctrl-C.

    Inside `at_boundaries()` the first signal is only noted: the loop asks `requested` after each
    whole iteration and stops there, so the state it saves is exactly an iteration's (a stop in
    the middle of one would save weights, BatchNorm statistics or optimizer moments of half an
    update, and the resumed run would differ from the uninterrupted one). A second signal
    raises at once. Within `deferred()` every signal is only noted, so a save is not cut short."""

    def __init__(self) -> None:
        super().__init__()
        self._deferring = False
        self._at_boundaries = False

    @property
    def requested(self) -> bool:
        """A signal came (and was noted, not raised)."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self._deferring or (first and self._at_boundaries):
            return
        raise SignalInterrupt(signum)

    @contextmanager
    def at_boundaries(self) -> Iterator[None]:
        """A first signal inside is noted for the loop to act on between iterations."""
        self._at_boundaries = True
        try:
            yield
        finally:
            self._at_boundaries = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals received inside are noted, not raised (the stop is already under way)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
