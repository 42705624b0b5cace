"""Real brokers for the tests: a private redis-server per test run, RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import os

import pytest

from supervisor.embedded_redis import RedisServer, free_port, port_open, redis_server_binary  # noqa: F401

RABBIT_URL = os.environ.get("SUPERVISOR_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
RABBIT_MGMT = os.environ.get("SUPERVISOR_TEST_RABBITMQ_MGMT", "http://guest:guest@127.0.0.1:15672")


def need(what: str) -> None:
    """Skip for want of `what`, or fail when the run requires everything (.ci/run sets
    SUPERVISOR_TESTS_REQUIRE_ALL=1: a skipped broker test there is a failure)."""
    if os.environ.get("SUPERVISOR_TESTS_REQUIRE_ALL") == "1":
        pytest.fail(f"required for this run but missing: {what}", pytrace=False)
    pytest.skip(f"missing: {what}")


def rabbitmq_available() -> bool:
    return port_open("127.0.0.1", 5672)


def rabbitmq_management_available() -> bool:
    return port_open("127.0.0.1", 15672)


def delete_rabbitmq_queues(url: str, names) -> None:
    """Queues a worker declared on the shared RabbitMQ outlive it: remove them."""
    from kombu import Connection

    with Connection(url, connect_timeout=3) as conn:
        for name in names:
            ch = conn.channel()
            try:
                ch.queue_delete(name)
            except Exception:
                pass
            finally:
                try:
                    ch.close()
                except Exception:
                    pass
