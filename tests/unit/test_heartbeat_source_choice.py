"""Which heartbeat source follows a broker: the lean Redis reader for every Redis-family URL,
celery's event receiver for RabbitMQ (and when SUPERVISOR_HEARTBEAT_SOURCE=kombu asks for it).
No broker needed: building a source connects to nothing."""

import logging

import pytest

from supervisor.config import BrokerConfig
from supervisor.observe import heartbeats
from supervisor.observe.celeryapp import make_app
from supervisor.observe.heartbeats import EventReceiverSource, make_source, source_kind
from supervisor.observe.redis_heartbeats import RedisHeartbeatSource, subscribe_patterns

REDIS_URLS = [
    ("redis://127.0.0.1:1/3", {}),
    ("rediss://:pw@127.0.0.1:1/0", {}),
    ("redis+socket:///run/redis/redis.sock?virtual_host=2", {}),
    ("sentinel://127.0.0.1:1;sentinel://127.0.0.1:2", {"master_name": "m"}),
]


@pytest.mark.parametrize(("url", "options"), REDIS_URLS)
def test_redis_brokers_get_the_lean_source(url, options, monkeypatch):
    monkeypatch.delenv(heartbeats.SOURCE_ENV, raising=False)
    broker = BrokerConfig(url=url, transport_options=options)
    src = make_source(make_app(broker), broker)
    assert type(src) is RedisHeartbeatSource and not src.running
    monkeypatch.setenv(heartbeats.SOURCE_ENV, "kombu")  # the escape hatch
    assert type(make_source(make_app(broker), broker)) is EventReceiverSource


def test_rabbitmq_keeps_celerys_receiver(monkeypatch):
    broker = BrokerConfig(url="amqp://guest:guest@127.0.0.1:1//")
    for wanted in ("", "auto", "redis", "kombu"):
        monkeypatch.setenv(heartbeats.SOURCE_ENV, wanted)
        assert type(make_source(make_app(broker), broker)) is EventReceiverSource


def test_an_unknown_choice_is_logged_and_ignored(caplog):
    broker = BrokerConfig(url="redis://127.0.0.1:1/0")
    with caplog.at_level(logging.WARNING, logger="supervisor.observe.heartbeats"):
        assert source_kind(broker, {heartbeats.SOURCE_ENV: "flower"}) == "redis"
    assert "not auto, redis or kombu" in caplog.text


@pytest.mark.parametrize(("options", "db", "expected"), [
    ({}, 0, ["/0.celeryev/worker.*"]),
    ({"global_keyprefix": "app:"}, 5, ["app:/5.celeryev/worker.*"]),
    ({"global_keyprefix": "a*b?[c]\\:"}, 1, ["a\\*b\\?\\[c\\]\\\\:/1.celeryev/worker.*"]),
    ({"fanout_prefix": "/x{db}."}, 2, ["/x2.celeryev/worker.*"]),
    ({"fanout_prefix": False}, 2, ["celeryev/worker.*"]),
    ({"fanout_patterns": False}, 2, ["/2.celeryev"]),
])
def test_patterns_are_kombus(options, db, expected):
    assert subscribe_patterns(options, db) == expected
