"""RabbitMQ is shared by everything on a machine: each test gets a vhost of its own (tests/conftest.py
``rabbitmq_vhost``), so that workers, consumers and queues of other runs -- on "/" or anywhere else --
are never counted. The vhost's name starts with "/", as many real ones do ("/prod"): the broker URL
carries it as %2F..., the management API path too.

Here: a real worker on another vhost answers broadcasts there, and nothing of it reaches a
supervisor on the test's vhost (pings, active_queues, heartbeats, queue lengths with the
management API)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from supervisor.config import BrokerConfig
from supervisor.observe.celeryapp import make_app
from supervisor.observe.control import active_queues, ping
from supervisor.observe.heartbeats import EventReceiverSource
from supervisor.observe.queues import QueueReader
from tests.support.brokers import RabbitVhost
from tests.support.workers import Worker, celery_app, wait_ping

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def foreign(rabbitmq_vhost, uid, tmp_path):
    """Someone else's worker on another vhost of the same broker."""
    other = RabbitVhost().create()
    w = Worker(other.url, f"celery@{uid}-foreign", queues=f"{uid}-foreign-q", log=tmp_path / "foreign.log")
    try:
        wait_ping(celery_app(other.url), w.hostname, 30)
        yield other, w
    finally:
        w.stop()
        other.delete()


def test_a_test_vhost_is_its_own_and_percent_encoded(rabbitmq_vhost, rabbitmq_url):
    assert rabbitmq_vhost.name.startswith("/") and rabbitmq_vhost.name != "/"
    assert urlsplit(rabbitmq_url).path == "/%2F" + rabbitmq_vhost.name[1:]
    from kombu import Connection

    assert Connection(rabbitmq_url).virtual_host == rabbitmq_vhost.name


def test_workers_on_another_vhost_are_not_seen(rabbitmq_url, rabbitmq_mgmt_url, foreign, uid):
    other, w = foreign
    ours = make_app(BrokerConfig(url=rabbitmq_url, connect_timeout=2))
    theirs = make_app(BrokerConfig(url=other.url, connect_timeout=2))
    # the foreign worker is really there, answering broadcasts on its vhost ...
    assert active_queues(theirs, 1, 2.0) == {w.hostname: [f"{uid}-foreign-q"]}
    # ... and nothing of it reaches ours
    assert active_queues(ours, 1, 1.0) == {}
    assert ping(ours, [w.hostname], 1.0) == set()
    src = EventReceiverSource(ours)
    src.start()
    try:
        time.sleep(5)  # more than two heartbeat intervals of the foreign worker
        snap = src.snapshot()
        assert snap.listening_since is not None, snap.error
        assert snap.workers == {}
    finally:
        src.stop()
    # the foreign worker's queue does not exist on our vhost; the API path encodes our "/..." name
    reader = QueueReader(BrokerConfig(url=rabbitmq_url, management_url=rabbitmq_mgmt_url), ours)
    try:
        got = reader.read([f"{uid}-foreign-q"])[f"{uid}-foreign-q"]
        assert got.length == 0 and got.consumers == 0 and got.error is None
    finally:
        reader.close()
