"""Durable state end to end: `supervisor run` killed with SIGKILL mid-cycle and started again,
budgets across restarts and `supervisor reset`, the outbox retrying a failing channel, a hanging
channel that delays no cycle. Real Redis, real local workers really killed, real Apprise
deliveries to a local HTTP catcher."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.catchers import HttpCatcher
from tests.support.cli import run_cli
from tests.support.fleet import Fleet, local_restart, wait_until
from tests.support.workers import wait_ping

pytestmark = pytest.mark.redis




def titles(catcher: HttpCatcher, answered: int | None = None) -> list[str]:
    return [r.json["title"] for r in catcher.received(answered=answered) if r.json]


def firing(catcher: HttpCatcher, what: str, answered: int | None = 200) -> list[str]:
    return [t for t in titles(catcher, answered) if t.startswith("[FIRING") and what in t]


def make_fleet(tmp_path, redis_url, catcher, hosts, uid, timeout="10s", retry=("200ms",), **restart) -> Fleet:
    return Fleet(tmp_path, {
        "broker": {"url": redis_url},
        "notify": {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                                 "timeout": timeout}], "retry": list(retry)},
        "groups": [{"name": "g", "workers": hosts, "heartbeat_timeout": "5s",
                    "restart": local_restart(redis_url, queues=f"{uid}-q", **restart)}],
    })


def status_json(f: Fleet) -> dict:
    r = run_cli("status", "-c", str(f.path), "--json")
    assert r.rc in (0, 3), str(r)
    return r.json


def test_sigkill_mid_cycle_neither_loses_nor_repeats_the_alert_and_keeps_the_budget(
        redis_url, tmp_path, uid, catcher, fleets):
    host = f"celery@{uid}-a"
    f = make_fleet(tmp_path, redis_url, catcher, [host], uid)
    fleets.append(f)
    app = f.start_workers(host)
    # the supervisor kills itself right after accepting the tick's alerts into the outbox, before
    # sending any: the worst moment for "no lost alert"
    f.run(env={"SUPERVISOR_CRASH_AT": "accepted"})
    time.sleep(3)
    assert f.proc.poll() is None, f.output()
    f.kill(host)
    wait_until(lambda: f.proc.poll() is not None, 30, what="the supervisor's crash at the injected point")
    assert f.proc.returncode == -signal.SIGKILL, f.output()
    assert "SUPERVISOR_CRASH_AT=accepted" in f.output()
    assert f.starts(host) == 2, "restarted once before the crash"
    assert titles(catcher) == [], "the crash came before any delivery"
    f.stop()

    f.run()  # the same state file, no crash this time
    wait_ping(app, host, 30)
    wait_until(lambda: firing(catcher, host), 30, what="the accepted FIRING alert, from the outbox")
    wait_until(lambda: any("RESOLVED" in t and host in t for t in titles(catcher, 200)), 40, what="resolved")
    time.sleep(3)  # nothing more may come
    assert len(firing(catcher, "worker_lost", answered=None)) == 1, titles(catcher)
    assert sum("RESOLVED" in t for t in titles(catcher)) == 1, titles(catcher)
    assert f.starts(host) == 2, "not restarted again after the crash: it was back"
    body = next(r.json["message"] for r in catcher.received() if "FIRING" in r.json["title"])
    assert "restarted" in body, body
    doc = status_json(f)
    b = [x for x in doc["budgets"] if x["hostname"] == host]
    assert b and b[0]["used"] == 1 and b[0]["max"] == 3, doc["budgets"]
    assert [r["outcome"] for r in doc["recent_restarts"]] == ["ok"], doc["recent_restarts"]
    assert doc["outbox"].get("delivered") == 2 and not doc["outbox"].get("pending"), doc["outbox"]
    assert f.stop() == 0


def test_spent_budget_survives_a_restart_and_reset_refills_it(redis_url, tmp_path, uid, catcher, fleets):
    host = f"celery@{uid}-b"
    f = make_fleet(tmp_path, redis_url, catcher, [host], uid, max_restarts=1, grace="5s")
    fleets.append(f)
    app = f.start_workers(host)
    f.run()
    time.sleep(3)
    f.kill(host)
    wait_until(lambda: f.starts(host) == 2, 30, what="the first restart")
    wait_ping(app, host, 30)
    wait_until(lambda: any("RESOLVED" in t for t in titles(catcher, 200)), 30, what="resolved")
    assert f.stop() == 0  # a supervisor restart must not refill the budget

    f.run()
    time.sleep(3)
    f.kill(host)
    wait_until(lambda: firing(catcher, "restart_gave_up"), 40, what="the gave-up alert")
    time.sleep(2)
    assert f.starts(host) == 2, "budget spent before the supervisor restarted: no second restart"
    doc = status_json(f)
    assert any(b["hostname"] == host and b["spent"] for b in doc["budgets"]), doc["budgets"]
    table = run_cli("status", "-c", str(f.path))
    assert "SPENT" in table.out and host in table.out, str(table)

    r = run_cli("reset", "-c", str(f.path), host)
    assert r.rc == 0 and "cleared 1 restart" in r.out, str(r)
    wait_until(lambda: f.starts(host) == 3, 30, what="the restart after `supervisor reset`")
    wait_ping(app, host, 30)
    assert f.stop() == 0


def test_channel_returning_500_is_retried_from_the_outbox_until_it_recovers(
        redis_url, tmp_path, uid, catcher, fleets):
    host = f"celery@{uid}-c"
    f = make_fleet(tmp_path, redis_url, catcher, [host], uid)
    fleets.append(f)
    f.start_workers(host)
    f.run()
    time.sleep(3)
    # the notifier tries each message twice (retry: [200ms]); the outbox retries the rest, in order
    catcher.fail_next(4, 500)
    f.kill(host)
    wait_until(lambda: any("RESOLVED" in t for t in titles(catcher, 200)), 60,
               what="the alerts once the channel recovers")
    time.sleep(2)
    ok = titles(catcher, 200)
    assert len(ok) == 2 and ok[0].startswith("[FIRING") and ok[1].startswith("[RESOLVED"), ok
    assert len(catcher.received(answered=500)) == 4, titles(catcher, None)
    assert "from the outbox" in f.output()
    doc = status_json(f)
    assert doc["outbox"] == {"delivered": 2}, doc["outbox"]
    assert f.stop() == 0


def test_a_channel_hanging_60s_delays_no_cycle(redis_url, tmp_path, uid, catcher, fleets):
    hosts = [f"celery@{uid}-d1", f"celery@{uid}-d2"]
    f = make_fleet(tmp_path, redis_url, catcher, hosts, uid, timeout="90s")
    fleets.append(f)
    app = f.start_workers(*hosts)
    f.run()
    time.sleep(3)
    catcher.hang_next(60)
    f.kill(hosts[0])
    catcher.wait_hanging(1, 30)  # the FIRING of the first kill hangs in the channel now
    t0 = time.monotonic()
    f.kill(hosts[1])
    wait_until(lambda: f.starts(hosts[1]) == 2, 20, what="the second worker's restart while the channel hangs")
    wait_ping(app, hosts[1], 30)
    assert catcher.hanging == 1 and time.monotonic() - t0 < 60, "the channel still hangs"
    doc = status_json(f)
    assert doc["age"] is not None and doc["age"] < 5, f"cycles go on: last one {doc['age']}s ago"
    assert f.proc.poll() is None


def test_silence_mutes_alerts_not_restarts_and_is_shown(redis_url, tmp_path, uid, catcher, fleets):
    host = f"celery@{uid}-e"
    f = make_fleet(tmp_path, redis_url, catcher, [host], uid)
    fleets.append(f)
    app = f.start_workers(host)
    f.run()
    time.sleep(2)
    r = run_cli("silence", "-c", str(f.path), "g", "--for", "1h", "--reason", "planned maintenance")
    assert r.rc == 0 and "silenced g for 1h" in r.out, str(r)
    bad = run_cli("silence", "-c", str(f.path), "nosuchgroup", "--for", "1h", "--reason", "x")
    assert bad.rc == 2 and "neither a group" in bad.err, str(bad)
    f.kill(host)
    wait_until(lambda: f.starts(host) == 2, 30, what="the restart: a silence does not stop it")
    wait_ping(app, host, 30)
    time.sleep(3)
    assert titles(catcher) == [], "silenced: no alert"
    doc = status_json(f)
    assert [s["match"] for s in doc["silences"]] == ["g"] and doc["silences"][0]["reason"] == "planned maintenance"
    table = run_cli("status", "-c", str(f.path))
    assert "planned maintenance" in table.out and "SILENCES" in table.out, str(table)
    once = run_cli("once", "-c", str(f.path), "--json")  # the daemon owns the state file: plan only
    assert "only plans" in once.err and once.rc == 0, str(once)
    assert run_cli("silence", "-c", str(f.path), "g", "--remove").rc == 0
    assert status_json(f)["silences"] == []
    assert f.stop() == 0
