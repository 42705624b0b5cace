"""A broker outage is paged once, whoever is running: with ``ha.lease: auto`` the lease store is the
broker's own Redis, so when Redis is down no replica can lead -- yet exactly one must say so.

- a lone `supervisor run` started while Redis is down (issue 14, finding 4: it stood by for ever,
  its FIRING logged, never delivered);
- a leader and a standby running when Redis goes down;
- two replicas restarted while Redis is down (each goes by what its state file remembers of the lease).

Each: exactly one FIRING broker_unreachable delivered, and one RESOLVED after Redis is back (sent by
the replica that paged). Real redis-server stopped and started by PID, real `supervisor run`
processes, real Apprise deliveries to a local HTTP catcher. The rule and what stays open:
supervisor/lease.py and the README's "High availability"."""

from __future__ import annotations

import time

import pytest

from supervisor.rules import TRANSIENT_HOLD
from tests.support.fleet import Fleet, local_restart, wait_until

pytestmark = pytest.mark.redis
TTL = 3.0
HOLD = TRANSIENT_HOLD  # an observation failure (the broker unreachable) pages after this long


def titles(catcher) -> list[str]:
    return [r.json["title"] for r in catcher.received() if r.json]


def outage_pages(catcher) -> tuple[list, list]:
    """(FIRING broker_unreachable requests, RESOLVED broker_unreachable requests) delivered."""
    reqs = [r for r in catcher.received() if r.json and "broker_unreachable" in r.json["title"]]
    return ([r for r in reqs if r.json["title"].startswith("[FIRING")],
            [r for r in reqs if r.json["title"].startswith("[RESOLVED")])


def config(url: str, uid: str, catcher, hosts=(), run_dir=None) -> dict:
    cfg = {
        "broker": {"url": url, "connect_timeout": "1s"},
        "notify": {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                                 "severities": ["warning", "critical"]}], "retry": ["200ms", "500ms"]},
        "groups": [{"name": "g", "workers": list(hosts), "hostnames": [f"celery@{uid}-*"],
                    "heartbeat_timeout": "6s", "restart": local_restart(url, queues=f"{uid}-q")}],
        "ha": {"lease": "auto", "lease_ttl": f"{TTL:g}s"},
    }
    if run_dir is not None:
        cfg["platforms"] = {"local": {"run_dir": str(run_dir)}}
    return cfg


