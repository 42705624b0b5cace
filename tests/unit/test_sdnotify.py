"""sd_notify without libsystemd: real SOCK_DGRAM unix sockets (a path and the abstract namespace)."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest

from supervisor.sdnotify import SdNotify, socket_address, watchdog_usec


@pytest.fixture
def dgram():
    d = tempfile.mkdtemp(prefix="sdu-")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()
    os.unlink(path)
    os.rmdir(d)


def fields(s: socket.socket) -> list[str]:
    return s.recv(65536).decode().split("\n")


def test_messages_on_a_path_socket(dgram):
    path, s = dgram
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "KEEP": "1"}
    sd = SdNotify(env)
    assert env == {"KEEP": "1"}, "the variables are removed: children must not inherit them"
    assert sd.enabled and sd.watchdog_enabled and sd.watchdog_usec == 30_000_000
    assert sd.ready("cycle 1: 2/2 workers alive\nsecond line")
    assert fields(s) == ["READY=1", "STATUS=cycle 1: 2/2 workers alive second line"]
    assert sd.watchdog("cycle 2")
    assert fields(s) == ["WATCHDOG=1", "STATUS=cycle 2"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd.reloading()
    got = fields(s)
    assert got[0] == "RELOADING=1" and got[1].startswith("MONOTONIC_USEC=")
    assert before <= int(got[1].split("=")[1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd.stopping()
    assert fields(s)[0] == "STOPPING=1"
    sd.close()


def test_abstract_namespace():
    name = f"sdnotify-unit-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    try:
        sd = SdNotify({"NOTIFY_SOCKET": "@" + name})
        assert sd.address == b"\0" + name.encode()
        assert sd.ready()
        assert fields(s) == ["READY=1"]
    finally:
        s.close()


def test_no_socket_is_a_no_op_and_no_watchdog_without_watchdog_usec(dgram):
    sd = SdNotify({})
    assert not sd.enabled and not sd.ready("x") and not sd.watchdog("x") and not sd.stopping()
    path, s = dgram
    sd = SdNotify({"NOTIFY_SOCKET": path})
    assert sd.enabled and not sd.watchdog_enabled
    assert sd.watchdog("cycle 3")
    assert fields(s) == ["STATUS=cycle 3"]  # systemd asked for no watchdog: only the status line


def test_a_vanished_socket_warns_once_and_never_raises(dgram, caplog):
    path, s = dgram
    sd = SdNotify({"NOTIFY_SOCKET": path + "-gone"})
    assert not sd.ready() and not sd.watchdog() and not sd.stopping()
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


def test_parsing():
    assert socket_address("@x") == b"\0x"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("relative") is None and socket_address("") is None
    assert watchdog_usec({"WATCHDOG_USEC": "5000000"}) == 5_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}) == 5_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_usec({"WATCHDOG_USEC": "soon"}) is None and watchdog_usec({}) is None
