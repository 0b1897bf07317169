"""A bounded hand-off between two pipeline threads that either side can close."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    """A FIFO of at most `capacity` items.

    `newest_wins=False`: `put` waits for room (files: every frame is processed).
    `newest_wins=True`: `put` never waits; when full, the oldest item is dropped and counted
    (live sources: inference always gets the latest frame).
    After `close()` (by either side), `put` returns False and `get` returns what is left, then None.
    """

    def __init__(self, capacity: int, newest_wins: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.newest_wins = newest_wins
        self.dropped = 0
        self._items: deque[T] = deque()
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: T) -> bool:
        """Add `item`; False if the channel was closed (the item is not added)."""
        with self._cond:
            while not self.newest_wins and len(self._items) >= self.capacity and not self._closed:
                self._cond.wait(0.5)
            if self._closed:
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> T | None:
        """The next item; None once the channel is closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait(0.5)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more puts; gets drain what is left."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
