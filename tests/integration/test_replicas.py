"""Two replicas, one fleet (ha.lease auto on a Redis broker): only the leader restarts and alerts;
when it dies, the standby takes over within the lease's ttl. Real `supervisor run` processes, real
local workers really killed, real Apprise deliveries to a local HTTP catcher.

Both replicas share the local platform's run dir (they see the same pid files, as two replicas see
the same cluster), each has its own state file."""

from __future__ import annotations

import re
import signal
import time

import pytest
import redis

from supervisor.lease import RedisLease, lease_name
from tests.support.cli import run_cli
from tests.support.fleet import Fleet, local_restart, pid_alive, wait_until
from tests.support.workers import celery_app, wait_ping

pytestmark = pytest.mark.redis
TTL = 3.0




def titles(catcher) -> list[str]:
    return [r.json["title"] for r in catcher.received() if r.json]


def config(url: str, uid: str, catcher, hosts: list[str], run_dir=None) -> dict:
    cfg = {
        "broker": {"url": url},
        "notify": {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                                 "severities": ["warning", "critical"]}], "retry": ["200ms", "500ms"]},
        "groups": [{"name": "g", "workers": hosts, "min_workers": len(hosts), "heartbeat_timeout": "6s",
                    "restart": local_restart(url, queues=f"{uid}-q")}],
        "ha": {"lease": "auto", "lease_ttl": f"{TTL:g}s"},
    }
    if run_dir is not None:
        cfg["platforms"] = {"local": {"run_dir": str(run_dir)}}
    return cfg


def restarts_done(out: str, host: str) -> int:
    """`restart <target> (<host>): <reason> -> ok` lines: restarts this process executed."""
    return len(re.findall(rf"restart \S+ \({re.escape(host)}\): .* -> ok", out))


def pages(catcher, host: str) -> list[str]:
    """Firing (or still firing) worker_lost messages about ``host``."""
    return [t for t in titles(catcher) if "worker_lost" in t and host in t and not t.startswith("[RESOLVED")]


def test_two_replicas_restart_once_and_the_standby_takes_over(redis_url, tmp_path, uid, catcher, fleets):
    hosts = [f"celery@{uid}-1", f"celery@{uid}-2", f"celery@{uid}-3"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Fleet(tmp_path / "a", config(redis_url, uid, catcher, hosts))
    b = Fleet(tmp_path / "b", config(redis_url, uid, catcher, hosts, run_dir=a.run_dir))
    fleets += [a, b]
    assert a.cfg.loop.state_path != b.cfg.loop.state_path
    app = a.start_workers(*hosts)

    a.run()
    wait_until(lambda: "lease: leader now" in a.output(), 30, what="replica a to lead")
    b.run()
    wait_until(lambda: "lease: standby" in b.output(), 30, what="replica b to stand by")
    wait_until(lambda: "3/3 workers alive" in b.output() and "3/3 workers alive" in a.output(), 30,
               what="both replicas to hear the fleet")
    assert catcher.received() == [], titles(catcher)

    # ---- one killed worker: one restart, one page, whoever saw it
    w = hosts[0]
    old = a.kill(w)
    wait_until(lambda: (p := a.pid(w)) != old and p, 30, what="the restart")
    wait_ping(app, w, 30)
    wait_until(lambda: any("RESOLVED" in t and w in t for t in titles(catcher)), 30, what="the resolved notice")
    time.sleep(3)  # several more ticks of both: nothing else may happen
    assert a.starts(w) == 2, "started by the test, restarted exactly once"
    assert restarts_done(a.output(), w) == 1 and restarts_done(b.output(), w) == 0
    assert len(pages(catcher, w)) == 1 and pages(catcher, w)[0].startswith("[FIRING critical] worker_lost"), \
        titles(catcher)
    assert "standby: not sent" not in a.output()

    # ---- the leader dies (no release) and another worker dies: the standby acts, once
    leader_pid = a.proc.pid
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    t_dead = time.monotonic()
    w2 = hosts[1]
    old2 = a.kill(w2)
    new2 = wait_until(lambda: (p := a.pid(w2)) != old2 and p, 30, what="the standby to restart the worker")
    took = time.monotonic() - t_dead
    wait_ping(app, w2, 30)
    wait_until(lambda: any("RESOLVED" in t and w2 in t for t in titles(catcher)), 30, what="the resolved notice")
    time.sleep(3)
    assert not pid_alive(leader_pid) and pid_alive(new2)
    assert "lease: leader now" in b.output()
    assert a.starts(w2) == 2 and restarts_done(b.output(), w2) == 1
    # the standby paged nothing while it stood by: on taking over it pages what still fires (FIRING,
    # not STILL FIRING of a page nobody got), with what it did about it
    assert len(pages(catcher, w2)) == 1 and pages(catcher, w2)[0].startswith("[FIRING critical] worker_lost"), \
        titles(catcher)
    body = next(r.json["message"] for r in catcher.received()
                if r.json and "worker_lost" in r.json["title"] and w2 in r.json["title"]
                and not r.json["title"].startswith("[RESOLVED"))
    assert "restarted" in body
    assert [a.starts(h) for h in hosts] == [2, 2, 1]
    # the old leader's key expired: the standby waited for that (ttl), then acted on its next tick
    assert took > TTL * 2 / 3 - 0.5, f"restarted {took:.1f}s after the leader died: before its lease ran out?"
    print(f"standby restarted the worker {took:.2f}s after the leader was SIGKILLed (ttl {TTL}s, tick 1s)")
    print("alerts:", titles(catcher))

    # ---- a clean stop releases the lease at once
    key = RedisLease(redis_url, lease_name(b.cfg), TTL).key
    assert redis.Redis.from_url(redis_url).exists(key)
    assert b.stop() == 0
    assert not redis.Redis.from_url(redis_url).exists(key), "released on a clean stop"


def test_once_respects_a_running_leader(redis_url, tmp_path, uid, catcher, fleets):
    host = f"celery@{uid}-1"
    f = Fleet(tmp_path, config(redis_url, uid, catcher, [host]))
    fleets.append(f)
    old = f.start_worker(host)
    wait_ping(celery_app(redis_url), host)
    f.kill(host)
    wait_until(lambda: not pid_alive(old), 10, what="the worker to die")

    leader = RedisLease(redis_url, lease_name(f.cfg), 30)  # another replica, leading
    try:
        assert leader.start()
        r = run_cli("once", "-c", f.path, "--json", timeout=90)
        doc = r.json
        restarts = [x for x in doc["actions"] if x["kind"] == "restart"]
        assert restarts and not any(x["executed"] for x in restarts), r
        assert all("standby" in x["result"] for x in restarts), r
        assert "another replica holds the leader lease" in r.err and leader.holder in r.err
        assert f.pid(host) == old and f.starts(host) == 1, "nothing restarted"
        time.sleep(1)
        assert catcher.received() == [], "and nothing sent"
        assert leader.is_leader() and leader.confirm(), "the pass did not take the lease"
    finally:
        leader.stop(release=True)

    r = run_cli("once", "-c", f.path, "--json", timeout=90)  # no leader now: the pass acts
    restarts = [x for x in r.json["actions"] if x["kind"] == "restart"]
    assert restarts and all(x["executed"] for x in restarts), r
    wait_until(lambda: (p := f.pid(host)) != old and p, 30, what="the restart")
    assert "leader lease" not in r.err
    assert not redis.Redis.from_url(redis_url).exists(leader.key), "the pass released the lease after it"