def replicas(tmp_path, url, uid, catcher, hosts=()) -> tuple[Fleet, Fleet]:
    """Two replicas of one config: their own state files, one run dir (they watch the same hosts)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Fleet(tmp_path / "a", config(url, uid, catcher, hosts))
    b = Fleet(tmp_path / "b", config(url, uid, catcher, hosts, run_dir=a.run_dir))
    return a, b


def settle_and_check_one_page(catcher, since: float, *fleets) -> float:
    """Wait for the FIRING, then long enough for any second one (two more holds); return the seconds
    from ``since`` to its delivery."""
    wait_until(lambda: outage_pages(catcher)[0], 60, what="the broker_unreachable page")
    fired = outage_pages(catcher)[0]
    took = fired[0].at - since
    time.sleep(2 * HOLD)
    fired = outage_pages(catcher)[0]
    assert len(fired) == 1, (titles(catcher), *(f.output()[-3000:] for f in fleets))
    assert fired[0].json["title"].startswith("[FIRING critical] broker_unreachable"), titles(catcher)
    return took


def check_one_resolved(catcher, since: float, *fleets) -> float:
    wait_until(lambda: outage_pages(catcher)[1], 60, what="the RESOLVED of the broker outage")
    took = outage_pages(catcher)[1][0].at - since
    time.sleep(3 * TTL)
    fired, resolved = outage_pages(catcher)
    assert len(fired) == 1 and len(resolved) == 1, (titles(catcher), *(f.output()[-3000:] for f in fleets))
    return took


def test_a_lone_replica_started_while_redis_is_down_pages_once(own_redis, tmp_path, uid, catcher, fleets):
    url = f"{own_redis.url}/0"
    f = Fleet(tmp_path, config(url, uid, catcher))
    fleets.append(f)
    own_redis.stop()
    t0 = time.monotonic()
    f.run()
    took = settle_and_check_one_page(catcher, t0, f)
    assert "this replica pages a broker outage" in f.output(), f.output()
    assert "standby: not sent" not in f.output()

    own_redis.start()
    t1 = time.monotonic()
    back = check_one_resolved(catcher, t1, f)
    assert "lease: leader now" in f.output()
    assert f.stop() == 0
    print(f"lone replica started with Redis down: FIRING delivered {took:.1f}s after start "
          f"(hold {HOLD:g}s); RESOLVED {back:.1f}s after Redis came back")


def test_leader_and_standby_page_a_redis_outage_once(own_redis, tmp_path, uid, catcher, fleets):
    url = f"{own_redis.url}/0"
    hosts = [f"celery@{uid}-1"]
    a, b = replicas(tmp_path, url, uid, catcher, hosts)
    fleets += [a, b]
    app = a.start_workers(*hosts)
    a.run()
    wait_until(lambda: "lease: leader now" in a.output(), 30, what="replica a to lead")
    b.run()
    wait_until(lambda: "lease: standby" in b.output(), 30, what="replica b to stand by")
    wait_until(lambda: "1/1 workers alive" in a.output() and "1/1 workers alive" in b.output(), 30,
               what="both to hear the worker")
    assert catcher.received() == [], titles(catcher)

    own_redis.stop()
    t0 = time.monotonic()
    took = settle_and_check_one_page(catcher, t0, a, b)
    assert "this replica pages a broker outage (it leads)" in a.output(), a.output()
    assert "the leader when last seen, pages a broker outage; this replica stays quiet" in b.output(), b.output()

    own_redis.start()
    t1 = time.monotonic()
    back = check_one_resolved(catcher, t1, a, b)
    # the replica that paged took the lease back (b left it free for a ttl) and resolved its own page
    assert a.output().count("lease: leader now") == 2 or "reachable again; still the leader" in a.output(), \
        a.output()[-3000:]
    assert "lease: leader now" not in b.output()
    # the worker reconnects and is heard again (after a Redis restart that lost its data celery workers
    # answer no control command -- celery#8796 -- so pings prove nothing here): still no other page
    wait_until(lambda: "1/1 workers alive" in a.output()[a.output().find("RESOLVED broker_unreachable"):], 60,
               what="the worker heard again after the outage")
    assert a.starts(hosts[0]) == 1, "nothing restarted"
    print(f"leader + standby, Redis stopped: FIRING delivered {took:.1f}s after the stop (hold {HOLD:g}s); "
          f"RESOLVED {back:.1f}s after Redis came back")
    print("alerts:", titles(catcher))
    app.close()


def test_two_replicas_restarted_during_an_outage_page_once(own_redis, tmp_path, uid, catcher, fleets):
    url = f"{own_redis.url}/0"
    a, b = replicas(tmp_path, url, uid, catcher)
    fleets += [a, b]
    a.run()
    wait_until(lambda: "lease: leader now" in a.output(), 30, what="replica a to lead")
    b.run()
    wait_until(lambda: "lease: standby" in b.output(), 30, what="replica b to stand by")
    assert b.stop() == 0 and a.stop() == 0  # both stopped (a deploy, a host reboot) ...
    own_redis.stop()  # ... and the broker is down when they start again

    t0 = time.monotonic()
    b.run()  # the standby first: had it nothing to go by, it would page as well
    a.run()
    took = settle_and_check_one_page(catcher, t0, a, b)
    assert "this replica pages a broker outage (it held the lease when it last reached the store)" in a.output(), \
        a.output()
    assert "this replica restarts nothing and pages nothing" in b.output(), b.output()

    own_redis.start()
    t1 = time.monotonic()
    back = check_one_resolved(catcher, t1, a, b)
    wait_until(lambda: a.output().count("lease: leader now") == 2, 30, what="a to lead again")
    assert a.stop() == 0 and b.stop() == 0
    print(f"two replicas restarted during an outage: FIRING delivered {took:.1f}s after they started; "
          f"RESOLVED {back:.1f}s after Redis came back")


def test_the_outage_pager_rule_with_leases_on_a_real_redis(own_redis, uid):
    """The rule itself, replica by replica (supervisor/lease.py), on a real Redis stopped and started:
    who may alert while the store is unreachable, and who takes the lease back afterwards."""
    from supervisor.lease import RedisLease

    url = f"{own_redis.url}/0"
    made = []

    def lease(memory=None):
        x = RedisLease(url, uid, TTL, timeout=0.5)
        x.remember(memory)
        made.append(x)
        return x

    try:
        leader, standby = lease(), lease()
        assert leader.start() and not standby.start()
        assert standby.memory()["outage_pager"] is False and standby.memory()["leader"] == leader.holder
        own_redis.stop()
        was_standby = lease({"outage_pager": False, "leader": leader.holder})  # restarted during the outage
        was_leader = lease({"outage_pager": True, "leader": "x"})
        first_start = lease()  # no state file: knows of no other replica (the documented duplicate)
        for x in (was_standby, was_leader, first_start):
            assert x.start() is False and x.store_error
        wait_until(lambda: not leader.is_leader(), 5 * TTL, 0.02, what="the leader's lease to run out")
        wait_until(lambda: standby.store_error, 5 * TTL, 0.02, what="the standby to notice")
        pagers = [x for x in made if x.may_alert()]
        assert pagers == [leader, was_leader, first_start], [x.status() for x in made]
        assert not any(x.is_leader() or x.confirm() for x in made), "nobody restarts"

        # back: the replicas that did not page leave the free lease alone for one ttl
        for x in (was_leader, first_start):
            x.stop(release=False)
        own_redis.start()
        wait_until(lambda: leader.is_leader(), 5 * TTL, 0.02, what="the replica that paged to lead again")
        time.sleep(TTL)
        assert [x for x in made if x.is_leader()] == [leader]
        assert standby.seen_holder == leader.holder and not standby.may_alert()
    finally:
        for x in made:
            x.stop(release=True)
