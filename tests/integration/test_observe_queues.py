"""Queue backlogs as the broker holds them, on real Redis and RabbitMQ.

What an on-call engineer relies on: the number we alert on is the number of messages really
waiting. On Redis that means every priority bucket (LLEN of the queue name alone misses them),
with the fleet's own separator and key prefix; on RabbitMQ the prefetched (unacknowledged)
messages a worker holds count too. A missing or emptied queue is 0, not an error; a dead broker
is an error, quickly.
"""

from __future__ import annotations

import socket
import time

import pytest
import redis
from kombu import Connection

from supervisor.config import BrokerConfig
from supervisor.observe.celeryapp import BrokerUnreachable, make_app
from supervisor.observe.queues import QueueReader
from tests.support.brokers import delete_rabbitmq_queues, free_port
from tests.support.workers import Worker, celery_app, wait_ping

SECRET = "hunter2secret"


def reader(broker: BrokerConfig) -> QueueReader:
    return QueueReader(broker, make_app(broker))


def publish(
    broker: BrokerConfig, queue: str, priorities: list[int], task: str = "tasks.add", args=(1, 2)
) -> None:
    """Publish as the fleet does: a Celery app with the same transport options."""
    client = celery_app(broker.url.get_secret_value(), broker.transport_options or None)
    with client.producer_or_acquire() as producer:
        for p in priorities:
            client.send_task(task, args, queue=queue, priority=p, producer=producer)


def timed(fn, *args):
    t0 = time.monotonic()
    try:
        return fn(*args), time.monotonic() - t0
    except Exception as exc:
        return exc, time.monotonic() - t0


@pytest.fixture
def rabbit_queues(rabbitmq_url):
    """Names of RabbitMQ queues to delete after the test (they outlive it otherwise)."""
    names: list[str] = []
    yield names
    delete_rabbitmq_queues(rabbitmq_url, names)


# ---------------------------------------------------------------- Redis
def test_redis_counts_every_priority_bucket(redis_url, uid):
    opts = {
        "priority_steps": [0, 3, 6, 9],
        "sep": ":",
        "global_keyprefix": f"{uid}/",
        "queue_order_strategy": "priority",
    }
    broker = BrokerConfig(url=redis_url, transport_options=opts)
    busy, emptied, never = f"{uid}-busy", f"{uid}-emptied", f"{uid}-never"
    priorities = [p for p in range(10) for _ in range(p + 1)]  # 55 messages over all ten priorities
    publish(broker, busy, priorities)
    publish(broker, emptied, [0, 5, 9])

    r = redis.Redis.from_url(redis_url)
    assert r.llen(f"{uid}/{busy}") < len(priorities), "the buckets are where kombu put them"
    assert r.exists(f"{uid}/{busy}:9")

    qr = reader(broker)
    got = qr.read([busy, emptied, never])
    assert got[busy].length == len(priorities) and got[busy].ready == len(priorities)
    assert got[busy].error is None
    assert got[emptied].length == 3
    assert got[never].length == 0 and got[never].error is None

    # every list Redis holds for that queue, counted by hand, agrees
    lists = [k for k in r.scan_iter(match=f"{uid}/{busy}*") if r.type(k) == b"list"]
    assert len(lists) == 4 and sum(r.llen(k) for k in lists) == len(priorities)

    # drained by a consumer: the queue existed, is empty now, and reads 0 (kombu's passive
    # declare would raise 404 here)
    with Connection(redis_url, transport_options=opts) as conn:
        assert conn.default_channel.queue_purge(emptied) == 3
    got = qr.read([emptied, busy])
    assert got[emptied].length == 0 and got[emptied].error is None
    assert got[busy].length == len(priorities)
    qr.close()


def test_redis_default_options_and_custom_sep_do_not_mix(redis_url, uid):
    # a fleet on kombu's defaults (sep "\x06\x16", steps 0,3,6,9)
    broker = BrokerConfig(url=redis_url)
    name = f"{uid}-default"
    publish(broker, name, [0, 1, 4, 7, 9, 9])
    assert reader(broker).read([name])[name].length == 6
    # read with another separator, the buckets are not found: the options must be the fleet's
    other = BrokerConfig(url=redis_url, transport_options={"sep": ":"})
    assert reader(other).read([name])[name].length == 2  # priorities 0 and 1 share the plain list


