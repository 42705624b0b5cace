"""Heartbeats from real workers on real brokers, judged on our own clock.

What an on-call engineer relies on: a running worker shows up within a heartbeat or two; a
SIGKILLed one simply stops heartbeating (no worker-offline ever comes, so nothing may pretend
it left gracefully); a SIGTERMed one says worker-offline; task events never reach us even when
someone turned them on; and a broker outage is survived without piling up bindings in Redis.

The same suite runs against both sources: celery's event receiver (``kombu``, on Redis and RabbitMQ)
and the lean Redis reader (``lean``, what the supervisor uses on every Redis broker).
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from supervisor.config import BrokerConfig
from supervisor.observe.celeryapp import make_app
from supervisor.observe.heartbeats import EventReceiverSource, HeartbeatSnapshot, ThreadedSource
from supervisor.observe.redis_heartbeats import RedisHeartbeatSource
from tests.support.brokers import free_port
from tests.support.workers import celery_app, wait_ping

BINDINGS = "_kombu.binding.celeryev"


def wait_for(cond, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)


class Events:
    """Collects what on_event narrates, thread-safely."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, float]] = []

    def __call__(self, kind: str, hostname: str, at: float) -> None:
        with self.lock:
            self.seen.append((kind, hostname, at))

    def kinds(self, hostname: str | None = None) -> list[str]:
        with self.lock:
            return [k for k, h, _ in self.seen if hostname is None or h == hostname]


