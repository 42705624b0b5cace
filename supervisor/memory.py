"""Hand memory that was freed back to the system (glibc's ``malloc_trim``), now and then.

The heartbeat thread allocates and frees a few hundred kilobytes a second (socket reads, messages,
decoded events), and glibc keeps what is freed in its arenas: without a trim the daemon's RSS creeps
up (0.5 MB over the first 10 minutes at 500 workers, measured with bench/fleet.py, every byte of it
given back by one ``malloc_trim(0)``: Python's own allocations stayed flat under tracemalloc). The
daemon calls ``trim()`` after each tick; it trims at most every ``TRIM_EVERY`` seconds, about 80 us
each time. A no-op where the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import threading
import time

TRIM_EVERY = 30.0  # seconds between two trims, at least

_lock = threading.Lock()
_last: float | None = None
_trim = None  # the C function once looked up; False when there is none


def trim(now: float | None = None) -> bool:
    """``malloc_trim(0)`` unless one ran less than ``TRIM_EVERY`` seconds ago (``now``: monotonic);
    True when it ran."""
    global _last, _trim
    now = time.monotonic() if now is None else now
    with _lock:
        if _last is not None and now - _last < TRIM_EVERY:
            return False
        _last = now
        if _trim is None:
            _trim = _lookup()
        fn = _trim
    if not fn:
        return False
    fn(0)
    return True


def _lookup():
    try:
        import ctypes

        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn
