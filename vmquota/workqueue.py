"""A keyed work queue, like client-go's: each key is worked on by one worker at a time.

Bottom layer, plain data structure with its own lock. A key added while it is being
worked on is kept and handed out again once `done` is called, so no change is lost
and no key is reconciled by two threads at once. `add(key, after=s)` schedules a
key for later (grace periods, back-offs); time comes from the injected clock.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[K] = deque()  # popped from the left: a list would move every key on each get
        self._queued: set[K] = set()  # in _ready, or waiting for its worker to finish
        self._processing: set[K] = set()
        self._later: list[tuple[float, int, K]] = []
        self._seq = 0
        self._closed = False

    def add(self, key: K, *, after: float = 0.0) -> None:
        with self._cond:
            if after > 0:
                self._seq += 1
                heapq.heappush(self._later, (self._clock() + after, self._seq, key))
            elif key not in self._queued:
                self._queued.add(key)
                if key not in self._processing:
                    self._ready.append(key)
            self._cond.notify()

    def get(self) -> K | None:
        """The next key to work on, waiting as needed; None once the queue is closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._promote_due()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                timeout = (self._later[0][0] - self._clock()) if self._later else None
                self._cond.wait(timeout=None if timeout is None else max(timeout, 0.001))

    def done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._queued:
                self._ready.append(key)
                self._cond.notify()

    def _promote_due(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            _, _, key = heapq.heappop(self._later)
            if key not in self._queued:
                self._queued.add(key)
                if key not in self._processing:
                    self._ready.append(key)

    def idle(self) -> bool:
        with self._cond:
            return not self._ready and not self._processing and not self._queued

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
