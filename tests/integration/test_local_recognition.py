"""The local platform recognises a worker however it was started: setproctitle titles, the
`celery` console script without -n, `python -m celery`; never two copies of one worker.

Real workers on a private Redis, `supervisor run` as a subprocess (its /status read over HTTP),
real SIGKILLs. setproctitle is installed for these workers only (pip --target into a cache folder,
prepended to their PYTHONPATH): the test venv stays without it. Processes are counted here on their
own (psutil, not the adapter's code): "celery worker main processes serving this hostname".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from platforms.local import Adapter
from supervisor.config import parse_config
from tests.support.brokers import free_port, need
from tests.support.fleet import Fleet, local_restart, wait_until
from tests.support.workers import APP_DIR, celery_app, wait_ping

pytestmark = pytest.mark.redis
CACHE = Path.home() / ".cache" / "celery-supervisor-tests"
CELERY_SCRIPT = os.path.join(os.path.dirname(sys.executable), "celery")


# ---------------------------------------------------------------- setproctitle, for the workers only
def setproctitle_dir() -> Path:
    """setproctitle installed with pip --target into a cache folder once (reused when present)."""
    where = CACHE / f"setproctitle-py{sys.version_info[0]}{sys.version_info[1]}"
    if (where / ".complete").exists():
        return where
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{where.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be installing it right now
        if (where / ".complete").exists():
            return where
        tmp = tempfile.mkdtemp(prefix=f".{where.name}-", dir=CACHE)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--target", tmp, "setproctitle"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            need(f"setproctitle for the workers (pip install --target failed: {r.stderr.strip()[-300:]})")
        shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
        (where / ".complete").touch()
    return where


@pytest.fixture(scope="session")
def spt() -> Path:
    return setproctitle_dir()


# ---------------------------------------------------------------- independent process counts
def serving(hostname: str, app: str | None = None) -> list[int]:
    """Live celery worker main processes serving `hostname`: a setproctitle title naming it as
    MainProcess, a `worker` command line with `-n hostname`, or (with `app`) a `worker` command
    line of that -A app without -n (Celery's default hostname). A process whose parent also
    matches (a prefork child before setproctitle renames it) is not counted."""
    found: dict[int, int] = {}
    for p in psutil.process_iter(["ppid", "cmdline", "status"]):
        info = p.info
        argv = [a for a in (info["cmdline"] or []) if a]
        if info["status"] == psutil.STATUS_ZOMBIE or not argv:
            continue
        text = " ".join(argv)
        if text.startswith("[celeryd:"):
            hit = text.startswith(f"[celeryd: {hostname}:MainProcess]")
        elif "worker" in argv:
            hit = any(argv[i] == "-n" and argv[i + 1] == hostname for i in range(len(argv) - 1))
            hit = hit or (app is not None and "-n" not in argv and f"-A {app} " in text)
        else:
            hit = False
        if hit:
            found[p.pid] = info["ppid"]
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


class Watch:
    """Counts `serving(...)` every 20 ms in a thread: the most copies ever seen at once."""

    def __init__(self, hostname: str, app: str | None = None):
        self.most = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(hostname, app), daemon=True)
        self._t.start()

    def _run(self, hostname, app):
        while not self._stop.is_set():
            now = serving(hostname, app)
            self.most = max(self.most, len(now))
            self.pids |= set(now)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def status(port: int) -> dict:
    """The running supervisor's /status ({} while it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


def worker_row(doc: dict, hostname: str) -> dict | None:
    return next((w for w in doc.get("workers") or [] if w["hostname"] == hostname), None)


@pytest.fixture
def hand(tmp_path):
    """Workers started by hand (not through the adapter); each is killed with its group at the end."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], env: dict[str, str], cwd: Path = APP_DIR) -> subprocess.Popen:
        log = open(tmp_path / f"hand-{len(started)}.log", "ab")  # noqa: SIM115 (the child holds it)
        p = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        started.append(p)
        return p

    yield start
    for p in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def worker_env(broker_url: str, *paths: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPT_NOENV", "CELERY_SUPERVISOR_TARGET")}
    env["CELERY_BROKER_URL"] = broker_url
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(APP_DIR)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def titled(pid: int, hostname: str, timeout: float = 30) -> None:
    """Wait until setproctitle rewrote the worker's command line into its title."""
    def done():
        with contextlib.suppress(psutil.Error):
            return " ".join(psutil.Process(pid).cmdline()).startswith(f"[celeryd: {hostname}:MainProcess]")
        return False
    wait_until(done, timeout, what=f"the setproctitle title of {hostname}")


def fleet(tmp_path, redis_url, hosts, queue, port, catcher=None, pool="solo", **restart) -> Fleet:
    cfg = {
        "broker": {"url": redis_url},
        "loop": {"interval": "1s", "ping_timeout": "500ms"},
        "groups": [{"name": "g", "workers": hosts, "heartbeat_timeout": "3s",
                    "hung_timeout": restart.pop("hung_timeout", "10m"),
                    "restart": local_restart(redis_url, pool=pool, queues=queue, **restart)}],
        "http": {"listen": f"127.0.0.1:{port}"},
        "ha": {"lease": "off"},
    }
    if catcher is not None:
        cfg["notify"] = {"channels": [{"name": "t", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                                       "severities": ["warning", "critical"]}], "retry": ["200ms"]}
    return Fleet(tmp_path, cfg)


def titles(catcher) -> list[str]:
    return [r.json["title"] for r in catcher.received() if r.json]


# ---------------------------------------------------------------- what command lines and titles say
def test_command_lines_and_titles_name_the_hostname_celery_would_use():
    import socket

    from platforms.local_procs import title_of, worker_of

    host = socket.gethostname()
    name, _, domain = host.partition(".")
    py = sys.executable
    cases = {
        (py, CELERY_SCRIPT, "-A", "proj", "worker"): f"celery@{host}",  # console script, no -n
        (CELERY_SCRIPT, "-A", "proj", "worker", "-l", "INFO"): f"celery@{host}",
        (py, "-m", "celery", "-A", "proj", "worker", "-n", "w1@%h"): f"w1@{host}",
        (py, "-u", "-W", "ignore", "-m", "celery", "--app=proj", "worker", "--hostname=w2@%n.x"): f"w2@{name}.x",
        ("python3", "-mcelery", "worker", "-A", "proj", "-nfoo"): "celery@foo",  # name alone: celery@name
        ("celery", "-A", "proj", "worker", "-n", "w@%d"): f"w@{domain}",
    }
    for argv, want in cases.items():
        got = worker_of(argv)
        assert got is not None and got.main and got.hostname == want and got.app == "proj", (argv, got)
    for argv in [(py, "-m", "celery", "-A", "proj", "beat"), (py, "-c", "import celery", "worker"),
                 ("/usr/bin/celery-exporter", "worker"), (py, "manage.py", "celery", "worker"),
                 (py, CELERY_SCRIPT, "-A", "proj", "inspect", "ping", "-d", "worker")]:
        assert worker_of(argv) is None, argv
    # celery's own -n fallback: the environment variable its click option reads
    assert worker_of((CELERY_SCRIPT, "-A", "p", "worker"), lambda: "env@%h").hostname == f"env@{host}"

    main = title_of("[celeryd: celery@x-1:MainProcess] -active- (-A proj worker --pool solo)")
    assert (main.main, main.hostname, main.app) == (True, "celery@x-1", "proj")
    child = title_of("[celeryd: celery@x-1:ForkPoolWorker-2]")
    assert (child.celery, child.main, child.hostname) == (True, False, "celery@x-1")
    cut = title_of("[celeryd: celery@a-very-long-hostn")  # cut to the length of the original argv
    assert cut.celery and cut.hostname is None and not cut.main
    assert title_of("[celeryd: celery@x:MainProcess] -active- (-A tas").app is None  # a cut word is not an app
    assert title_of("python -m celery worker") is None


# ---------------------------------------------------------------- setproctitle, solo, busy
def test_busy_setproctitle_solo_worker_waits_for_hung_timeout_and_is_never_doubled(
        spt, redis_url, tmp_path, uid, catcher, fleets, hand):
    """Finding 1: a solo worker (setproctitle active, started by hand) busy in a long task is
    unresponsive (or busy), not lost; it is restarted only after hung_timeout, its old process
    stopped before the new one starts: one process serves the hostname at any time."""
    host, queue, port, hung = f"celery@{uid}-spt", f"{uid}-q", free_port(), 16.0
    f = fleet(tmp_path, redis_url, [host], queue, port, catcher, hung_timeout=f"{hung:g}s", stop_timeout="2s")
    fleets.append(f)
    w = hand([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", host, "-Q", queue, "--pool", "solo",
              "--without-mingle", "--without-gossip", "-l", "WARNING"], worker_env(redis_url, spt))
    app = celery_app(redis_url)
    wait_ping(app, host)
    titled(w.pid, host)
    assert serving(host) == [w.pid]
    f.run()
    before = wait_until(lambda: (r := worker_row(status(port), host)) and r["status"] == "alive" and r, 60,
                        interval=0.5, what="the worker alive")
    watch = Watch(host)
    try:
        app.send_task("tasks.sleep", args=[300], queue=queue)
        t_task = time.monotonic()
        seen: list[tuple[float, str, str | None]] = []
        new = None
        while time.monotonic() - t_task < hung + 60:
            r = worker_row(status(port), host)
            if r is not None:
                seen.append((time.monotonic() - t_task, r["status"], r.get("platform_state")))
            now = serving(host)
            if now and now != [w.pid]:
                new = now
                break
            time.sleep(0.3)
        restarted_at = time.monotonic() - t_task
        assert new is not None, f"never restarted; statuses: {seen[-5:]}"
        wait_ping(app, host, 60)
    finally:
        watch.stop()
    statuses = {s for _, s, _ in seen}
    assert watch.most == 1, f"{watch.most} processes served {host} at once ({sorted(watch.pids)}); {seen}"
    assert not statuses & {"lost", "dead"}, seen
    assert before.get("platform_state") == "running", before  # the local platform recognised it
    assert statuses & {"unresponsive", "busy"}, seen
    assert all(ps == "running" for _, _, ps in seen if ps is not None), seen
    # silent from the task's start (its last heartbeat came at most 2 s before): hung_timeout first
    assert restarted_at >= hung - 3, f"restarted {restarted_at:.1f}s into the task (hung_timeout {hung:g}s)"
    assert w.wait(10) is not None, "the old copy still runs"
    assert serving(host) == new and len(new) == 1
    assert f.starts(host) == 1, "restarted exactly once"
    assert not any("worker_lost" in t for t in titles(catcher)), titles(catcher)
    print(f"\n[timings] busy setproctitle solo worker restarted {restarted_at:.1f}s into its task "
          f"(hung_timeout {hung:g}s)")


# ---------------------------------------------------------------- setproctitle, prefork, SIGKILL
def test_sigkilled_setproctitle_prefork_worker_is_seen_dead_and_restarted_once(
        spt, redis_url, tmp_path, uid, catcher, fleets, hand):
    """A prefork worker (setproctitle active, started by hand): recognised as running by the local
    platform, which therefore sees its SIGKILL as a death (not a silence); one restart, one copy."""
    host, queue, port = f"celery@{uid}-pre", f"{uid}-q", free_port()
    f = fleet(tmp_path, redis_url, [host], queue, port, catcher, pool="prefork", stop_timeout="2s")
    fleets.append(f)
    w = hand([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", host, "-Q", queue, "--pool", "prefork",
              "--concurrency", "2", "--without-mingle", "--without-gossip", "-l", "WARNING"],
             worker_env(redis_url, spt))
    app = celery_app(redis_url)
    wait_ping(app, host)
    titled(w.pid, host)
    kids = wait_until(lambda: len(c := psutil.Process(w.pid).children()) >= 2 and c, 30, what="2 pool processes")
    assert all(" ".join(k.cmdline()).startswith(f"[celeryd: {host}:ForkPoolWorker") for k in kids)
    assert serving(host) == [w.pid]  # the pool children are not copies
    f.run()
    before = wait_until(lambda: (r := worker_row(status(port), host)) and r["status"] == "alive" and r, 60,
                        interval=0.5, what="the worker alive")
    watch = Watch(host)
    try:
        os.kill(w.pid, signal.SIGKILL)
        t0 = time.monotonic()
        new = wait_until(lambda: (s := serving(host)) and s != [w.pid] and s, 60, interval=0.05, what="the restart")
        restart = time.monotonic() - t0
        wait_ping(app, host, 60)
        ping = time.monotonic() - t0
        wait_until(lambda: any("RESOLVED" in t and host in t for t in titles(catcher)), 30, what="resolved")
        time.sleep(3)  # nothing else happens
    finally:
        watch.stop()
    assert watch.most == 1, sorted(watch.pids)
    assert serving(host) == new and len(new) == 1
    assert f.starts(host) == 1
    assert before.get("platform_state") == "running", before  # the local platform recognised it
    fired = [r.json for r in catcher.received() if r.json and r.json["title"].startswith("[FIRING")]
    assert len(fired) == 1 and "worker_lost" in fired[0]["title"], titles(catcher)
    # the platform saw the process die: no waiting for heartbeat_timeout and a ping
    assert "reports" in fired[0]["message"] and "exited" in fired[0]["message"], fired[0]["message"]
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
    print(f"\n[timings] setproctitle prefork worker: SIGKILL -> restart {restart:.2f}s, -> ping {ping:.2f}s")


# ---------------------------------------------------------------- the console script, no -n
def test_console_script_worker_without_n_is_recognised_and_stopped_before_its_replacement(
        redis_url, tmp_path, uid, hand):
    """Finding 1: `.venv/bin/celery -A APP worker` without -n serves celery@<this host>. The local
    platform finds it running, and a restart stops it before the new one starts."""
    import socket

    assert os.path.exists(CELERY_SCRIPT), CELERY_SCRIPT
    # an app module of this test's own: other runs on this machine also serve celery@<host>, with
    # other apps; the adapter leaves workers of another -A app alone
    mod = f"app_{uid}"
    (tmp_path / f"{mod}.py").write_text("from tasks import app  # noqa: F401\n")
    host = f"celery@{socket.gethostname()}"
    queue = f"{uid}-q"
    template = (f"{CELERY_SCRIPT} -A {mod} worker -Q {queue} --pool solo --without-mingle --without-gossip "
                "-l WARNING")
    cfg = parse_config({"broker": {"url": redis_url}, "loop": {"state_path": str(tmp_path / "state.db")},
                        "groups": [{"name": "g", "workers": [host], "restart": {
                            "platform": "local", "target": template, "cwd": str(tmp_path), "stop_timeout": "5s",
                            "env": {"CELERY_BROKER_URL": redis_url,
                                    "PYTHONPATH": f"{tmp_path}{os.pathsep}{APP_DIR}"}}}]}, env={})
    a = Adapter(cfg)
    g = cfg.groups[0]
    env = worker_env(redis_url, tmp_path)
    w = hand([CELERY_SCRIPT, "-A", mod, "worker", "-Q", queue, "--pool", "solo", "--without-mingle",
              "--without-gossip", "-l", "WARNING"], env, cwd=tmp_path)
    app = celery_app(redis_url)
    try:
        wait_ping(app, host)
        assert serving(host, mod) == [w.pid]
        t = next(t for t in a.inventory(g, [host]) if t.hostname == host)
        assert t.state == "running" and str(w.pid) in t.detail, t
        watch = Watch(host, mod)
        try:
            res = a.restart(t, "test")
        finally:
            watch.stop()
        assert res.ok and str(w.pid) in res.message and "SIGTERM" in res.message, res.message
        assert w.poll() is not None, "the hand-started copy still runs"
        assert watch.most == 1, sorted(watch.pids)
        new = serving(host, mod)
        assert len(new) == 1 and new[0] != w.pid
        wait_ping(app, host)
        assert next(t for t in a.inventory(g, [host]) if t.hostname == host).state == "running"
    finally:
        with contextlib.suppress(Exception):
            a.stop(a.target_for(g, host), timeout=2)
        a.close()
        app.close()


# ---------------------------------------------------------------- cannot tell: no restart, and why
def test_heartbeat_pid_that_cannot_be_verified_is_neither_stopped_nor_doubled(redis_url, tmp_path, uid, hand):
    """A worker started from a script of its own (`python run.py`: no celery command line, no title):
    only its heartbeats' pid says which process it is. The local platform takes it as running, and a
    restart neither stops it nor starts a second copy, and says why."""
    from supervisor.model import WorkerSeen

    host, queue = f"celery@{uid}-script", f"{uid}-q"
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom tasks import app\n"
                      "app.worker_main(['worker', '-n', sys.argv[1], '-Q', sys.argv[2], '--pool', 'solo',"
                      " '--without-mingle', '--without-gossip', '-l', 'WARNING'])\n")
    w = hand([sys.executable, str(script), host, queue], worker_env(redis_url))
    app = celery_app(redis_url)
    cfg = parse_config({"broker": {"url": redis_url}, "loop": {"state_path": str(tmp_path / "state.db")},
                        "groups": [{"name": "g", "workers": [host], "restart": local_restart(
                            redis_url, queues=queue, stop_timeout="2s")}]}, env={})
    a = Adapter(cfg)
    g = cfg.groups[0]
    try:
        wait_ping(app, host)
        t = next(t for t in a.inventory(g, [host]) if t.hostname == host)
        assert t.state == "unknown", t  # nothing says which process it is
        heard = time.time()
        seen = {host: WorkerSeen(hostname=host, last_heartbeat=heard, pid=w.pid)}
        t = next(t for t in a.inventory(g, [host], seen=seen) if t.hostname == host)
        assert t.state == "running" and str(w.pid) in t.detail and "taken as running" in t.detail, t
        res = a.restart(t, "test")
        assert not res.ok and str(w.pid) in res.message and "cannot tell" in res.message, res.message
        assert w.poll() is None and serving(host) == [] and not (a.run_dir / f"{t.id}.pid").exists()
        wait_ping(app, host)
        # a heartbeat heard before that process started names another process (its pid was reused)
        b = Adapter(cfg)
        old = {host: WorkerSeen(hostname=host, last_heartbeat=psutil.Process(w.pid).create_time() - 5, pid=w.pid)}
        assert next(t for t in b.inventory(g, [host], seen=old) if t.hostname == host).state == "unknown"
        b.close()
    finally:
        a.close()
        app.close()
