"""The lean source reads the stream by the batch (everything one drain found): each message decoded,
then the batch's worker events applied together, stamped with one reading of our clock. Recorded
messages (a capture of celery 5.7 / kombu 5.7's envelope), an injected clock, no Redis."""

import base64
import json
import threading

import pytest

from supervisor.config import BrokerConfig
from supervisor.observe import redis_heartbeats
from supervisor.observe.redis_heartbeats import RedisHeartbeatSource

# what kombu 5.7 PUBLISHed for celery 5.7's EventDispatcher.send("worker-heartbeat", ...) (captured on Redis)
RECORDED = (
    b'{"body": "eyJob3N0bmFtZSI6ICJjZWxlcnlAY2FwLTEiLCAidXRjb2Zmc2V0IjogMC4wLCAicGlkIjogMTA5NzQsICJjbG9j'
    b'ayI6IDEsICJmcmVxIjogMi4wLCAiYWN0aXZlIjogMSwgInByb2Nlc3NlZCI6IDMsICJsb2FkYXZnIjogWzAuMSwgMC4xLCAwLj'
    b'FdLCAic3dfaWRlbnQiOiAicHktY2VsZXJ5IiwgInN3X3ZlciI6ICI1LjcuMCIsICJzd19zeXMiOiAiTGludXgiLCAidGltZXN0'
    b'YW1wIjogMTc5NjU3NDIwMS4yODQyNjQsICJ0eXBlIjogIndvcmtlci1oZWFydGJlYXQifQ==", "content-encoding": "utf'
    b'-8", "content-type": "application/json", "headers": {"hostname": "celery@cap-1"}, "properties": {"'
    b'delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}, "p'
    b'riority": 0, "body_encoding": "base64", "delivery_tag": "e8bb770a-74f0-4f37-aef7-a0930c804a5d"}}'
)


def envelope(events, *, ctype="application/json", compression=None, routing_key="worker.heartbeat") -> bytes:
    """The recorded envelope with another body (same keys, same order, as kombu writes it)."""
    env = json.loads(RECORDED)
    env["body"] = base64.b64encode(json.dumps(events).encode()).decode()
    env["content-type"] = ctype
    env["properties"]["delivery_info"]["routing_key"] = routing_key
    if compression:
        env["headers"]["compression"] = compression
    return json.dumps(env).encode()


def heartbeat(host: str, **fields) -> dict:
    return {"hostname": host, "utcoffset": 0, "pid": 4242, "clock": 1, "freq": 2.0, "active": 0, "processed": 7,
            "timestamp": 1.0, "type": "worker-heartbeat", **fields}


class Clock:
    """1000.0, then a second later at each reading: records stamped alike were stamped by one reading."""

    def __init__(self) -> None:
        self.now = 999.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def source():
    clock = Clock()
    src = RedisHeartbeatSource(BrokerConfig(url="redis://127.0.0.1:1/0"), clock=clock)
    src._fast = True  # as _consume sets it for kombu's default layout (one pattern, fanout_patterns on)
    return src, clock


def test_the_recorded_envelope_is_read_as_celery_sent_it(source):
    src, clock = source
    src._messages([RECORDED])
    w = src.snapshot().workers["celery@cap-1"]
    assert (w.active, w.processed, w.pid, w.freq) == (1, 3, 10974, 2.0)
    assert w.last_heartbeat == clock.now == 1000.0  # our clock, never the worker's timestamp (1796574201.28)
    assert (src.bad_messages, src.other_events) == (0, 0)


def test_a_batch_is_stamped_once_and_every_odd_message_is_counted_not_fatal(source):
    src, _ = source
    forged = "celery@x\nFIRING worker_lost"
    batch = [
        envelope(heartbeat("celery@a-1", active=2)),
        envelope([heartbeat("celery@a-2"), {"type": "task-succeeded", "hostname": "celery@a-2", "uuid": "u"}]),
        envelope(heartbeat("celery@a-3"), ctype="application/x-python-serialize"),  # never unpickled
        envelope(heartbeat("celery@a-4"), compression="application/x-gzip"),
        b'{"body": "!!!not base64 at all", "content-type": "application/json"}',
        envelope(heartbeat(forged)),  # a hostname is data: refused, logged once
        envelope(["not an event"]),
        envelope(heartbeat("celery@a-1", active=5, processed=9)),  # the same worker again, later in the batch
        envelope({"hostname": "celery@a-5", "type": "worker-online", "pid": "77", "freq": 2, "active": None}),
    ]
    src._messages(batch)
    ws = src.snapshot().workers
    assert sorted(ws) == ["celery@a-1", "celery@a-2", "celery@a-5"]
    assert len({w.last_heartbeat for w in ws.values()}) == 1  # one reading of the clock for the drain
    assert (ws["celery@a-1"].active, ws["celery@a-1"].processed) == (5, 9)  # the last one in the batch wins
    a5 = ws["celery@a-5"]
    assert (a5.online_at, a5.pid, a5.freq, a5.active) == (a5.last_heartbeat, 77, 2.0, None)  # "77": 77, 2: 2.0
    assert src.other_events == 1  # the task event in the list: dropped, counted
    assert src.bad_messages == 4  # pickle, gzip, bad base64, a list holding a string


