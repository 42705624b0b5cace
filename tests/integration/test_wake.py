"""Wake on events, not only on the clock (issue 13), end to end: `supervisor run` with a long
loop.interval (30 s) and real workers really killed.

- a SIGKILLed local worker is restarted long before the next tick would come (its exit, seen
  through a pidfd, wakes the loop);
- an alert-only group's SIGKILLed worker is paged at about heartbeat_timeout (its heartbeat
  deadline wakes the loop, the confirming ping's completion wakes it again), not at the next tick;
- `once` on a healthy fleet says every worker is alive (and exits 0) from direct pings, without
  listening to the heartbeat stream first.

No wall-clock bound is asserted: the checks compare with loop.interval (a restart or page before
interval/2 after the kill can only come from a wake; the next tick is ~30 s away).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.catchers import HttpCatcher
from tests.support.cli import CliDaemon, kill_pids, pid_alive, pidfile_pids, run_cli, write_config
from tests.support.workers import APP_DIR, Worker, celery_app, wait_ping, worker_command

INTERVAL = 30.0  # loop.interval: the next regular tick is this far away


def _local_restart(url: str) -> dict:
    return {"platform": "local", "target": worker_command(queues="celery"), "cwd": str(APP_DIR),
            "env": {"CELERY_BROKER_URL": url, "PYTHONPATH": str(APP_DIR)},
            "grace": "1s", "backoff": "1s", "max_restarts": 5, "stop_timeout": "3s"}


@pytest.fixture
def started():
    """What a test started, stopped by PID at teardown."""
    things = {"daemons": [], "workers": [], "run_dirs": [], "apps": []}
    yield things
    for d in things["daemons"]:
        d.kill()
    for w in things["workers"]:
        w.stop()
    kill_pids([p for rd in things["run_dirs"] for p in pidfile_pids(rd)])
    for a in things["apps"]:
        a.close()


def _wait(pred, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


@pytest.mark.redis
def test_sigkilled_local_worker_restarted_long_before_next_tick(tmp_path, redis_url, uid, started):
    host = f"celery@{uid}-w"
    run_dir = tmp_path / "run"
    started["run_dirs"].append(run_dir)
    cfg = write_config(tmp_path / "config.yaml", {
        "broker": {"url": redis_url},
        "loop": {"interval": f"{INTERVAL:g}s", "state_path": str(tmp_path / "state.db"), "ping_timeout": "1s"},
        "platforms": {"local": {"run_dir": str(run_dir)}},
        "groups": [{"name": "g", "workers": [host], "heartbeat_timeout": "10s", "restart": _local_restart(redis_url)}],
    })
    app = celery_app(redis_url)
    started["apps"].append(app)
    # the worker is started by the local platform itself, as the daemon would (its pid file is the evidence)
    from platforms.local import Adapter
    from supervisor.config import load_config

    c = load_config(cfg, env={})
    adapter = Adapter(c)
    assert adapter.restart(adapter.target_for(c.groups[0], host), "test start").ok
    wait_ping(app, host, 60)
    first = pidfile_pids(run_dir)
    assert len(first) == 1

    d = CliDaemon("run", "-c", str(cfg), "--log-level", "DEBUG", log_dir=tmp_path)
    started["daemons"].append(d)
    d.wait_output("first cycle complete", 60)
    time.sleep(2.5)  # its heartbeats are heard; the next regular tick is still ~27 s away
    kill_at = time.monotonic()
    import os

    os.kill(first[0], signal.SIGKILL)
    new = _wait(lambda: [p for p in pidfile_pids(run_dir) if p != first[0]], INTERVAL)
    took = time.monotonic() - kill_at
    assert new, f"never restarted:\n{d.err}"
    # the next regular tick was ~30 s away: a restart this early came from the exit watch
    assert took < INTERVAL / 2, f"restarted {took:.1f}s after the kill, as a tick would:\n{d.err}"
    d.wait_output(f"({host}): ", 30)  # the daemon's own line: "restart <target> (<hostname>): <reason> -> ok: ..."
    assert "woken: local worker" in d.err, d.err
    assert pid_alive(new[0])
    wait_ping(app, host, 60)


@pytest.mark.redis
def test_killed_docker_container_restarted_long_before_next_tick(tmp_path, redis_url, uid, started):
    """podman's Docker API (tests/support/podman.py): the die event wakes the loop."""
    from platforms.docker import parse_time
    from tests.support.podman import Containers, connect, engine_url

    client = connect()
    ctrs = Containers(client, uid)
    ctrs.remove_all()
    try:
        host, name = f"celery@{uid}-d", f"cs-{uid}-d"
        cfg = write_config(tmp_path / "config.yaml", {
            "broker": {"url": redis_url},
            "loop": {"interval": f"{INTERVAL:g}s", "state_path": str(tmp_path / "state.db"), "ping_timeout": "1s"},
            "platforms": {"docker": {"base_url": engine_url(), "timeout": "20s"}},
            "groups": [{"name": "g", "workers": [host], "heartbeat_timeout": "10s",
                        "restart": {"platform": "docker", "target": "cs-{node}", "max_restarts": 5, "window": "10m",
                                    "backoff": "100ms", "grace": "5s", "stop_timeout": "3s"}}],
        })
        app = celery_app(redis_url)
        started["apps"].append(app)
        ctrs.run_worker(name, host, redis_url, queues=f"{uid}-q")
        wait_ping(app, host, 60)
        d = CliDaemon("run", "-c", str(cfg), "--log-level", "DEBUG", log_dir=tmp_path)
        started["daemons"].append(d)
        d.wait_output("first cycle complete", 60)
        time.sleep(2.5)  # the events stream is followed; the next regular tick is still ~27 s away
        before = parse_time(ctrs.state(name)["StartedAt"])
        kill_at = time.monotonic()
        ctrs.kill(name)

        def restarted():
            st = ctrs.state(name)
            return st["Running"] and (parse_time(st["StartedAt"]) or 0) > before

        got = _wait(restarted, INTERVAL, step=0.1)
        took = time.monotonic() - kill_at
        assert got, f"never restarted:\n{d.err}"
        # the die event woke the loop: the restart was issued by that woken tick (tick 2), not by the
        # regular one ~27 s later (how fast podman then runs the container again is podman's affair)
        d.wait_output("woken: docker: container", 10)
        log = d.err
        woke, issued = log.find(f"woken: docker: container {name} die"), log.find(f"restart {name} (")
        assert 0 <= woke < issued < log.find("tick 2:"), f"not restarted by a woken tick ({took:.1f}s):\n{log}"
        wait_ping(app, host, 60)
    finally:
        ctrs.remove_all()
        client.close()