def test_redis_down_raises_quickly_and_recovers(own_redis, uid):
    plain = BrokerConfig(url=f"{own_redis.url}/0", connect_timeout=1)
    # the same server as a user would configure it, password included (only used while it is down)
    broker = BrokerConfig(url=f"redis://:{SECRET}@127.0.0.1:{own_redis.port}/0", connect_timeout=1)
    name = f"{uid}-q"
    publish(plain, name, [0, 9])
    qr = reader(plain)
    assert qr.read([name])[name].length == 2

    own_redis.stop()
    exc, took = timed(qr.read, [name])
    assert isinstance(exc, BrokerUnreachable), exc
    assert took < 1 + 1.5
    exc, took = timed(reader(broker).read, [name])
    assert isinstance(exc, BrokerUnreachable), exc
    assert took < 1 + 1.5
    assert SECRET not in str(exc) and f"127.0.0.1:{own_redis.port}" in str(exc)

    own_redis.start()  # an empty server again (nothing persisted)
    assert qr.read([name])[name].length == 0  # the same reader reconnects by itself
    publish(plain, name, [3])
    assert qr.read([name])[name].length == 1


def test_black_holed_broker_does_not_hang():
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        port = hole.getsockname()[1]
        for url in (f"redis://:{SECRET}@127.0.0.1:{port}/0", f"amqp://guest:{SECRET}@127.0.0.1:{port}//"):
            exc, took = timed(reader(BrokerConfig(url=url, connect_timeout=1)).read, ["q"])
            assert isinstance(exc, BrokerUnreachable), exc
            assert took < 1 + 1.5
            assert SECRET not in str(exc)
    finally:
        hole.close()


# ---------------------------------------------------------------- RabbitMQ
def test_rabbitmq_passive_declare_counts_ready(rabbitmq_url, uid, rabbit_queues):
    broker = BrokerConfig(url=rabbitmq_url)
    name, missing = f"{uid}-ready", f"{uid}-missing"
    rabbit_queues.append(name)
    publish(broker, name, [0] * 7)
    qr = reader(broker)
    # a missing queue first: RabbitMQ closes the channel on 404, the next read must still work
    got = qr.read([missing, name, missing])
    assert got[missing].length == 0 and got[missing].error is None
    assert got[name].length == 7 and got[name].ready == 7
    assert got[name].consumers == 0
    assert got[name].unacked is None  # not measured without the management API
    assert qr.read([name])[name].length == 7
    qr.close()


def test_rabbitmq_management_counts_prefetched_messages(
    rabbitmq_url, rabbitmq_mgmt_url, uid, rabbit_queues, tmp_path
):
    broker = BrokerConfig(url=rabbitmq_url, management_url=rabbitmq_mgmt_url)
    name = f"{uid}-held"
    rabbit_queues.append(name)
    hostname = f"celery@{uid}-holder"
    # one solo worker: it runs one long task and prefetches 3 more (prefetch multiplier 4)
    w = Worker(rabbitmq_url, hostname, queues=name, log=tmp_path / "worker.log")
    try:
        wait_ping(celery_app(rabbitmq_url), hostname, timeout=30)
        publish(broker, name, [0] * 10, task="tasks.sleep", args=(60,))
        qr = reader(broker)
        passive_only = reader(BrokerConfig(url=rabbitmq_url))
        deadline = time.monotonic() + 15  # management statistics lag up to ~5 s
        while True:
            got = qr.read([name])[name]
            if got.unacked and got.length == 10 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got.error is None
        assert got.consumers == 1
        assert got.unacked >= 1, got
        assert got.ready + got.unacked == got.length == 10, got
        ready_only = passive_only.read([name])[name]
        assert ready_only.length == got.ready < 10  # what a passive declare alone would have said
    finally:
        w.stop()


def test_rabbitmq_management_failure_falls_back(rabbitmq_url, uid, rabbit_queues):
    port = free_port()
    broker = BrokerConfig(
        url=rabbitmq_url, management_url=f"http://guest:{SECRET}@127.0.0.1:{port}", connect_timeout=1
    )
    name = f"{uid}-fallback"
    rabbit_queues.append(name)
    publish(broker, name, [0] * 4)
    got, took = timed(reader(broker).read, [name])
    got = got[name]
    assert got.length == 4 and got.ready == 4 and got.unacked is None
    assert got.error and "management API" in got.error and f"127.0.0.1:{port}" in got.error
    assert SECRET not in got.error
    assert took < 1 + 1.5


def test_rabbitmq_down_raises():
    broker = BrokerConfig(url=f"amqp://guest:{SECRET}@127.0.0.1:{free_port()}//", connect_timeout=1)
    exc, took = timed(reader(broker).read, ["q"])
    assert isinstance(exc, BrokerUnreachable), exc
    assert SECRET not in str(exc) and "cannot connect to amqp://guest:****@127.0.0.1:" in str(exc)
    assert took < 2.5
