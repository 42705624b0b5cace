"""Durations as people write them in YAML: "500ms", "10s", "5m", "1h", "1d", "1h30m" or a number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_SECONDS = 365 * 86400.0  # no setting means more than a year; beyond it sleeps and timers overflow
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: object) -> float:
    """Seconds as a float. Raises ValueError with a message fit for a person."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 5m, 1h or a number of seconds")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if len(text) > 100:
            raise ValueError("invalid duration: use 500ms, 10s, 5m, 1h (or 1h30m), or a number of seconds")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"invalid duration {value!r}: use 500ms, 10s, 5m, 1h (or 1h30m), or a number of seconds"
                ) from None
    else:
        raise ValueError("expected a duration such as 500ms, 10s, 5m, 1h or a number of seconds")
    if math.isnan(seconds):
        raise ValueError("a duration must be a number of seconds, not NaN")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_SECONDS:
        raise ValueError("a duration must be at most 365d")
    return seconds


def format_duration(seconds: float | None) -> str:
    """Short human form: 850ms, 12.3s, 4m05s, 2h10m."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}m{s:02d}s"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h{rem // 60:02d}m"
