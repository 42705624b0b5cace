"""supervisor/wake.py: the Wakeup the platforms, the ping lane and the heartbeat deadlines poke, with
an injected clock; and platforms.local_procs.ExitWatch, which pokes it when a real process exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from platforms.local_procs import ExitWatch, read_proc
from supervisor.wake import DEADLINE_SLACK, Wakeup


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_wake_returns_every_reason_once_and_a_quiet_wait_returns_nothing():
    w = Wakeup(Clock())
    w.wake("local worker a: pid 1 exited")
    w.wake("ping replies")
    assert w.wait(0.0) == (["local worker a: pid 1 exited", "ping replies"], [])
    assert w.wait(0.0) == ([], [])  # served: not returned again
    assert w.wakes == 2


def test_a_deadline_fires_only_once_its_time_has_passed_and_a_new_heap_replaces_the_old():
    clock = Clock(1000.0)
    w = Wakeup(clock)
    w.deadlines([(1010.0, "celery@a"), (1003.0, "celery@b")])
    assert w.wait(0.0) == ([], [])
    clock.t = 1003.0 + DEADLINE_SLACK
    assert w.wait(0.0) == ([], ["celery@b"])
    w.deadlines([(1020.0, "celery@a")])  # the next tick heard a again: its old deadline is gone
    clock.t = 1011.0
    assert w.wait(0.0) == ([], [])
    w.at(1011.0 - DEADLINE_SLACK, "celery@c")  # first heard between two ticks
    assert w.wait(0.0) == ([], ["celery@c"])
    assert w.pending() == 1


def test_a_wake_from_another_thread_ends_a_long_wait():
    w = Wakeup()
    threading.Timer(0.05, w.wake, args=("docker die",)).start()
    assert w.wait(30.0) == (["docker die"], [])


def test_close_ends_a_wait():
    w = Wakeup()
    threading.Timer(0.05, w.close).start()
    assert w.wait(30.0) == ([], [])


def test_exit_watch_wakes_when_a_watched_process_is_killed_and_not_before():
    got: list[str] = []
    woke = threading.Event()

    def wake(reason: str) -> None:
        got.append(reason)
        woke.set()

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = ExitWatch(wake)
    try:
        watch.watch(p.pid, read_proc(p.pid).start, "local worker w")
        assert not woke.wait(0.3), got  # running: nothing
        p.send_signal(signal.SIGKILL)
        assert woke.wait(10), "the exit was not reported"
        assert got == [f"local worker w: pid {p.pid} exited"]
    finally:
        p.kill()
        p.wait()
        watch.close()


def test_exit_watch_reports_a_process_already_gone_and_never_a_reused_pid():
    got: list[str] = []
    woke = threading.Event()
    watch = ExitWatch(lambda r: (got.append(r), woke.set()))
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = read_proc(p.pid).start
    p.wait()
    try:
        watch.watch(p.pid, start, "local worker gone")
        assert woke.wait(10)
        assert got == [f"local worker gone: pid {p.pid} is gone"]
        # a live pid with another start time is not the process we saw: reported gone, not watched
        got.clear()
        woke.clear()
        me = read_proc(__import__("os").getpid())
        watch.watch(me.pid, me.start - 100.0, "local worker reused")
        assert woke.wait(10)
        assert got == [f"local worker reused: pid {me.pid} is gone"]
    finally:
        watch.close()
