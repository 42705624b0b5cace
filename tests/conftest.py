import itertools
import os

import pytest

from tests.support.brokers import (
    RABBIT_MGMT,
    RabbitVhost,
    need,
    private_redis,
    rabbitmq_available,
    rabbitmq_management_available,
)

_db = itertools.count(1)


@pytest.fixture(autouse=True)
def _own_secrets():
    """The secret registry is process-wide: a password registered by one test (guest) must not mask
    a user name in the next one's output."""
    from supervisor import redact

    redact.forget_all()
    yield
    redact.forget_all()


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server for the whole run; tests use their own db numbers or key prefixes."""
    yield from private_redis()


@pytest.fixture
def redis_url(redis_server):
    """A Redis URL with a database of its own for this test (1..15, reused round-robin)."""
    db = next(_db) % 15 + 1
    import redis

    redis.Redis.from_url(f"{redis_server.url}/{db}").flushdb()
    return f"{redis_server.url}/{db}"


@pytest.fixture
def own_redis():
    """A redis-server of this test alone, which the test may stop and start again (outages)."""
    yield from private_redis()


@pytest.fixture
def rabbitmq_vhost():
    """A RabbitMQ vhost of this test alone (the broker is shared: other runs' workers and queues live
    on "/"), deleted afterwards with everything in it. Its name starts with "/" so that every URL
    and management API path must encode it (%2F)."""
    if not rabbitmq_available():
        need("RabbitMQ on 127.0.0.1:5672")
    vhost = RabbitVhost().create()
    yield vhost
    vhost.delete()


@pytest.fixture
def rabbitmq_url(rabbitmq_vhost):
    """amqp://guest:guest@127.0.0.1:5672/<this test's vhost>"""
    return rabbitmq_vhost.url


@pytest.fixture
def rabbitmq_mgmt_url(rabbitmq_url):
    """The management API (the vhost comes from the broker URL, as in a user's config)."""
    if not rabbitmq_management_available():
        need("RabbitMQ management plugin on 127.0.0.1:15672 (rabbitmq-plugins enable rabbitmq_management)")
    return RABBIT_MGMT


@pytest.fixture
def uid(request):
    """A short name unique to this test, for queue names, hostnames and key prefixes."""
    return f"t{os.getpid() % 10000}x{abs(hash(request.node.nodeid)) % 100000}"