@pytest.mark.redis
def test_alert_only_worker_paged_at_heartbeat_timeout_not_next_tick(tmp_path, redis_url, uid, started):
    host = f"celery@{uid}-a"
    with HttpCatcher() as catcher:
        cfg = write_config(tmp_path / "config.yaml", {
            "broker": {"url": redis_url},
            "loop": {"interval": f"{INTERVAL:g}s", "state_path": str(tmp_path / "state.db"), "ping_timeout": "1s"},
            "notify": {"channels": [{"name": "t", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                                     "severities": ["warning", "critical"]}], "retry": ["200ms"]},
            "groups": [{"name": "watch", "workers": [host], "heartbeat_timeout": "3s"}],  # no restart: alert only
        })
        w = Worker(redis_url, host)
        started["workers"].append(w)
        app = celery_app(redis_url)
        started["apps"].append(app)
        wait_ping(app, host, 60)
        d = CliDaemon("run", "-c", str(cfg), "--log-level", "DEBUG", log_dir=tmp_path)
        started["daemons"].append(d)
        d.wait_output("first cycle complete", 60)
        time.sleep(2.5)  # heard since the first tick: its deadline moved on
        kill_at = time.monotonic()
        w.kill(signal.SIGKILL)
        w.proc.wait(10)

        def paged():
            return [r for r in catcher.received() if r.json and "worker_lost" in r.json.get("title", "")
                    and host in r.json.get("title", "") + r.json.get("message", "")]

        got = _wait(paged, INTERVAL)
        took = time.monotonic() - kill_at
        assert got, f"never paged:\n{d.err}"
        # heartbeat_timeout 3 s + ping 1 s; the next regular tick was ~27 s away
        assert took < INTERVAL / 2, f"paged {took:.1f}s after the kill, as a tick would:\n{d.err}"
        assert "woken" in d.err, d.err


@pytest.mark.redis
@pytest.mark.parametrize("shape", ["explicit", "glob"])
def test_once_on_a_healthy_fleet_answers_from_pings(tmp_path, redis_url, uid, started, shape):
    hosts = [f"celery@{uid}-{i}" for i in range(3)]
    for h in hosts:
        started["workers"].append(Worker(redis_url, h))
    app = celery_app(redis_url)
    started["apps"].append(app)
    for h in hosts:
        wait_ping(app, h, 60)
    group = ({"name": "g", "workers": hosts} if shape == "explicit"
             else {"name": "g", "hostnames": [f"celery@{uid}-*"], "min_workers": 3})

    def config(name: str):  # a state file of its own: what an earlier pass heard is not evidence here
        return write_config(tmp_path / f"{name}.yaml", {
            "broker": {"url": redis_url},
            "loop": {"interval": "5s", "state_path": str(tmp_path / f"{name}.db")},
            "groups": [{**group, "heartbeat_timeout": "10s"}],
        })

    cfg = config("healthy")
    r = run_cli("once", "-c", str(cfg), "--json")
    assert r.rc == 0, str(r)
    seen = {w["hostname"]: w["alive"] for w in r.json["workers"]}
    assert seen == dict.fromkeys(hosts, True), str(r)
    text = run_cli("once", "-c", str(cfg), "--log-level", "DEBUG")
    assert text.rc == 0, str(text)
    assert "every expected worker answered a ping" in text.err, str(text)  # it did not wait to hear heartbeats

    # one missing: it still finds out (listening, as before) and says so
    started["workers"][0].kill(signal.SIGKILL)
    started["workers"][0].proc.wait(10)
    cfg = config("one-lost")
    r = run_cli("once", "-c", str(cfg), "--json")
    assert r.rc == 2, str(r)
    seen = {w["hostname"]: w["alive"] for w in r.json["workers"]}
    if shape == "explicit":
        assert seen[hosts[0]] is False and seen[hosts[1]] and seen[hosts[2]], str(r)
    else:  # a glob group does not know the lost hostname without history: it counts fewer than min_workers
        assert hosts[0] not in [h for h, a in seen.items() if a], str(r)
        assert any(f["rule"] == "group_below_min" or "min" in f["rule"] for f in r.json["findings"]), str(r)
    text = run_cli("once", "-c", str(config("one-lost-text")), "--log-level", "DEBUG")
    assert text.rc == 2 and "every expected worker answered a ping" not in text.err, str(text)

