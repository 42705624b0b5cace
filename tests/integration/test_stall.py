"""Stalled consumers (issue 10) on real fleets: `supervisor run` as a subprocess, real Redis and real
RabbitMQ (a vhost of its own), real prefork Celery workers started through the local platform, real
Apprise deliveries to a local HTTP catcher.

- A worker made to stall for real with ``app.control.cancel_consumer(queue, destination=[worker])``
  (it keeps heartbeating and answering ping, and takes nothing more) while its queue grows: found
  within stall_timeout plus a few intervals, restarted once with the evidence as the reason, it
  consumes again, the backlog drains, one FIRING and one RESOLVED.
- A busy prefork worker with every slot taken and a growing queue is not restarted: the queue is
  reported saturated (info) in `supervisor status --json`.
- The shape of the upstream Redis bug: the worker's BRPOP connection goes half-open (a TCP proxy
  stops forwarding it, no FIN, no RST) while its other connections work. Celery 5.7 keeps
  heartbeating, answers ping, lists the queue in active_queues and takes nothing, for minutes:
  found ("consumes ... but holds no message"), restarted, consumes again.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from tests.support.catchers import HttpCatcher
from tests.support.cli import run_cli
from tests.support.fleet import Fleet, local_restart, wait_until

STALL = 6.0  # stall_timeout of these tests (seconds)
INTERVAL = 1.0


def channel(catcher: HttpCatcher) -> dict:
    return {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                          "severities": ["warning", "critical"]}], "retry": ["200ms", "500ms"]}


def titles(catcher: HttpCatcher) -> list[str]:
    return [r.json["title"] for r in catcher.received() if r.json]


def status(f: Fleet) -> dict:
    """What `supervisor status --json` says ({} before the daemon saved its first cycle)."""
    r = run_cli("status", "-c", str(f.path), "--json", timeout=30)
    return r.json if r.rc != 3 else {}


class Producer:
    """Publishes one task every ``every`` seconds to a queue, in the background."""

    def __init__(self, app, queue: str, task: str = "tasks.add", args=(1, 2), every: float = 0.25):
        self.app, self.queue, self.task, self.args, self.every = app, queue, task, list(args), every
        self.sent = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        with self.app.connection_for_write() as conn:
            while not self._stop.is_set():
                self.app.send_task(self.task, args=self.args, queue=self.queue, connection=conn)
                self.sent += 1
                self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._t.join(10)


def fleet(tmp_path, url: str, host: str, queue: str, catcher, concurrency: int = 2, pool: str = "prefork",
          extra: tuple[str, ...] = ()) -> Fleet:
    return Fleet(tmp_path, {
        "broker": {"url": url},
        "loop": {"interval": f"{INTERVAL}s"},
        "notify": channel(catcher),
        "groups": [{"name": "g", "workers": [host], "min_workers": 1, "heartbeat_timeout": "6s",
                    "hung_timeout": "60s", "queues": [queue], "stall_timeout": f"{STALL}s",
                    "restart": local_restart(url, pool=pool, queues=queue,
                                             extra=("--concurrency", str(concurrency), *extra), grace="20s")}],
        # no `queues:` entry: a group queue needs no thresholds (issue 10)
    })


def worker_doc(doc: dict, host: str) -> dict:
    return next((w for w in doc.get("workers", []) if w["hostname"] == host), {})


def queue_doc(doc: dict, name: str) -> dict:
    return next((q for q in doc.get("queues", []) if q["name"] == name), {})


@pytest.mark.parametrize(("broker", "pool", "concurrency", "extra"), [
    ("redis", "prefork", 2, ()),
    ("rabbitmq", "prefork", 2, ()),
    # no worker event at all: processed comes from targeted inspect stats
    ("redis", "solo", 1, ("--without-heartbeat",)),
    ("rabbitmq", "threads", 3, ("--without-heartbeat",)),
])
def test_a_cancelled_consumer_is_found_restarted_once_consumes_again_and_pages_once(
        broker, pool, concurrency, extra, request, tmp_path, uid, catcher, fleets):
    url = request.getfixturevalue("redis_url" if broker == "redis" else "rabbitmq_url")
    host, queue = f"celery@{uid}-st", f"{uid}-q"
    f = fleet(tmp_path, url, host, queue, catcher, concurrency, pool, extra)
    fleets.append(f)
    app = f.start_workers(host)
    f.run()
    for _ in range(5):
        app.send_task("tasks.add", args=[1, 2], queue=queue)
    # the supervisor knows its evidence: pool size (targeted inspect stats), and tasks taken (from
    # heartbeats; without heartbeats from inspect stats, asked only while a backlog lasts)
    wait_until(lambda: (w := worker_doc(status(f), host)).get("concurrency") == concurrency
               and (extra or w.get("processed", 0) >= 5), 60, 1.0, "the worker's evidence in status")
    assert titles(catcher) == []

    replies = app.control.cancel_consumer(queue, destination=[host], reply=True, timeout=5)
    stalled_at = time.time()
    assert replies and host in replies[0], replies
    producer = Producer(app, queue)
    try:
        doc = wait_until(lambda: (d := status(f)).get("recent_restarts") and d, STALL + 60, 0.5, "a stall restart")
        doc = wait_until(lambda: (d := status(f))["recent_restarts"][0]["outcome"] != "started" and d, 30, 0.5,
                         "the restart's outcome")
    finally:
        producer.stop()
    restart = doc["recent_restarts"][0]
    took = restart["at"] - stalled_at
    print(f"{broker}: stall -> restart {took:.1f}s (stall_timeout {STALL}s, interval {INTERVAL}s)")
    assert restart["hostname"] == host and restart["outcome"] == "ok", restart
    assert restart["reason"].startswith(f"stalled: queue {queue} has "), restart
    assert f"consumer of {queue} missing" in restart["reason"], restart
    # generous (load): stall_timeout + two intervals is the aim, the bench measures it
    assert took < STALL + 2 * INTERVAL + 20, took

    # it consumes again: the backlog drains, the alert resolves
    wait_until(lambda: queue_doc(status(f), queue).get("length") == 0, 90, 1.0, "the backlog drained")
    catcher.wait_for(lambda r: bool(r.json) and r.json["title"].startswith("[RESOLVED] worker_stalled"), timeout=60)
    time.sleep(3 * INTERVAL)
    t = titles(catcher)
    stall_titles = [x for x in t if "worker_stalled" in x]
    assert [x.split("]")[0] + "]" for x in stall_titles] == ["[FIRING critical]", "[RESOLVED]"], t
    firing = next(r.json for r in catcher.received() if r.json and r.json["title"].startswith("[FIRING"))
    assert f"consumer of {queue} missing" in firing["message"] and "restarted" in firing["message"], firing["message"]
    assert not [x for x in t if "worker_lost" in x or "group_below_min" in x], t
    assert f.starts(host) == 2, "restarted exactly once"
    doc = status(f)
    w = worker_doc(doc, host)
    assert w["alive"] and w["stall"] is None, w
    assert extra or w["processed"] >= 1, w
    assert f.stop() == 0


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_busy_prefork_worker_with_every_slot_taken_is_not_restarted_its_queue_is_saturated(
        broker, request, tmp_path, uid, catcher, fleets):
    url = request.getfixturevalue("redis_url" if broker == "redis" else "rabbitmq_url")
    host, queue = f"celery@{uid}-busy", f"{uid}-q"
    f = fleet(tmp_path, url, host, queue, catcher)
    fleets.append(f)
    app = f.start_workers(host)
    pid = f.pid(host)
    f.run()
    wait_until(lambda: worker_doc(status(f), host).get("concurrency") == 2, 60, 1.0, "the pool size known")
    # two long tasks fill both slots; more keep coming behind them
    for _ in range(2):
        app.send_task("tasks.sleep", args=[60], queue=queue)
    producer = Producer(app, queue, task="tasks.sleep", args=(60,), every=0.5)
    try:
        doc = wait_until(lambda: (d := status(f)) and queue_doc(d, queue).get("saturated") and d,
                         STALL + 60, 1.0, "the queue reported saturated")
        time.sleep(STALL + 4 * INTERVAL)  # well past stall_timeout with a growing backlog
        doc = status(f)
    finally:
        producer.stop()
    w = worker_doc(doc, host)
    assert w["active"] == 2 and w["concurrency"] == 2 and w["stall"] == "busy", w
    q = queue_doc(doc, queue)
    assert q["saturated"] and q["length"] > 0 and (q["drain_rate"] is None or q["drain_rate"] <= 0), q
    sat = [x for x in doc["findings"] if x["rule"] == "queue_saturated"]
    assert [(x["subject"], x["severity"]) for x in sat] == [(queue, "info")], doc["findings"]
    assert f.starts(host) == 1 and f.pid(host) == pid, "a busy worker was restarted"
    assert doc["recent_restarts"] == []
    assert titles(catcher) == [], titles(catcher)
    once = run_cli("once", "-c", str(f.path), "--json", timeout=60)
    assert once.rc == 0, once.output  # saturation is info: healthy for Nagios
    assert f.stop() == 0


class HalfOpenProxy:
    """A TCP proxy to Redis. ``freeze()`` silently stops forwarding, both ways, the connections open
    now that have sent a BRPOP (the consumer's connection): no FIN, no RST, as after a network
    fault a NAT or firewall forgot. Connections opened later (a restarted worker's) are forwarded."""

    def __init__(self, port: int):
        from supervisor.embedded_redis import free_port

        self.target, self.port = port, free_port()
        self.states: list[dict] = []
        self._socks: list[socket.socket] = []
        self._ls = socket.socket()
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind(("127.0.0.1", self.port))
        self._ls.listen(64)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            st: dict = {}
            self.states.append(st)
            self._socks += [c, s]
            threading.Thread(target=self._pump, args=(c, s, st), daemon=True).start()

    def _pump(self, c, s, st):
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([c, s], [], [], 0.2)
                for sock in ready:
                    other = s if sock is c else c
                    data = sock.recv(65536)
                    if not data:
                        other.shutdown(socket.SHUT_WR)
                        return
                    if sock is c and b"BRPOP" in data.upper():
                        st["brpop"] = True
                    if st.get("frozen"):
                        continue  # swallowed: half-open
                    other.sendall(data)
            except (OSError, ValueError):
                return

    def freeze(self) -> int:
        n = 0
        for st in self.states:
            if st.get("brpop"):
                st["frozen"] = True
                n += 1
        return n

    def close(self):
        self._stop.set()
        for x in [self._ls, *self._socks]:
            try:
                x.close()
            except OSError:
                pass


def test_a_half_open_consumer_connection_on_redis_is_found_and_restarted(redis_server, redis_url, tmp_path, uid,
                                                                          catcher, fleets):
    host, queue = f"celery@{uid}-ho", f"{uid}-q"
    proxy = HalfOpenProxy(redis_server.port)
    worker_url = redis_url.replace(f":{redis_server.port}/", f":{proxy.port}/")
    try:
        f = Fleet(tmp_path, {
            "broker": {"url": redis_url},  # the supervisor talks to Redis directly
            "loop": {"interval": f"{INTERVAL}s"},
            "notify": channel(catcher),
            "groups": [{"name": "g", "workers": [host], "min_workers": 1, "heartbeat_timeout": "6s",
                        "hung_timeout": "60s", "queues": [queue], "stall_timeout": f"{STALL}s",
                        "restart": local_restart(worker_url, pool="prefork", queues=queue,
                                                 extra=("--concurrency", "2"), grace="20s")}],
        })
        fleets.append(f)
        app = f.start_workers(host)
        f.run()
        app.send_task("tasks.add", args=[1, 2], queue=queue)
        wait_until(lambda: (w := worker_doc(status(f), host)).get("concurrency") == 2 and w.get("processed", 0) >= 1,
                   60, 1.0, "the worker's evidence in status")
        assert proxy.freeze() >= 1
        frozen_at = time.time()
        producer = Producer(app, queue, every=0.5)
        try:
            doc = wait_until(lambda: (d := status(f)).get("recent_restarts") and d, STALL + 60, 0.5, "a stall restart")
        finally:
            producer.stop()
        restart = doc["recent_restarts"][0]
        print(f"half-open: stall -> restart {restart['at'] - frozen_at:.1f}s")
        assert restart["hostname"] == host, restart
        assert restart["reason"].endswith(f"consumes {queue} but holds no message"), restart
        wait_until(lambda: queue_doc(status(f), queue).get("length") == 0, 90, 1.0, "the backlog drained")
        catcher.wait_for(lambda r: bool(r.json) and r.json["title"].startswith("[RESOLVED] worker_stalled"),
                         timeout=60)
        assert f.starts(host) == 2
        assert f.stop() == 0
    finally:
        proxy.close()
