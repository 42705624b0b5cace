"""The local platform against real Celery workers (private Redis), really killed. No mocks.

Process checks here read /proc on their own (not through the adapter's scanner), so the adapter is
judged by an independent count: "processes carrying the marker whose parent does not".
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from platforms.local import MARKER, Adapter, target_id
from supervisor.config import parse_config
from tests.support.workers import APP_DIR, Worker, wait_ping, worker_command, worker_env

pytestmark = pytest.mark.redis
PY = shlex.quote(sys.executable)


# ---------------------------------------------------------------- independent /proc helpers
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) or None when the process does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    f = data[data.rfind(b")") + 2 :].split()
    return f[0].decode(), int(f[1]), int(f[19])


def _marker(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{MARKER}=".encode()
    for item in env:
        if item.startswith(prefix):
            return item[len(prefix) :].decode()
    return None


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _live(pid: int, start: int | None = None) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[2] == start)


def marked(prefix: str) -> list[int]:
    """Live processes whose marker starts with `prefix`."""
    return [p for p in _pids() if _live(p) and (_marker(p) or "").startswith(prefix)]


def copies(tid: str) -> list[int]:
    """Live processes carrying the target's marker whose parent does not: copies of the worker."""
    out = []
    for p in _pids():
        st = _stat(p)
        if st and st[0] not in ("Z", "X") and _marker(p) == tid and _marker(st[1]) != tid:
            out.append(p)
    return out


def children(pid: int) -> list[tuple[int, int]]:
    out = []
    for p in _pids():
        st = _stat(p)
        if st and st[1] == pid and st[0] not in ("Z", "X"):
            out.append((p, st[2]))
    return out


