"""Names the OS shows for the daemon's own threads (``top -H``, ``ps -L -o comm``,
``/proc/PID/task/TID/comm``), so that what each one costs can be read from outside (bench/fleet.py
prints it). Linux only (a write to the thread's ``comm``, 15 bytes at most); a no-op elsewhere."""

from __future__ import annotations

import threading

_done = threading.local()


def name(text: str) -> None:
    """Name the calling thread ``text``, once: a later call from the same thread keeps the first name."""
    if getattr(_done, "named", False):
        return
    _done.named = True
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w", encoding="ascii") as f:
            f.write(text[:15])
    except (OSError, UnicodeEncodeError):
        pass
