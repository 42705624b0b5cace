"""The last 15 minutes of each queue's length, kept by the daemon for the status page.

A bounded ring per queue: at most one point per ``step`` seconds (the largest length seen in that
step, so that a short spike still shows), points older than ``window`` dropped, a queue no longer
reported forgotten after ``window``. Pure data with the clock passed in; the daemon records each
completed tick and ``/status`` carries the points as ``queues[].trend`` ([[time, length], ...]).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping

WINDOW = 15 * 60.0
STEP = 10.0


class QueueTrend:
    def __init__(self, window: float = WINDOW, step: float = STEP):
        self.window = window
        self.step = step
        self._points: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()  # recorded by the tick thread, read by HTTP threads

    def record(self, now: float, lengths: Mapping[str, int | None]) -> None:
        """One tick's lengths (None: not read this tick, nothing recorded)."""
        with self._lock:
            for name, n in lengths.items():
                if n is None:
                    continue
                pts = self._points.setdefault(name, deque())
                if pts and now - pts[-1][0] < self.step:
                    t, m = pts[-1]
                    pts[-1] = (t, max(m, n))
                else:
                    pts.append((now, n))
            for name in list(self._points):
                pts = self._points[name]
                while pts and pts[0][0] < now - self.window:
                    pts.popleft()
                if not pts:
                    del self._points[name]

    def points(self, name: str) -> list[list[float]]:
        with self._lock:
            return [[t, n] for t, n in self._points.get(name, ())]
