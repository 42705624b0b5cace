"""Wake the loop on events, not only on the clock.

``Wakeup`` is what platforms, the remote-control lanes and the heartbeat deadlines poke: ``wake(reason)``
says "something happened, look now" (a local worker process exited, a docker die event, a pod
watch event, a ping round completed); ``deadlines(items)`` holds a heap of per-worker heartbeat
deadlines (``last_heartbeat + heartbeat_timeout`` on the supervisor's clock), so that silence is judged
at heartbeat_timeout, not at the next tick. The daemon's wake thread (``supervisor.daemon``) waits
on it and runs an extra tick soon after, coalesced (every wake that arrives before that tick starts is
served by it) and rate-limited (at most one extra tick per ``MIN_GAP``). The regular tick keeps
running every ``loop.interval`` to reconcile: a wake that is lost costs at most one interval.

Thread-safe; no I/O.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable

MIN_GAP = 0.2  # seconds between two extra ticks, at least
DEADLINE_SLACK = 0.05  # a deadline fires this much after the expiry, so that the tick sees it expired


class Wakeup:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._cond = threading.Condition()
        self._reasons: list[str] = []
        self._heap: list[tuple[float, str]] = []  # (deadline on ``clock``, key)
        self._closed = False
        self.wakes = 0  # wake() calls (tests, narration)

    def wake(self, reason: str) -> None:
        """Something happened that the next tick should see now. Never blocks for long; safe from any thread."""
        with self._cond:
            self.wakes += 1
            if len(self._reasons) < 100:  # reasons are for the log; a burst is one tick anyway
                self._reasons.append(reason)
            self._cond.notify_all()

    def deadlines(self, items: Iterable[tuple[float, str]]) -> None:
        """Replace the heap of deadlines: (when on ``clock``, key)."""
        heap = [(when + DEADLINE_SLACK, key) for when, key in items]
        heapq.heapify(heap)
        with self._cond:
            self._heap = heap
            self._cond.notify_all()

    def at(self, when: float, key: str) -> None:
        """Add one deadline (a worker heard since: its deadline moved)."""
        with self._cond:
            heapq.heappush(self._heap, (when + DEADLINE_SLACK, key))
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def wait(self, timeout: float) -> tuple[list[str], list[str]]:
        """Until a wake or a deadline, at most ``timeout`` seconds: (reasons, keys whose deadline passed).
        Both empty on a timeout or after ``close()``."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = self.clock()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[1])
                if self._reasons or due:
                    reasons, self._reasons = self._reasons, []
                    return reasons, due
                left = end - time.monotonic()
                if left <= 0:
                    return [], []
                if self._heap:
                    left = min(left, max(0.001, self._heap[0][0] - now))
                self._cond.wait(left)
            return [], []

    def take(self) -> list[str]:
        """The reasons that arrived since the last ``wait`` (the tick about to run serves them too)."""
        with self._cond:
            reasons, self._reasons = self._reasons, []
            return reasons

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
