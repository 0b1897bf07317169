"""AdaptWorker: runs an OnlineAdapter in a background thread beside the inference thread.

The inference thread calls `offer(frame, presence, index)` after every frame; it never waits.
A frame is due every `every` frames, or at once when the shift detector fires on its presence.
A due frame goes to a one-frame slot (a newer due frame replaces it). It is skipped, and
counted, when the worker is still busy with an earlier frame or has used its time budget
(busy time at most `budget` of wall time), so adaptation slows the stream by little more than
its budget. A frame where a shift was detected is never skipped for the budget: the
statistics of a new condition matter most right after it starts (HAMLET adapts only then), and
the detector fires at most once per `cooldown` frames. Every `sync_every` updates, after a reset
and whenever the adapter switches the served state (another condition's, or the source's for a
home frame, which is not learned from), the teacher is pushed to the runtime; a push the
runtime's check rejects rolls the adapter back to what the runtime runs. `close()` waits for the
update under way, then releases the sync (a TensorRT sync holds a standby engine).
Events (updates, switches, syncs, resets, shifts, errors) queue up for the stream's stats
file. With a state file, the adapter's state is also saved (atomically) every `save_every`
seconds.

With `inline` (`stream --adapt-wait`, and the benchmarks) there is no slot and no budget:
`offer` runs every due frame's update itself, in the caller's thread, so the stream waits for
it and a recorded video adapts the same way on every run.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from adapt_deploy.channel import Channel
from adapt_deploy.tta.shift import ShiftDetector

if TYPE_CHECKING:
    from adapt_deploy.tta.adapter import OnlineAdapter


class SyncResultLike(Protocol):
    ok: bool
    seconds: float
    reason: str | None


class SyncLike(Protocol):
    """What the worker needs of `tta.sync`: push the teacher to the runtime, checked."""

    def push(self, model: Any) -> SyncResultLike: ...

    def close(self) -> None: ...


@dataclass
class AdaptSummary:
    """What adaptation did during a stream."""

    offered: int = 0
    due: int = 0
    adapted: int = 0
    skipped_busy: int = 0
    skipped_budget: int = 0
    shifts: int = 0
    home: int = 0  # due frames that looked like the training data: served the source state
    switches: int = 0  # changes of the served state (a condition's, or the source's)
    syncs: int = 0
    sync_failures: int = 0
    resets: int = 0
    busy_seconds: float = 0.0
    step_seconds: float = 0.0  # totals: a stream may run for days
    sync_seconds: float = 0.0
    error: str | None = None
    still_running: bool = False  # close() gave up waiting: an update was still under way
    waited: bool = False  # inline: the stream waited for every update (nothing skipped)

    def lines(self) -> list[str]:
        pushes = self.syncs + self.sync_failures
        step = 1000 * self.step_seconds / self.adapted if self.adapted else 0.0
        sync = 1000 * self.sync_seconds / pushes if pushes else 0.0
        skipped = (
            "the stream waited for each"
            if self.waited
            else f"{self.skipped_busy} skipped busy, {self.skipped_budget} over budget"
        )
        lines = [
            f"adaptation: {self.adapted} updates on {self.due} due frames ({skipped}), "
            f"{self.shifts} shifts detected, {self.resets} resets; update {step:.0f} ms",
            f"conditions: {self.switches} switches of the served state, {self.home} due frames "
            "at home (source state, not learned from)",
            f"sync: {self.syncs} pushed ({sync:.0f} ms each), {self.sync_failures} rejected "
            "and rolled back",
        ]
        if self.error:
            lines.append(f"adaptation stopped after an error: {self.error}")
        if self.still_running:
            lines.append("adaptation was closed with an update still running")
        return lines


class AdaptWorker:
    """See the module docstring. `start()`, `offer(...)` per frame, `close()` at the end."""

    def __init__(
        self,
        adapter: OnlineAdapter,
        sync: SyncLike | None,
        detector: ShiftDetector | None = None,
        inline: bool = False,
        state: Path | None = None,
        save_every: float = 60.0,
    ) -> None:
        self.adapter = adapter
        self.inline = inline  # update inside `offer`, every due frame, no budget
        self.state = state  # written every `save_every` seconds of updates: a kill loses little
        self.save_every = save_every
        self._saved = time.perf_counter()
        self.sync = sync
        self.detector = detector
        self.summary = AdaptSummary()
        self._slot: Channel[tuple[int, np.ndarray, bool]] = Channel(1, newest_wins=True)
        self._events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-adapt", daemon=True)
        self._started = 0.0
        self._unsynced = 0
        self._closed = False

    def start(self) -> AdaptWorker:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def offer(self, frame: np.ndarray, presence: np.ndarray, index: int) -> str:
        """'adapt' (queued), 'not due', 'busy' or 'budget' (skipped, counted), or 'stopped'."""
        s = self.summary
        s.offered += 1
        shifted = self.detector.update(presence) if self.detector else False
        if shifted:
            s.shifts += 1
            self._events.put({"event": "shift", "frame": index})
        if s.error is not None or self._closed:
            return "stopped"
        if not shifted and (s.offered - 1) % self.adapter.options.every:
            return "not due"
        s.due += 1
        if self.inline:
            self._guarded(index, frame, shifted)
            return "adapt"
        if not shifted:  # a shift (rare: the detector cools down) always gets its update
            if self._busy.is_set():
                s.skipped_busy += 1
                return "busy"
            elapsed = time.perf_counter() - self._started
            if s.busy_seconds > self.adapter.options.budget * elapsed:
                s.skipped_budget += 1
                return "budget"
        before = self._slot.dropped
        if not self._slot.put((index, frame.copy(), shifted)):
            return "stopped"
        if self._slot.dropped > before:  # an older due frame had not started yet
            s.skipped_busy += 1
        return "adapt"

    def events(self) -> list[dict[str, Any]]:
        """The events since the last call, oldest first."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        while (item := self._slot.get()) is not None:
            self._guarded(*item)

    def _guarded(self, index: int, frame: np.ndarray, shifted: bool) -> None:
        """One update with its busy time counted; an error stops adaptation, not the stream."""
        self._busy.set()
        began = time.perf_counter()
        try:
            with self.adapter.on_own_stream():  # on a GPU, off the stream inference waits for
                self._update(index, frame, shifted)
        except Exception as exc:  # adaptation must never take the stream down
            self.summary.error = f"{type(exc).__name__}: {exc}"
            self._events.put({"event": "error", "frame": index, "error": self.summary.error})
            self._slot.close()
        finally:
            self.summary.busy_seconds += time.perf_counter() - began
            self._busy.clear()

    def _update(self, index: int, frame: np.ndarray, shifted: bool) -> None:
        report = self.adapter.step(frame, shifted)
        s = self.summary
        if report.switched:
            s.switches += 1
            self._events.put({"event": "switch", "frame": index, "serving": report.switched})
        obs = report.observation
        if obs is None:  # a home frame: nothing learned
            s.home += 1
            if report.switched and self.sync:
                self._push(index)
            self._save_when_due()
            return
        s.adapted += 1
        s.step_seconds += report.seconds
        self._events.put(
            {
                "event": "update",
                "frame": index,
                "update": report.update,
                "condition": report.condition,
                "loss": round(report.loss, 5),
                "losses": {k: round(v, 5) for k, v in report.losses.items()},
                "present": obs.present_classes,
                "predicted": obs.predicted_classes,
                "entropy": round(obs.entropy, 4),
                "ms": round(1000 * report.seconds, 1),
            }
        )
        self._unsynced += 1
        if report.reset:
            s.resets += 1
            self._events.put({"event": "reset", "frame": index, "reason": report.reset})
        push = report.reset or report.switched
        if self.sync and (push or self._unsynced >= self.adapter.options.sync_every):
            self._push(index)
        self._save_when_due()

    def _save_when_due(self) -> None:
        """Save the adapter's state when `save_every` seconds have passed since the last save."""
        if self.state is not None and time.perf_counter() - self._saved >= self.save_every:
            from adapt_deploy.tta.state import save_state

            save_state(self.adapter, self.state)
            self._saved = time.perf_counter()

    def _push(self, index: int) -> None:
        assert self.sync is not None
        result = self.sync.push(self.adapter.teacher)
        s = self.summary
        s.sync_seconds += result.seconds
        event: dict[str, Any] = {
            "event": "sync" if result.ok else "sync_failed",
            "frame": index,
            "ms": round(1000 * result.seconds, 1),
        }
        if result.ok:
            s.syncs += 1
            self.adapter.mark_synced()
        else:
            s.sync_failures += 1
            self.adapter.rollback()
            event["reason"] = result.reason
        self._unsynced = 0
        self._events.put(event)

    def close(self, timeout: float = 60.0) -> AdaptSummary:
        """Stop taking frames, wait up to `timeout` s for the current update (and its push) to
        finish, then close the sync. `summary.still_running`: it did not finish, so the adapter
        is still in use (do not save it) and the sync stays open. Later calls do not wait; one
        that finds the thread ended closes the sync then."""
        self._slot.close()
        if self._thread.ident is not None:
            self._thread.join(0.0 if self._closed else timeout)
        self._closed = True
        self.summary.waited = self.inline
        self.summary.still_running = self._thread.is_alive()
        if not self.summary.still_running and self.sync is not None:
            self.sync.close()
            self.sync = None  # closed once; no update can push any more
        return self.summary
