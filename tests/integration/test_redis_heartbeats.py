"""The lean Redis heartbeat source follows the fleet's own channel layout, and nothing else.

Events are published the way workers publish them: through celery's own ``EventDispatcher`` on a
Celery app with the fleet's URL and transport options (db number, ``global_keyprefix``,
``fanout_prefix``, ``fanout_patterns``, Sentinel with ``sentinel_fanout_compat``), against a real
redis-server (and a real Sentinel). A neighbour fleet on another database or key prefix of the same
server must stay invisible; a message the source cannot read is counted, never fatal.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from supervisor.config import BrokerConfig
from supervisor.embedded_redis import SentinelServer
from supervisor.observe.celeryapp import make_app
from supervisor.observe.redis_heartbeats import RedisHeartbeatSource
from tests.integration.test_observe_heartbeats import Events, wait_for
from tests.support.workers import celery_app

pytestmark = pytest.mark.redis


@pytest.fixture
def sources():
    started: list[RedisHeartbeatSource] = []

    def _start(broker: BrokerConfig, **kwargs) -> RedisHeartbeatSource:
        src = RedisHeartbeatSource(broker, app=make_app(broker), **kwargs)
        started.append(src)
        src.start()
        wait_for(lambda: src.snapshot().listening_since, 5, what="listening")
        return src

    yield _start
    for s in started:
        s.stop()


def publish(url: str, options: dict | None, hostname: str, kinds=("worker-online", "worker-heartbeat"),
            serializer: str | None = None, **fields) -> None:
    """Worker events (and a task event) as a worker of that fleet sends them."""
    app = celery_app(url, options)
    try:
        with app.connection_for_write() as conn:
            d = app.events.Dispatcher(conn, hostname=hostname, enabled=True, serializer=serializer)
            for k in kinds:
                d.send(k, freq=2.0, active=1, processed=7, **fields)
    finally:
        app.close()


LAYOUTS = {
    "plain": {},
    "global_keyprefix with glob characters": {"global_keyprefix": "fleet*[a]?:"},
    "fanout_prefix string": {"fanout_prefix": "/custom{db}."},
    "fanout_prefix off": {"fanout_prefix": False},
    "fanout_patterns off": {"fanout_patterns": False},
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_the_fleets_layout_is_followed_and_neighbours_stay_invisible(redis_server, layout, uid, sources):
    options = dict(LAYOUTS[layout])
    ours = f"{redis_server.url}/7"
    events = Events()
    src = sources(BrokerConfig(url=ours, transport_options=options, connect_timeout=2), on_event=events)

    mine = f"celery@{uid}-mine"
    publish(ours, options, mine, kinds=("worker-online", "worker-heartbeat", "task-succeeded"), uuid="t1")
    # neighbours on the same server: another database, and (when we have one) another key prefix
    publish(f"{redis_server.url}/8", options, f"celery@{uid}-other-db")
    if options.get("global_keyprefix"):
        publish(ours, {**options, "global_keyprefix": "fleetX[a]y:"}, f"celery@{uid}-other-prefix")
    publish(ours, {**options, "global_keyprefix": "another:"}, f"celery@{uid}-other-prefix2")

    ws = wait_for(lambda: src.snapshot().workers.get(mine), 5, what=f"{mine} seen")
    time.sleep(0.5)  # what else could arrive has arrived
    # as with kombu: without the fanout prefix the channel names no database (kombu 3's layout)
    expected = {mine, f"celery@{uid}-other-db"} if layout == "fanout_prefix off" else {mine}
    assert set(src.snapshot().workers) == expected
    assert (ws.active, ws.processed, ws.freq) == (1, 7, 2.0) and ws.online_at is not None
    assert events.kinds(mine) == ["worker-online", "worker-heartbeat"]
    # with fanout_patterns off Redis cannot filter: the task event arrives and is dropped undecoded
    assert src.other_events == (1 if layout == "fanout_patterns off" else 0)
    assert src.bad_messages == 0


def test_unreadable_messages_are_counted_not_fatal(redis_url, uid, sources, caplog):
    broker = BrokerConfig(url=redis_url, connect_timeout=2)
    src = sources(broker)
    channel = f"{src.patterns[0][:-1]}heartbeat"  # "/{db}.celeryev/worker.heartbeat"
    r = redis.Redis.from_url(redis_url)

    # a fleet with event_serializer pickle (never unpickled), garbage, an envelope without a body,
    # a compressed body, and an event list holding a non-object: five unreadable messages
    publish(redis_url, None, f"celery@{uid}-pickled", kinds=("worker-heartbeat",), serializer="pickle")
    r.publish(channel, b"\x80\x04not json")
    r.publish(channel, json.dumps({"content-type": "application/json", "properties": {}}))
    r.publish(channel, json.dumps({"body": "eJw=", "content-type": "application/json",
                                   "headers": {"compression": "application/x-gzip"}}))
    r.publish(channel, json.dumps({"body": json.dumps([{"type": "worker-heartbeat", "hostname": f"celery@{uid}-l"},
                                                       "not an event"]),
                                   "content-type": "application/json", "content-encoding": "utf-8",
                                   "properties": {"body_encoding": "utf-8"}}))
    wait_for(lambda: src.bad_messages >= 5, 5, what="five bad messages counted")
    # the stream is still up, on its first connection, and readable events still count
    publish(redis_url, None, f"celery@{uid}-fine", kinds=("worker-heartbeat",))
    wait_for(lambda: f"celery@{uid}-fine" in src.snapshot().workers, 5, what="a good event after bad ones")
    assert set(src.snapshot().workers) == {f"celery@{uid}-l", f"celery@{uid}-fine"}
    assert src.bad_messages == 5 and src.connects == 1 and src.snapshot().error is None


def test_sentinel_with_kombu_compat_topics_takes_each_event_once(redis_server, uid, sources):
    sentinel = SentinelServer(redis_server, master_name=f"m{uid}").start()
    try:
        wait_for(lambda: sentinel.master_address() == ("127.0.0.1", redis_server.port), 10, what="sentinel ready")
        url = f"sentinel://127.0.0.1:{sentinel.port}/4"
        options = {"master_name": f"m{uid}", "sentinel_fanout_compat": True}
        events = Events()
        src = sources(BrokerConfig(url=url, transport_options=options, connect_timeout=2), on_event=events)
        assert src.patterns == ["/4.celeryev/worker.*", "/{db}.celeryev/worker.*"]
        new = f"celery@{uid}-new"
        publish(url, options, new, kinds=("worker-heartbeat",))  # kombu 5.7 with compat: both topics
        old = f"celery@{uid}-old"
        redis.Redis(port=redis_server.port).publish(  # kombu < 5.4 on Sentinel: the literal topic only
            "/{db}.celeryev/worker.heartbeat",
            json.dumps({"body": json.dumps({"type": "worker-heartbeat", "hostname": old, "freq": 2.0}),
                        "content-type": "application/json", "content-encoding": "utf-8",
                        "properties": {"body_encoding": "utf-8", "delivery_tag": "x-1"}}))
        wait_for(lambda: {new, old} <= set(src.snapshot().workers), 5, what="both workers seen")
        time.sleep(0.3)
        assert events.kinds(new) == ["worker-heartbeat"], "a message published on both topics counts once"
    finally:
        sentinel.close()
