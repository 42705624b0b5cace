"""Targeted pings and the broker check, against real workers and brokers (and dead ones).

What an on-call engineer relies on: an alive worker answers at once (we do not sit out the
timeout when everyone replied), a killed one does not, and when the broker is down or silent
every call comes back in bounded time with an error that names the broker without its password.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from supervisor.config import BrokerConfig
from supervisor.observe.celeryapp import BrokerUnreachable, check_broker, make_app
from supervisor.observe.control import active_queues, ping
from tests.support.brokers import free_port
from tests.support.workers import celery_app, wait_ping

SECRET = "hunter2secret"


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request) -> BrokerConfig:
    if request.param == "redis":
        return BrokerConfig(url=request.getfixturevalue("redis_url"), connect_timeout=2)
    return BrokerConfig(url=request.getfixturevalue("rabbitmq_url"), connect_timeout=2)


@pytest.fixture
def black_hole():
    """A port that accepts TCP connections and never says a word (a hung broker, a dropped route)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    try:
        return fn(*args, **kwargs), time.monotonic() - t0
    except Exception as exc:
        return exc, time.monotonic() - t0


def test_ping_alive_answers_early_killed_does_not(broker, uid, spawn):
    app = make_app(broker)
    alive, doomed = f"celery@{uid}-alive", f"celery@{uid}-doomed"
    spawn(broker, alive)
    victim = spawn(broker, doomed)
    client = celery_app(broker.url.get_secret_value())
    wait_ping(client, alive, timeout=30)
    wait_ping(client, doomed, timeout=30)

    timeout = 5.0
    answered, took = timed(ping, app, [alive, doomed], timeout)
    assert answered == {alive, doomed}
    assert took < timeout / 2, f"all replied, yet ping waited {took:.2f}s of its {timeout}s"

    victim.kill(signal.SIGKILL)
    victim.proc.wait(5)
    answered, took = timed(ping, app, [alive, doomed], 1.0)
    assert answered == {alive}
    assert took >= 0.9  # it waited for the one that will never answer ...
    assert took < 1.0 + 2.5  # ... and no longer than its timeout

    assert ping(app, [doomed], 0.5) == set()
    assert ping(app, [], 0.5) == set()


def test_active_queues_names_what_each_worker_consumes(broker, uid, spawn):
    app = make_app(broker)
    hostname = f"celery@{uid}-aq"
    queues = [f"{uid}-a", f"{uid}-b"]
    spawn(broker, hostname, queues=",".join(queues))
    wait_ping(celery_app(broker.url.get_secret_value()), hostname, timeout=30)

    timeout = 5.0
    got, took = timed(active_queues, app, 1, timeout)
    assert sorted(got[hostname]) == sorted(queues)
    assert took < timeout / 2


def test_no_worker_means_empty_results_not_errors(broker):
    app = make_app(broker)
    assert ping(app, ["celery@nobody-here"], 0.5) == set()
    assert active_queues(app, 1, 0.5) == {}


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
@pytest.mark.parametrize("where", ["closed port", "black hole"])
def test_broker_down_errors_are_bounded_and_secret_free(scheme, where, black_hole):
    port = free_port() if where == "closed port" else black_hole
    path = "/0" if scheme == "redis" else "//"
    broker = BrokerConfig(url=f"{scheme}://guest:{SECRET}@127.0.0.1:{port}{path}", connect_timeout=1)
    app = make_app(broker)

    error, took = timed(check_broker, app, 1.0)
    assert isinstance(error, str), error
    assert took < 1.0 + 1.5
    assert f"127.0.0.1:{port}" in error and broker.display_url in error
    assert SECRET not in error
    assert error.startswith("cannot connect to ")

    for call in (lambda: ping(app, ["celery@x"], 1.0), lambda: active_queues(app, 1, 1.0)):
        exc, took = timed(call)
        assert isinstance(exc, BrokerUnreachable), exc
        assert took < 1.0 + 1.5 + 1.0
        assert SECRET not in str(exc) and f"127.0.0.1:{port}" in str(exc)


def test_broker_dying_during_a_ping_raises_promptly(own_redis):
    app = make_app(BrokerConfig(url=f"{own_redis.url}/0", connect_timeout=1))
    assert ping(app, ["celery@nobody"], 0.2) == set()  # connected and working
    outage = threading.Timer(0.5, own_redis.stop)
    outage.start()
    try:
        exc, took = timed(ping, app, ["celery@nobody"], 5.0)
    finally:
        outage.join()
    assert isinstance(exc, BrokerUnreachable), exc
    assert took < 5.0, "it noticed the broker was gone instead of waiting out the timeout"
    assert str(own_redis.port) in str(exc)


def test_check_broker_ok(broker):
    assert check_broker(make_app(broker), 2.0) is None


def test_check_broker_names_the_cause(rabbitmq_url):
    # the broker answers, but refuses these credentials: the cause is in the message, the password is not
    url = rabbitmq_url.replace("guest:guest@", f"guest:{SECRET}@")
    error = check_broker(make_app(BrokerConfig(url=url, connect_timeout=2)), 2.0)
    assert error is not None and "ACCESS_REFUSED" in error and SECRET not in error