class TcpProxy:
    """A TCP proxy in front of a broker, to cut every connection (``kill``) or to go silent
    (``mode = "blackhole"``: connections stay open, nothing passes) as a broken network does."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.mode = "forward"
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while not self.closed:
                readable, _, _ = select.select([client, server], [], [], 0.1)
                if self.mode == "blackhole":
                    continue
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (server if s is client else client).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass

    def kill(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.kill()


class AllEvents(EventReceiverSource):
    """The same receiver bound to every event (as Flower does): proves the task events exist."""

    routing_key = "#"


def new_source(kind: str, broker: BrokerConfig, **kwargs) -> ThreadedSource:
    """A source of ``kind``: "kombu" (celery's event receiver) or "lean" (RedisHeartbeatSource)."""
    if kind == "lean":
        kwargs.pop("amqp_heartbeat", None)
        return RedisHeartbeatSource(broker, app=make_app(broker), **kwargs)
    return EventReceiverSource(make_app(broker), **kwargs)


@pytest.fixture(params=["kombu", "lean"])
def kind(request) -> str:
    """Which source a Redis-only test runs against."""
    return request.param


@pytest.fixture(params=["redis-kombu", "redis-lean", "rabbitmq-kombu"])
def broker(request, uid) -> BrokerConfig:
    if request.param.startswith("redis"):
        url = request.getfixturevalue("redis_url")
        # the fleet's own options, key prefix included: the events must still flow
        return BrokerConfig(url=url, transport_options={"global_keyprefix": f"{uid}:"}, connect_timeout=2)
    return BrokerConfig(url=request.getfixturevalue("rabbitmq_url"), connect_timeout=2)


@pytest.fixture
def make(request):
    """``make(broker, **kwargs)``: a new source of the kind the ``broker`` parameter names."""
    return lambda broker, **kwargs: new_source(request.node.callspec.params["broker"].split("-")[1], broker, **kwargs)


@pytest.fixture
def sources():
    started: list[ThreadedSource] = []

    def _start(src: ThreadedSource) -> ThreadedSource:
        started.append(src)
        src.start()
        return src

    yield _start
    for s in started:
        s.stop()


def client_for(broker: BrokerConfig):
    return celery_app(broker.url.get_secret_value(), broker.transport_options or None)


def seen(src: ThreadedSource, hostname: str):
    return src.snapshot().workers.get(hostname)


def test_worker_seen_on_our_clock_and_sigkill_sends_nothing(broker, make, uid, spawn, sources):
    # A clock 1000 s ahead of the worker's: every time we record must come from it.
    skew = 1000.0
    events = Events()
    src = sources(make(broker, clock=lambda: time.time() + skew, on_event=events))
    wait_for(lambda: src.snapshot().listening_since, 5, what="listening")
    hostname = f"celery@{uid}-hb"
    w = spawn(broker, hostname)
    wait_ping(client_for(broker), hostname, timeout=30)
    ws = wait_for(lambda: seen(src, hostname), 3, what=f"{hostname} seen")

    assert ws.pid == w.pid
    assert ws.freq == 2.0
    assert ws.offline_at is None
    assert abs(ws.last_heartbeat - (time.time() + skew)) < 5, "stamped with the supervisor's clock"
    assert "worker-online" in events.kinds(hostname) or "worker-heartbeat" in events.kinds(hostname)
    # heartbeats keep coming every ~2 s
    first = ws.last_heartbeat
    wait_for(lambda: seen(src, hostname).last_heartbeat > first, 4, what="a further heartbeat")

    w.kill(signal.SIGKILL)
    w.proc.wait(5)
    time.sleep(0.3)  # a heartbeat already in flight may still land
    last = seen(src, hostname).last_heartbeat
    time.sleep(4.5)  # more than two heartbeat intervals
    after = seen(src, hostname)
    assert after.last_heartbeat == last, "no heartbeat after SIGKILL"
    assert after.offline_at is None, "a killed worker never says worker-offline"
    assert "worker-offline" not in events.kinds(hostname)
    snap = src.snapshot()
    assert isinstance(snap, HeartbeatSnapshot) and snap.error is None and snap.listening_since is not None


def test_sigterm_sets_offline_at(broker, make, uid, spawn, sources):
    src = sources(make(broker))
    hostname = f"celery@{uid}-term"
    w = spawn(broker, hostname)
    wait_ping(client_for(broker), hostname, timeout=30)
    ws = wait_for(lambda: seen(src, hostname), 3, what=f"{hostname} seen")
    assert ws.offline_at is None

    before = time.time()
    w.kill(signal.SIGTERM)
    ws = wait_for(lambda: seen(src, hostname).offline_at, 5, what="worker-offline") and seen(src, hostname)
    assert before - 0.5 <= ws.offline_at <= time.time() + 0.5
    assert ws.last_heartbeat is not None and ws.last_heartbeat <= ws.offline_at
    w.proc.wait(15)
    assert seen(src, hostname).offline_at == ws.offline_at


def test_task_events_never_reach_the_source(broker, make, uid, spawn, sources):
    ours, everything = Events(), Events()
    src = sources(make(broker, on_event=ours))
    flower_like = sources(AllEvents(make_app(broker), on_event=everything))
    wait_for(
        lambda: src.snapshot().listening_since and flower_like.snapshot().listening_since, 5, what="listening"
    )
    queue = f"{uid}-tasks"
    hostname = f"celery@{uid}-ev"
    spawn(broker, hostname, queues=queue)
    client = client_for(broker)
    wait_ping(client, hostname, timeout=30)
    # someone (Flower, an operator) turned task events on for this worker
    assert client.control.enable_events(destination=[hostname], reply=True, timeout=5)
    for i in range(10):
        client.send_task("tasks.add", (i, i), queue=queue)
    wait_for(
        lambda: everything.kinds(hostname).count("task-succeeded") >= 10, 15, what="10 task-succeeded events"
    )
    wait_for(lambda: "worker-heartbeat" in ours.kinds(hostname), 5, what="a heartbeat")

    assert set(ours.kinds()) <= {"worker-online", "worker-heartbeat", "worker-offline"}, ours.kinds()
    assert src.other_events == 0
    assert flower_like.other_events >= 10  # the task events were there to be had


def test_broker_outage_then_heartbeats_resume(own_redis, kind, uid, spawn, sources):
    broker = BrokerConfig(url=f"{own_redis.url}/0", connect_timeout=1)
    src = sources(new_source(kind, broker, backoff=(0.2, 1.0)))
    hostname = f"celery@{uid}-out"
    spawn(broker, hostname)
    wait_ping(client_for(broker), hostname, timeout=30)
    wait_for(lambda: seen(src, hostname), 3, what=f"{hostname} seen")
    first_since = src.snapshot().listening_since
    assert first_since is not None

    own_redis.stop()
    snap = wait_for(
        lambda: (s := src.snapshot()).listening_since is None and s.error and s, 5, what="disconnect noticed"
    )
    assert str(own_redis.port) in snap.error
    time.sleep(1.5)  # a few failed reconnects, with backoff
    assert src.running, "no exception escaped the thread"
    assert src.snapshot().listening_since is None

    restarted = time.time()
    own_redis.start()
    since = wait_for(lambda: src.snapshot().listening_since, 5, what="reconnected")
    assert since >= restarted > first_since
    assert src.snapshot().error is None
    # the worker reconnects on its own; its heartbeats reach us again
    wait_for(lambda: seen(src, hostname).last_heartbeat > restarted, 20, what="heartbeats after the outage")

    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 2.5
    assert not src.running


def test_reconnects_do_not_grow_the_binding_set(own_redis, kind, sources):
    broker = BrokerConfig(url=f"{own_redis.url}/0", connect_timeout=1)
    r = redis.Redis.from_url(broker.url.get_secret_value())
    src = sources(new_source(kind, broker, backoff=(0.1, 0.5)))
    wait_for(lambda: src.snapshot().listening_since, 5, what="listening")
    members = r.smembers(BINDINGS)
    if kind == "lean":  # a plain PSUBSCRIBE: nothing is written to Redis at all
        assert members == set()
    else:
        assert len(members) == 1 and src.node_id.encode() in next(iter(members))

    for n in range(3):
        connects = src.connects
        # drop our connections without losing Redis's data (a proxy restart, a failover)
        r.client_kill_filter(_type="pubsub")
        r.client_kill_filter(_type="normal", skipme=True)
        wait_for(
            lambda c=connects: src.connects > c and src.snapshot().listening_since, 5, what=f"reconnect {n}"
        )
        assert r.smembers(BINDINGS) == members

    # a clean stop takes our member away: supervisor restarts do not pile them up either
    src.stop()
    assert r.smembers(BINDINGS) == set()


def test_unreachable_broker_is_reported_not_raised(kind, sources):
    # a password in the URL, a closed port, and a port that accepts but never answers
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        for port in (free_port(), hole.getsockname()[1]):
            broker = BrokerConfig(url=f"redis://:hunter2secret@127.0.0.1:{port}/0", connect_timeout=0.5)
            src = sources(new_source(kind, broker, backoff=(0.2, 0.5)))
            snap = wait_for(lambda s=src: s.snapshot().error and s.snapshot(), 5, what="an error")
            assert snap.listening_since is None and snap.workers == {}
            assert f"127.0.0.1:{port}" in snap.error
            assert "hunter2secret" not in snap.error
            assert src.running
            t0 = time.monotonic()
            src.stop()
            assert time.monotonic() - t0 < 2.5
    finally:
        hole.close()


def test_rabbitmq_cut_and_silent_connections_are_survived(rabbitmq_url, uid, spawn, sources):
    direct = BrokerConfig(url=rabbitmq_url, connect_timeout=2)
    parts = urlsplit(rabbitmq_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    via_proxy = BrokerConfig(url=urlunsplit(parts._replace(netloc=netloc)), connect_timeout=2)
    try:
        src = sources(EventReceiverSource(make_app(via_proxy), backoff=(0.2, 1.0), amqp_heartbeat=2))
        hostname = f"celery@{uid}-cut"
        spawn(direct, hostname)  # the worker talks to RabbitMQ directly: only we lose the broker
        wait_ping(client_for(direct), hostname, timeout=30)
        wait_for(lambda: seen(src, hostname), 3, what=f"{hostname} seen")

        # 1. the connection is cut (broker restart, failover): noticed at once, then resumed
        cut = time.time()
        proxy.kill()
        wait_for(lambda: src.snapshot().listening_since is None or src.connects > 1, 5, what="cut noticed")
        since = wait_for(
            lambda: (s := src.snapshot().listening_since) and s > cut and s, 10, what="reconnect"
        )
        wait_for(lambda: seen(src, hostname).last_heartbeat > since, 5, what="heartbeats after the cut")

        # 2. the broker goes silent without closing anything: AMQP heartbeats find out
        proxy.mode = "blackhole"
        snap = wait_for(
            lambda: (s := src.snapshot()).listening_since is None and s, 15, what="silence noticed"
        )
        assert snap.error and f"guest:****@127.0.0.1:{proxy.port}" in snap.error  # redacted URL
        assert src.running
        healed = time.time()
        proxy.mode = "forward"
        proxy.kill()  # the half-dead connections stay dead
        since = wait_for(lambda: src.snapshot().listening_since, 15, what="reconnect after the silence")
        assert since >= healed
        wait_for(lambda: seen(src, hostname).last_heartbeat > since, 5, what="heartbeats after the silence")
    finally:
        proxy.close()


def test_redis_cut_and_silent_connections_are_survived(redis_url, kind, uid, spawn, sources):
    # the worker talks to Redis directly; only the source goes through a proxy that can cut its
    # connection or go silent (no FIN, no RST): a PING every liveness_interval finds the silence
    direct = BrokerConfig(url=redis_url, connect_timeout=1)
    parts = urlsplit(redis_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    via_proxy = BrokerConfig(url=urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}")), connect_timeout=1)
    try:
        src = sources(new_source(kind, via_proxy, backoff=(0.2, 1.0), liveness_interval=1.0))
        hostname = f"celery@{uid}-rcut"
        spawn(direct, hostname)
        wait_ping(client_for(direct), hostname, timeout=30)
        wait_for(lambda: seen(src, hostname), 5, what=f"{hostname} seen")
        first = src.snapshot().listening_since

        # 1. the connection is cut: noticed, re-subscribed, heartbeats flow again
        cut = time.time()
        proxy.kill()
        since = wait_for(lambda: (s := src.snapshot().listening_since) and s > cut and s, 10, what="reconnect")
        assert since > first and src.connects >= 2
        wait_for(lambda: seen(src, hostname).last_heartbeat > since, 6, what="heartbeats after the cut")

        # 2. silence: the PING goes unanswered, the stream is reported down with the reason
        proxy.mode = "blackhole"
        snap = wait_for(lambda: (s := src.snapshot()).listening_since is None and s, 15, what="silence noticed")
        assert snap.error and f"127.0.0.1:{proxy.port}" in snap.error
        assert src.running
        healed = time.time()
        proxy.mode = "forward"
        proxy.kill()
        since = wait_for(lambda: src.snapshot().listening_since, 15, what="reconnect after the silence")
        assert since >= healed and src.snapshot().error is None
        wait_for(lambda: seen(src, hostname).last_heartbeat > since, 6, what="heartbeats after the silence")
    finally:
        proxy.close()