def wait_for(cond, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 10
    while any(_live(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def env(redis_url, uid, tmp_path, request):
    """Builds adapters on a private Redis db; kills every process they (or the test) started."""
    made: list[Adapter] = []
    workers: list[Worker] = []
    spawned: list[subprocess.Popen] = []
    group = f"g{uid}"

    class Env:
        url = redis_url
        name = group
        state = tmp_path / "state.db"

        def host(self, n: str = "w1") -> str:
            return f"celery@{uid}-{n}"

        def adapter(self, template: str | None = None, stop_timeout: str = "10s", extra_env=None,
                    cwd: str | None = str(APP_DIR), run_dir: Path | None = None, workers=None):
            restart = {"platform": "local", "target": template or worker_command(), "stop_timeout": stop_timeout,
                       "env": {"CELERY_BROKER_URL": redis_url, "PYTHONPATH": str(APP_DIR), **(extra_env or {})}}
            if cwd is not None:
                restart["cwd"] = cwd
            data = {"broker": {"url": redis_url}, "loop": {"state_path": str(self.state)},
                    "groups": [{"name": group, "hostnames": [f"celery@{uid}-*"], "workers": workers or [],
                                "restart": restart}]}
            if run_dir is not None:
                data["platforms"] = {"local": {"run_dir": str(run_dir)}}
            cfg = parse_config(data, env={})
            a = Adapter(cfg)
            made.append(a)
            return a, cfg.groups[0]

        def hand_worker(self, hostname: str, **kw) -> Worker:
            w = Worker(redis_url, hostname, **kw)
            workers.append(w)
            return w

        def spawn(self, argv: list[str]) -> subprocess.Popen:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            spawned.append(p)
            return p

        @staticmethod
        def pidfile(a: Adapter, tid: str) -> dict:
            return json.loads((a.run_dir / f"{tid}.pid").read_text())

    yield Env()
    _kill_all(marked(f"{group}.") + [w.pid for w in workers] + [p.pid for p in spawned])
    for w in workers:
        w.stop()
    for p in spawned:
        p.wait(10)
    for a in made:
        a.close()



def state_of(a: Adapter, group, hostname: str):
    return next(t for t in a.inventory(group, [hostname]) if t.hostname == hostname)


# ---------------------------------------------------------------- no processes
def test_target_for_is_stable_and_filesystem_safe(env):
    a, g = env.adapter()
    t = a.target_for(g, "celery@w1")
    assert (t.group, t.hostname, t.state) == (g.name, "celery@w1", "unknown")
    assert t == a.target_for(g, "celery@w1")
    assert target_id("default", "celery@w1") == "default.celery@w1"
    odd = target_id("a b", "celery@x/../y")
    assert "/" not in odd and " " not in odd and not odd.startswith(".")
    assert odd != target_id("a_b", "celery@x_.._y")
    # a group name holding a dot cannot collide with another (group, hostname) pair
    assert target_id("a.b", "c@d") != target_id("a", "b.c@d")


def test_describe_shows_the_command_and_hides_secrets(env):
    a, g = env.adapter(
        template=worker_command() + " --broker redis://:pw-in-argv-123@db/0",
        extra_env={"API_TOKEN": "tok-abc-123456", "MODE": "demo"},
    )
    text = a.describe(a.target_for(g, env.host()))
    assert text.startswith(f"cd {APP_DIR} && ")
    assert "MODE=demo" in text and f"-n {env.host()}" in text and "-m celery -A tasks worker" in text
    assert "CELERY_BROKER_URL=****" in text and "API_TOKEN=****" in text
    assert "tok-abc-123456" not in text and "pw-in-argv-123" not in text and env.url not in text


def test_run_dir_defaults_next_to_the_state_file(env, tmp_path):
    a, _ = env.adapter()
    assert a.run_dir == tmp_path / "supervisor-local"
    b, _ = env.adapter(run_dir=tmp_path / "elsewhere")
    assert b.run_dir == tmp_path / "elsewhere"
    # explicit workers are listed even when nothing ever ran (and the run dir does not exist yet)
    c, g = env.adapter(workers=[env.host("w9")], run_dir=tmp_path / "never")
    # never started here: the platform cannot tell whether it died, so the core judges it by heartbeat + ping
    assert [(t.hostname, t.state) for t in c.inventory(g)] == [(env.host("w9"), "unknown")]
    assert not (tmp_path / "never").exists()


def test_logs_reads_only_the_tail_of_a_big_file(env):
    a, g = env.adapter()
    t = a.target_for(g, env.host())
    a.run_dir.mkdir(parents=True)
    with open(a.run_dir / f"{t.id}.log", "w") as f:
        for i in range(200_000):  # ~3 MB
            f.write(f"line {i} {'x' * 8}\n")
    assert a.logs(t, 3).splitlines() == [f"line {i} {'x' * 8}" for i in (199_997, 199_998, 199_999)]
    assert a.logs(a.target_for(g, env.host("none")), 10) == ""


# ---------------------------------------------------------------- failures to start
def test_bad_command_and_bad_cwd_fail_clearly_and_stop_nothing(env):
    sleeper = f"{PY} -c 'import time; time.sleep(60)' {{hostname}}"
    good, g = env.adapter(template=sleeper)
    t = good.target_for(g, env.host())
    assert good.restart(t, "test").ok
    pid = env.pidfile(good, t.id)["pid"]

    bad, g2 = env.adapter(template="no-such-program-xyz -n {hostname}")
    res = bad.restart(bad.target_for(g2, env.host()), "test")
    assert not res.ok and "no-such-program-xyz" in res.message and "not found" in res.message
    assert "nothing was stopped" in res.message

    nowhere, g3 = env.adapter(template=sleeper, cwd="/nonexistent/dir")
    res = nowhere.restart(nowhere.target_for(g3, env.host()), "test")
    assert not res.ok and "/nonexistent/dir" in res.message
    assert _live(pid), "a restart that cannot start must not stop the running copy"
    assert copies(t.id) == [pid]

    # nothing ever ran for this hostname
    other = state_of(bad, g2, env.host("other"))
    assert other.state == "unknown"  # never started: nothing was started by the failed restart


def test_crashing_command_reports_exit_code_and_output(env):
    crash = f"{PY} -c \"import sys; print('crash-out {{hostname}}', file=sys.stderr); sys.exit(3)\""
    a, g = env.adapter(template=crash)
    t = a.target_for(g, env.host())
    res = a.restart(t, "test")
    if not res.ok:  # died within the early-exit window (the usual case)
        assert "exit code 3" in res.message and f"crash-out {env.host()}" in res.message
    seen = wait_for(lambda: (s := state_of(a, g, env.host())).state == "exited" and s, what="exited")
    assert seen.detail == "exit code 3" and seen.since is not None
    assert f"crash-out {env.host()}" in a.logs(t)
    assert (a.run_dir / f"{t.id}.log").exists() and a.run_dir == env.state.parent / "supervisor-local"


def test_stale_pid_file_with_reused_pid_is_not_the_worker(env):
    """A pid file whose pid now belongs to another process (start time differs) is not running,
    and a restart does not touch that process."""
    a, g = env.adapter(template=f"{PY} -c 'import time; time.sleep(60)' {{hostname}}")
    h = env.host()
    t = a.target_for(g, h)
    other = env.spawn(["sleep", "61"])
    wait_for(lambda: _live(other.pid), what="sleep")
    a.run_dir.mkdir(parents=True)
    real_start = _stat(other.pid)[2]
    # the pid file's process started 100 s before the one that now has its pid
    record = {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 100, "hostname": h,
              "group": g.name}
    (a.run_dir / f"{t.id}.pid").write_text(json.dumps(record))
    seen = state_of(a, g, h)
    assert seen.state == "exited" and "not running" in seen.detail
    # the pid file brings the hostname into the inventory even when nobody mentions it
    assert [x.hostname for x in a.inventory(g)] == [h]
    assert a.restart(t, "test").ok
    assert _live(other.pid, real_start)
    assert state_of(a, g, h).state == "running"


def test_concurrent_restarts_do_not_interleave_and_sigterm_ignored_gets_sigkill(env):
    stubborn = (f"{PY} -c \"import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"print('ready', file=sys.stderr); time.sleep(60)\" {{hostname}}")
    a, g = env.adapter(template=stubborn, stop_timeout="1s")
    other, _ = env.adapter(template=stubborn, stop_timeout="1s")  # a second supervisor process
    t = a.target_for(g, env.host())
    assert a.restart(t, "first").ok
    old = env.pidfile(a, t.id)["pid"]
    wait_for(lambda: "ready" in a.logs(t), what="SIGTERM ignored")
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", a.restart(t, "second")))
    th.start()
    try:
        wait_for(lambda: state_of(a, g, env.host()).state == "restarting", what="restart in progress")
        same = a.restart(t, "third")
        assert same.ok and same.in_progress
        twin = other.restart(other.target_for(g, env.host()), "from another supervisor")
        assert twin.ok and twin.in_progress
    finally:
        th.join(30)
    res = out["r"]
    assert res.ok and "SIGKILL" in res.message, res.message
    assert not _live(old)
    new = env.pidfile(a, t.id)["pid"]
    assert new != old and copies(t.id) == [new]


# ---------------------------------------------------------------- real Celery workers
def test_start_kill_and_bring_back(env, app):
    a, g = env.adapter(extra_env={"API_TOKEN": "tok-zzz-987654"})
    h = env.host()
    t = a.target_for(g, h)
    t0 = time.monotonic()
    res = a.restart(t, "test: start from nothing")
    took = time.monotonic() - t0
    assert res.ok, res.message
    ping = wait_ping(app, h)
    first = env.pidfile(a, t.id)
    assert copies(t.id) == [first["pid"]]
    assert abs(first["create_time"] - psutil.Process(first["pid"]).create_time()) < 0.05
    seen = state_of(a, g, h)
    assert (seen.state, seen.hostname, seen.id) == ("running", h, t.id) and str(first["pid"]) in seen.detail

    os.kill(first["pid"], signal.SIGKILL)
    t1 = time.monotonic()
    seen = wait_for(lambda: (s := state_of(a, g, h)).state != "running" and s, what="not running")
    noticed = time.monotonic() - t1
    assert seen.state == "exited" and seen.detail == "killed by SIGKILL" and seen.since is not None

    t2 = time.monotonic()
    res = a.restart(t, "test: lost")
    assert res.ok, res.message
    wait_ping(app, h)
    total = time.monotonic() - t2
    second = env.pidfile(a, t.id)["pid"]
    assert second != first["pid"] and copies(t.id) == [second]
    assert state_of(a, g, h).state == "running"
    log = a.logs(t, 200)
    assert h in log and "[queues]" in log  # the worker's own banner
    assert "tok-zzz-987654" not in a.describe(t)
    print(f"\n[timings] restart call {took:.2f}s, start->ping {ping:.2f}s, SIGKILL->inventory exited "
          f"{noticed * 1000:.0f}ms, restart->ping {total:.2f}s")


def test_restart_of_a_running_worker_leaves_exactly_one(env, app):
    a, g = env.adapter()
    h = env.host()
    t = a.target_for(g, h)
    assert a.restart(t, "test").ok
    wait_ping(app, h)
    old = env.pidfile(a, t.id)["pid"]
    t0 = time.monotonic()
    res = a.restart(t, "test: again")
    took = time.monotonic() - t0
    assert res.ok and "SIGTERM" in res.message, res.message
    assert not _live(old)
    new = env.pidfile(a, t.id)["pid"]
    assert copies(t.id) == [new]
    wait_ping(app, h)
    print(f"\n[timings] restart of a running solo worker: {took:.2f}s")


def test_worker_started_by_hand_is_adopted_then_replaced(env, app):
    a, g = env.adapter()
    h = env.host()
    t = a.target_for(g, h)
    hand = env.hand_worker(h)
    wait_ping(app, h)
    seen = state_of(a, g, h)
    assert seen.state == "running" and str(hand.pid) in seen.detail
    res = a.restart(t, "test")
    assert res.ok and str(hand.pid) in res.message, res.message
    assert not _live(hand.pid)
    new = env.pidfile(a, t.id)["pid"]
    assert copies(t.id) == [new]
    wait_ping(app, h)


def test_worker_started_by_hand_through_the_celery_script_is_found(env, app, redis_url):
    """The kernel shows a console-script worker as `python .../bin/celery ... -n HOST`: not the
    rendered argv. It must still be found by its Celery hostname, never doubled."""
    a, g = env.adapter()
    h = env.host()
    t = a.target_for(g, h)
    script = os.path.join(os.path.dirname(sys.executable), "celery")
    assert os.path.exists(script), script
    p = subprocess.Popen([script, "-A", "tasks", "worker", "-n", h, "--pool", "solo", "-Q", f"{h}-q",
                          "--without-mingle", "--without-gossip", "-l", "WARNING"],
                         cwd=str(APP_DIR), env=worker_env(redis_url), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ping(app, h)
        seen = state_of(a, g, h)
        assert seen.state == "running" and str(p.pid) in seen.detail, seen
        res = a.restart(t, "test")
        assert res.ok and str(p.pid) in res.message, res.message
        assert p.wait(10) is not None  # the hand-started copy was stopped before the new one started
        assert copies(t.id) == [env.pidfile(a, t.id)["pid"]]
        wait_ping(app, h)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)


def test_prefork_pool_children_go_with_their_worker(env, app):
    template = worker_command(pool="prefork").replace("--concurrency 1", "--concurrency 2")
    a, g = env.adapter(template=template)
    h = env.host()
    t = a.target_for(g, h)
    assert a.restart(t, "test").ok
    wait_ping(app, h)
    old = env.pidfile(a, t.id)["pid"]
    kids = wait_for(lambda: len(c := children(old)) >= 2 and c, what="2 pool processes")
    assert all(_marker(k) == t.id for k, _ in kids)  # inherited, and not counted as copies
    assert copies(t.id) == [old]
    res = a.restart(t, "test")
    assert res.ok, res.message
    assert not _live(old) and not any(_live(k, s) for k, s in kids)
    new = env.pidfile(a, t.id)["pid"]
    assert copies(t.id) == [new]
    wait_ping(app, h)


def test_warm_shutdown_in_a_long_task_is_waited_for_then_killed(env, app, redis_url):
    import redis

    a, g = env.adapter(stop_timeout="2s")
    h = env.host()
    t = a.target_for(g, h)
    assert a.restart(t, "test").ok
    wait_ping(app, h)
    old = env.pidfile(a, t.id)["pid"]
    app.send_task("tasks.sleep", args=(120,), queue="celery")
    r = redis.Redis.from_url(redis_url)
    wait_for(lambda: r.llen("celery") == 0, what="the task taken")
    time.sleep(0.3)
    os.kill(old, signal.SIGTERM)  # warm shutdown: the solo worker finishes its task first
    time.sleep(0.5)
    assert _live(old)

    most, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            most[0] = max(most[0], len(copies(t.id)))
            time.sleep(0.01)

    w = threading.Thread(target=watch)
    w.start()
    try:
        t0 = time.monotonic()
        res = a.restart(t, "test: hung")
        took = time.monotonic() - t0
    finally:
        stop.set()
        w.join()
    assert res.ok and "SIGKILL" in res.message, res.message
    assert took >= 2.0 * 0.9, "the restart must wait out stop_timeout before killing"
    assert most[0] == 1, "two copies of the worker ran at once"
    assert not _live(old)
    assert copies(t.id) == [env.pidfile(a, t.id)["pid"]]
    wait_ping(app, h)
    print(f"\n[timings] restart with a warm-shutdown worker (stop_timeout 2s): {took:.2f}s")
