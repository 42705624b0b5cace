"""`supervisor run` under systemd's eyes: sd_notify datagrams on a real unix socket, SIGHUP reloads
(a broken file, then a changed one), the failing-cycle watchdog policy, and the shipped unit file
checked by systemd's own `systemd-analyze verify` and `security`.

The daemon runs as a real subprocess against a private Redis; the notification socket is a real
SOCK_DGRAM socket bound by the test (a path, and the abstract "@" form), as systemd binds it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.brokers import free_port, need
from tests.support.cli import REPO, CliDaemon, cli_env, write_config
from tests.support.fleet import wait_until

UNIT = REPO / "systemd" / "celery-supervisor.service"
EXPOSURE_MAX = 4.0


# ---------------------------------------------------------------- helpers
class NotifySocket:
    """What systemd does for Type=notify: a SOCK_DGRAM unix socket; every datagram is recorded
    with the time it arrived and the daemon's log size at that moment (to order it against logs)."""

    def __init__(self, address: str | None = None, log_of=None):
        """``address``: "@name" (abstract namespace), or None for a path in a short temporary folder
        (a unix socket path must stay under 108 bytes, which a pytest tmp_path may not)."""
        self.dir = None
        if address is None:
            self.dir = tempfile.mkdtemp(prefix="sdn-")
            address = os.path.join(self.dir, "notify")
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.log_of = log_of
        self.messages: list[tuple[float, dict[str, str], str]] = []  # (monotonic, fields, log so far)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            try:
                log = self.log_of() if self.log_of else ""
            except Exception as e:  # recorded, never the end of the recording
                log = f"(log unavailable: {e!r})"
            with self._lock:
                self.messages.append((time.monotonic(), fields, log))

    def fields(self) -> list[dict[str, str]]:
        with self._lock:
            return [m[1] for m in self.messages]

    def count(self, item: str) -> int:
        return sum(has(f, item) for f in self.fields())

    def wait(self, item: str, n: int = 1, timeout: float = 30.0) -> dict[str, str]:
        """The n-th datagram holding ``item`` ("READY=1"), waiting for it."""
        try:
            wait_until(lambda: self.count(item) >= n, timeout, what=f"{n} x {item}")
        except AssertionError as e:
            raise AssertionError(f"{e}; received: {self.fields()}") from None
        return [f for f in self.fields() if has(f, item)][n - 1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def has(fields: dict[str, str], item: str) -> bool:
    """Does a datagram's fields hold ``item``: "READY=1" (that value) or "STATUS" (any value)?"""
    k, sep, v = item.partition("=")
    return k in fields and (not sep or fields[k] == v)


def base_config(tmp: Path, redis_url: str, uid: str, **top) -> dict:
    cfg = {
        "broker": {"url": redis_url, "connect_timeout": "1s"},
        "loop": {"interval": "1s", "state_path": str(tmp / "state.db")},
        "groups": [{"name": "g1", "hostnames": [f"celery@{uid}-*"], "heartbeat_timeout": "5s"}],
        "queues": [{"name": f"{uid}-q", "warning": 100}],
        "ha": {"lease": "off"},
    }
    cfg.update(top)
    return cfg


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def daemons():
    made: list[CliDaemon] = []
    yield made
    for d in made:
        d.kill()


def start(daemons, tmp: Path, cfg_path: Path, env: dict[str, str], name: str = "run") -> CliDaemon:
    d = CliDaemon("run", "-c", cfg_path, "--log-level", "DEBUG", log_dir=tmp, env=cli_env(env), name=name)
    daemons.append(d)
    return d


# ---------------------------------------------------------------- sd_notify
def test_notify_order_ready_watchdog_reload_stopping(tmp_path, redis_url, uid, daemons):
    cfg_path = write_config(tmp_path / "config.yaml", base_config(tmp_path, redis_url, uid))
    holder: dict = {}
    ns = NotifySocket(log_of=lambda: holder["d"].err if "d" in holder else "")
    try:
        d = holder["d"] = start(daemons, tmp_path, cfg_path,
                                {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": "30000000"})
        ready = ns.wait("READY=1")
        # READY=1 only after the first complete cycle: its log line was written before it arrived,
        # and nothing at all (no WATCHDOG=1, no STATUS=) came before it
        first = ns.messages[0]
        assert has(first[1], "READY=1"), ns.fields()
        assert "first cycle complete" in first[2], first[2]
        assert ready["STATUS"].startswith("cycle 1:"), ready
        ns.wait("WATCHDOG=1", 3)
        dogs = [f for f in ns.fields() if has(f, "WATCHDOG=1")]
        cycles = [int(re.match(r"cycle (\d+):", f["STATUS"]).group(1)) for f in dogs]
        assert cycles == sorted(cycles) and cycles[0] >= 2 and len(set(cycles)) == len(cycles), dogs

        before = len(ns.fields())
        d.signal(signal.SIGHUP)
        reloading = ns.wait("RELOADING=1")
        usec = int(reloading["MONOTONIC_USEC"])
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - usec < 60_000_000, (usec, now_usec)  # CLOCK_MONOTONIC, as systemd wants
        ns.wait("READY=1", 2)
        after = ns.fields()[before:]
        i_reloading = next(i for i, f in enumerate(after) if has(f, "RELOADING=1"))
        i_ready = next(i for i, f in enumerate(after) if has(f, "READY=1"))
        assert i_reloading < i_ready, after
        n_dogs = ns.count("WATCHDOG=1")
        ns.wait("WATCHDOG=1", n_dogs + 2)  # still cycling after the reload

        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, str(d)
        time.sleep(0.3)
        assert has(ns.fields()[-1], "STOPPING=1"), ns.fields()[-3:]
        assert ns.count("STOPPING=1") == 1 and ns.count("READY=1") == 2
        assert "Traceback" not in d.err, str(d)
    finally:
        ns.close()


def test_notify_abstract_socket_and_no_watchdog_without_watchdog_usec(tmp_path, redis_url, uid, daemons):
    cfg_path = write_config(tmp_path / "config.yaml", base_config(tmp_path, redis_url, uid))
    ns = NotifySocket(f"@celery-supervisor-test-{uid}-{os.getpid()}")
    try:
        # WATCHDOG_USEC is not set: systemd asked for no watchdog, so none is sent (only STATUS=)
        d = start(daemons, tmp_path, cfg_path, {"NOTIFY_SOCKET": ns.env_value}, )
        ns.wait("READY=1")
        wait_until(lambda: sum(has(f, "STATUS") for f in ns.fields()) >= 4, 30, what="status lines")
        assert ns.count("WATCHDOG=1") == 0, ns.fields()
        assert "cycle" in ns.fields()[-1]["STATUS"]
        d.signal(signal.SIGINT)
        assert d.wait(30) == 0, str(d)
        time.sleep(0.3)
        assert has(ns.fields()[-1], "STOPPING=1")
    finally:
        ns.close()


def test_watchdog_pid_for_another_process_means_no_watchdog(tmp_path, redis_url, uid, daemons):
    """WATCHDOG_PID names the process systemd watches: when it is not us, we send no WATCHDOG=1."""
    cfg_path = write_config(tmp_path / "config.yaml", base_config(tmp_path, redis_url, uid))
    ns = NotifySocket()
    try:
        d = start(daemons, tmp_path, cfg_path, {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": "30000000",
                                                "WATCHDOG_PID": "1"})
        ns.wait("READY=1")
        wait_until(lambda: len(ns.fields()) >= 3, 30, what="more status lines")
        assert ns.count("WATCHDOG=1") == 0
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
    finally:
        ns.close()


# ---------------------------------------------------------------- a failing cycle feeds no watchdog
def test_failing_cycles_send_no_watchdog_and_say_so(tmp_path, redis_url, uid, monkeypatch, caplog):
    """In-process: the Daemon's tick path with a real Supervisor whose tick raises three times
    (fault injection), between real cycles. No WATCHDOG=1 for them, an ERROR after 3 in a row."""
    import logging

    from supervisor.config import load_config
    from supervisor.daemon import Daemon

    cfg_path = write_config(tmp_path / "config.yaml", base_config(tmp_path, redis_url, uid))
    ns = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    d = Daemon(load_config(cfg_path), config_path=str(cfg_path))
    assert "NOTIFY_SOCKET" not in os.environ  # children (local workers, systemctl) do not inherit it
    real_tick = d.sup.tick
    fail = {"n": 0}

    def tick():
        if fail["n"]:
            fail["n"] -= 1
            raise RuntimeError("injected failure")
        return real_tick()

    d.sup.tick = tick
    d.sup.start()
    try:
        with caplog.at_level(logging.INFO, logger="supervisor"):
            d._tick()
            ns.wait("READY=1")
            fail["n"] = 3
            for _ in range(3):
                d._tick()
            wait_until(lambda: len(ns.fields()) >= 4, 10, what="status of the failed cycles")
            assert ns.count("WATCHDOG=1") == 0, ns.fields()
            assert all("cycle failed" in f["STATUS"] for f in ns.fields()[1:4]), ns.fields()
            loud = [r for r in caplog.records if r.levelno == logging.ERROR and "3 cycles in a row failed" in r.message]
            assert loud and "watchdog" in loud[0].message
            ok, reason = d.health()
            assert ok, reason  # the last completed cycle is recent and reached the broker
            assert "3 cycle(s) failed" in reason
            d._tick()
            ns.wait("WATCHDOG=1")
            assert any("cycles complete again after 3 failures" in r.message for r in caplog.records)
    finally:
        d.stop()
        ns.close()


# ---------------------------------------------------------------- SIGHUP
def test_sighup_with_a_broken_then_a_changed_config(tmp_path, redis_url, uid, daemons):
    port = free_port()
    base = base_config(tmp_path, redis_url, uid, http={"listen": f"127.0.0.1:{port}"})
    cfg_path = write_config(tmp_path / "config.yaml", base)
    ns = NotifySocket()
    try:
        d = start(daemons, tmp_path, cfg_path, {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": "30000000"})
        ns.wait("READY=1")
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200

        # 1. broken: two errors, each must be logged with its path; the old config keeps running
        broken = dict(base, loop={"interval": "fast", "state_path": base["loop"]["state_path"]})
        broken["groups"] = [dict(base["groups"][0], heartbeat_timeout="1s")]
        write_config(cfg_path, broken)
        d.signal(signal.SIGHUP)
        d.wait_output("still running with the previous config", 30)
        err = d.err
        assert re.search(r"ERROR .*reload: loop\.interval: ", err), err
        assert re.search(r"ERROR .*reload: groups\.0: .*heartbeat_timeout", err), err
        ns.wait("READY=1", 2)  # the reload is over (rejected): systemd is told so
        dogs = ns.count("WATCHDOG=1")
        ns.wait("WATCHDOG=1", dogs + 3)  # still cycling with the old config
        assert d.alive()
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert d.err.count("reload: now running") == 0

        # 2. valid and changed: a new group with an explicit worker, another interval
        changed = dict(base, loop={"interval": "2s", "state_path": base["loop"]["state_path"]})
        changed["groups"] = base["groups"] + [{"name": "g2", "workers": [f"celery@{uid}-explicit"],
                                               "heartbeat_timeout": "5s"}]
        write_config(cfg_path, changed)
        d.signal(signal.SIGHUP)
        d.wait_output("reload: now running with", 30)
        line = next(x for x in d.err.splitlines() if "reload: now running with" in x)
        assert "groups[g2] added" in line and "loop.interval: 1.0 -> 2.0" in line, line
        ns.wait("READY=1", 3)

        def g2_in_status():
            code, body = get(f"http://127.0.0.1:{port}/status")
            return code == 200 and any(w["group"] == "g2" and w["hostname"] == f"celery@{uid}-explicit"
                                       for w in __import__("json").loads(body)["workers"])

        wait_until(g2_in_status, 30, what="group g2 in /status")
        code, text = get(f"http://127.0.0.1:{port}/metrics")
        assert 'celery_supervisor_workers{group="g2",status="alive"}' in text
        # the new interval is the running supervisor's (WATCHDOG=1 counts no longer measure it: the
        # missing g2 worker's confirming pings wake the loop between regular ticks, supervisor/wake.py)
        code, body = get(f"http://127.0.0.1:{port}/status")
        assert code == 200 and __import__("json").loads(body)["loop_interval"] == 2.0, body
        n = ns.count("WATCHDOG=1")
        ns.wait("WATCHDOG=1", n + 2, timeout=60)  # and cycles go on after the reload

        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, str(d)
        assert "Traceback" not in d.err, str(d)
    finally:
        ns.close()


# ---------------------------------------------------------------- MemoryDenyWriteExecute
# prctl(PR_SET_MDWE = 65, PR_MDWE_REFUSE_EXEC_GAIN = 1), then exec the rest of the command line
MDWE_WRAPPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(97)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_the_daemon_runs_with_memory_deny_write_execute(tmp_path, redis_url, uid, daemons):
    """The unit sets MemoryDenyWriteExecute=yes. Linux >= 6.3 has the same rule as a prctl
    (PR_SET_MDWE, inherited across execve): run `supervisor run` under it, with HTTP, for real."""
    probe = subprocess.run([sys.executable, "-c", MDWE_WRAPPER, "-c",
                            "import mmap; m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | 4)"],
                           capture_output=True, text=True)
    if probe.returncode == 97:
        need(f"a kernel with PR_SET_MDWE (Linux >= 6.3; this one is {os.uname().release})")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, "MDWE must refuse W+X mappings"

    port = free_port()
    cfg_path = write_config(tmp_path / "config.yaml",
                            base_config(tmp_path, redis_url, uid, http={"listen": f"127.0.0.1:{port}"}))
    env = cli_env()
    proc = subprocess.Popen([sys.executable, "-c", MDWE_WRAPPER, "-m", "supervisor", "run", "-c", str(cfg_path)],
                            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}/healthz") or proc.poll() is not None, 60,
                   what="/healthz 200 under MDWE")
        assert proc.poll() is None, proc.communicate()[0]
        assert "celery_supervisor_cycles_total" in get(f"http://127.0.0.1:{port}/metrics")[1]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _ok(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


# ---------------------------------------------------------------- the shipped unit file
def _systemd_root(tmp: Path) -> Path:
    """A filesystem root for `systemd-analyze verify --root`: the system's own unit files (verify
    loads sysinit.target, basic.target, ...), /bin/kill (ExecReload) and a stand-in executable at
    the documented ExecStart path (verify only checks that it exists and is executable). The unit
    file itself is copied byte for byte."""
    root = tmp / "root"
    units = next((Path(p) for p in ("/usr/lib/systemd/system", "/lib/systemd/system") if Path(p).is_dir()), None)
    if units is None:
        need("systemd's unit files (/usr/lib/systemd/system)")
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    exe = root / "opt/celery-supervisor/bin/supervisor"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    dest = root / "etc/systemd/system" / UNIT.name
    dest.parent.mkdir(parents=True)
    shutil.copyfile(UNIT, dest)
    assert dest.read_bytes() == UNIT.read_bytes()
    return root


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        need("systemd-analyze (apt install systemd)")
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) run -c (\S+)$", text, re.M)
    assert exec_start and exec_start.groups() == ("/opt/celery-supervisor/bin/supervisor",
                                                  "/etc/celery-supervisor/config.yaml")
    root = _systemd_root(tmp_path)
    unit = root / "etc/systemd/system" / UNIT.name
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", str(unit)],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    ours = [line for line in out.splitlines() if UNIT.name in line or UNIT.stem in line]
    assert r.returncode == 0 and not ours, f"systemd-analyze verify (rc {r.returncode}):\n{out}"

    # the check is real: a typo and a missing binary are reported
    bad = root / "etc/systemd/system/celery-supervisor-bad.service"
    bad.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict")
                   .replace("/opt/celery-supervisor/bin/supervisor", "/opt/nowhere/supervisor"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ProtectSytem" in r.stderr and "/opt/nowhere" in r.stderr, r.stderr


def test_unit_file_security_exposure(tmp_path):
    if not shutil.which("systemd-analyze"):
        need("systemd-analyze (apt install systemd)")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--threshold={int(EXPOSURE_MAX * 10)}",
                        str(UNIT)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    assert exposure <= EXPOSURE_MAX, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"systemd-analyze security: exposure {exposure}")
    # the directives the design relies on are there (the score alone would not show a lost one)
    text = UNIT.read_text()
    for directive in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                      "Restart=on-failure", "StateDirectory=celery-supervisor", "User=celery-supervisor",
                      "KillMode=process", "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet=\n",
                      "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert directive in text, directive
