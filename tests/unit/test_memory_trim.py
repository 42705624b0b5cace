"""supervisor.memory.trim: glibc's malloc_trim after a tick, at most every TRIM_EVERY seconds."""

import platform

from supervisor import memory


def test_trim_runs_at_most_every_trim_every_seconds(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_last", None)
    monkeypatch.setattr(memory, "_trim", lambda pad: calls.append(pad) or 1)
    assert memory.trim(now=100.0)
    assert not memory.trim(now=100.0 + memory.TRIM_EVERY - 0.1)
    assert memory.trim(now=100.0 + memory.TRIM_EVERY)
    assert calls == [0, 0]


def test_without_malloc_trim_nothing_happens(monkeypatch):
    monkeypatch.setattr(memory, "_last", None)
    monkeypatch.setattr(memory, "_trim", False)  # musl, macOS
    assert not memory.trim(now=1.0)


def test_glibc_has_it():
    if platform.libc_ver()[0] != "glibc":  # this machine and CI run glibc: the lookup must find it
        raise AssertionError(f"expected glibc here, got {platform.libc_ver()}")
    fn = memory._lookup()
    assert fn and fn(0) in (0, 1)