@pytest.mark.parametrize("decoder", ["orjson", "json"])
def test_orjson_and_the_stdlib_fallback_read_the_same(source, decoder, monkeypatch):
    src, _ = source
    if decoder == "json":  # where no orjson wheel exists
        monkeypatch.setattr(redis_heartbeats, "_loads", json.loads)
    else:
        import orjson

        assert redis_heartbeats._loads is orjson.loads
    src._messages([RECORDED, envelope(heartbeat("celery@b-1", active="3", processed=2**40))])
    ws = src.snapshot().workers
    assert (ws["celery@cap-1"].processed, ws["celery@b-1"].active, ws["celery@b-1"].processed) == (3, 3, 2**40)


def test_callbacks_run_after_the_lock_is_released_once_per_worker_heard(source):
    src, _ = source
    heard, told = [], []

    def on_heard(hostname, at):  # what the loop does: it reads the source again (a deadlock if locked)
        heard.append((hostname, at, hostname in src.snapshot().workers))

    src.on_heard = on_heard
    src.on_event = lambda kind, hostname, at: told.append((kind, hostname))
    t = threading.Thread(target=src._messages, args=([envelope(heartbeat("celery@c-1")),
                                                      envelope(heartbeat("celery@c-2")),
                                                      envelope(heartbeat("celery@c-1"))],))
    t.start()
    t.join(5)
    assert not t.is_alive(), "a callback ran under the source's lock"
    assert heard == [("celery@c-1", 1000.0, True), ("celery@c-2", 1000.0, True)]  # c-1's first time only
    assert told == [("worker-heartbeat", "celery@c-1"), ("worker-heartbeat", "celery@c-2"),
                    ("worker-heartbeat", "celery@c-1")]
    src._messages([envelope({"hostname": "celery@c-1", "type": "worker-offline"}), envelope(heartbeat("celery@c-1"))])
    assert [h for h, _, _ in heard] == ["celery@c-1", "celery@c-2", "celery@c-1"]  # back after worker-offline


def test_a_drain_stamps_its_events_no_later_than_they_arrived():
    """Each drain's events carry the moment the drain before it read the socket: never after their
    arrival, at most about two drain intervals before it. A real socket pair plays Redis."""
    import socket
    import time

    from supervisor.observe.redis_heartbeats import Resp2Reader

    src = RedisHeartbeatSource(BrokerConfig(url="redis://127.0.0.1:1/0"), drain_interval=0.2)
    src._fast = True
    ours, redis_side = socket.socketpair()
    t = threading.Thread(target=src._drain, args=(None, Resp2Reader(ours)), daemon=True)
    t.start()
    try:
        arrivals = {}
        for i in range(6):
            time.sleep(0.07 * (i + 1))  # at every phase of the drain
            data = envelope(heartbeat(f"celery@s-{i}"))
            frame = b"*4\r\n$8\r\npmessage\r\n$1\r\np\r\n$1\r\nc\r\n$%d\r\n%s\r\n" % (len(data), data)
            arrivals[f"celery@s-{i}"] = time.time()
            redis_side.sendall(frame)
        deadline = time.monotonic() + 5
        while len(src.snapshot().workers) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        ws = src.snapshot().workers
        assert sorted(ws) == sorted(arrivals)
        for host, arrived in arrivals.items():
            early = arrived - ws[host].last_heartbeat
            assert 0 <= early <= 2 * 0.2 + 0.1, (host, early)
    finally:
        src._stop.set()
        t.join(2)
        ours.close()
        redis_side.close()
