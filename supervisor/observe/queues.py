"""Queue backlogs as the broker really holds them.

Redis: the sum over every priority bucket kombu writes to (``name``, ``name<sep>3``, ...),
honouring the fleet's ``priority_steps``, ``sep`` and ``global_keyprefix``; ``LLEN name`` alone
misses the buckets. One pipelined round trip for all queues. A missing (or emptied: Redis
deletes empty lists) queue is 0. Consumers are not known on Redis (None).

RabbitMQ: a passive declare gives ready messages and consumers, exact and current. With
``broker.management_url`` the management API adds the unacknowledged (prefetched, running)
messages, which only it knows: length = ready + unacked. When the API fails, ``error`` says so
and the length counts ready messages only. A missing queue is 0.

A failure about one queue goes into its ``QueueSeen.error``; an unreachable broker raises
``BrokerUnreachable`` so the loop reports "could not observe".
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from celery import Celery
from kombu.exceptions import OperationalError

from supervisor import redact
from supervisor.config import BrokerConfig
from supervisor.model import QueueSeen
from supervisor.observe.celeryapp import BrokerUnreachable, connect, describe_error, display_url, release

__all__ = ["BrokerUnreachable", "ManagementAPI", "QueueReader"]


class ManagementAPI:
    """The few calls we make to RabbitMQ's management plugin (stdlib HTTP, bounded timeout)."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        self.base = f"{parts.scheme or 'http'}://{host}{port}{parts.path.rstrip('/')}"
        self.display = redact.redact_url(url)
        self.timeout = timeout
        self._auth = None
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(cred.encode()).decode()

    def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The queue's JSON document, or None when it does not exist."""
        url = f"{self.base}/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (configured URL)
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise ManagementError(f"management API {self.display}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ManagementError(f"management API {self.display}: {redact.scrub(reason)}") from None


class ManagementError(Exception):
    pass


class QueueReader:
    """Reads queue lengths; keeps one broker connection between reads (reconnects when it broke)."""

    def __init__(self, broker: BrokerConfig, app: Celery):
        self.broker = broker
        self.app = app
        self.timeout = float(broker.connect_timeout)
        self._conn = None
        self._channel = None
        self._errors: tuple[type[BaseException], ...] = ()  # the transport's connection errors
        self._lock = threading.Lock()
        self.management: ManagementAPI | None = None
        if broker.management_url is not None and not broker.is_redis:
            self.management = ManagementAPI(broker.management_url.get_secret_value(), self.timeout)

    # ------------------------------------------------------------------ public
    def read(self, names: list[str]) -> dict[str, QueueSeen]:
        names = list(dict.fromkeys(names))
        if not names:
            return {}
        with self._lock:
            # one retry with a fresh connection: the kept one may have died with a broker restart
            for attempt in (0, 1):
                try:
                    if self.broker.is_redis:
                        return self._read_redis(names)
                    return self._read_by_declare(names)
                except BrokerUnreachable:
                    self._drop()
                    raise
                except Exception as exc:
                    lost = self._is_connection_error(exc)
                    self._drop()  # whatever went wrong, do not reuse that connection
                    if not lost:
                        raise
                    if attempt == 1:
                        raise BrokerUnreachable(
                            f"cannot read queues on {display_url(self.app)}: {describe_error(exc)}"
                        ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            self._drop(graceful=True)

    # ------------------------------------------------------------------ connection
    def _connection(self):
        if self._conn is None:
            self._conn = connect(self.app, self.timeout)  # raises BrokerUnreachable
            try:
                self._errors = tuple(self._conn.connection_errors)
            except Exception:
                pass
        return self._conn

    def _drop(self, graceful: bool = False) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        release(conn, graceful=graceful)

    def _is_connection_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (OSError, EOFError, OperationalError, *self._errors))

    # ------------------------------------------------------------------ redis
    def _read_redis(self, names: list[str]) -> dict[str, QueueSeen]:
        channel = self._connection().default_channel
        keys_of = {name: list(dict.fromkeys(redis_keys(channel, name))) for name in names}
        # channel.client prefixes every key with global_keyprefix, in pipelines too
        with channel.client.pipeline(transaction=False) as pipe:
            for keys in keys_of.values():
                for key in keys:
                    pipe.llen(key)
            results = pipe.execute(raise_on_error=False)
        out: dict[str, QueueSeen] = {}
        i = 0
        for name, keys in keys_of.items():
            sizes = results[i : i + len(keys)]
            i += len(keys)
            bad = [r for r in sizes if isinstance(r, Exception)]
            if bad:
                out[name] = QueueSeen(name=name, length=None, error=redact.scrub(describe_error(bad[0])))
                continue
            n = sum(int(s) for s in sizes)
            out[name] = QueueSeen(name=name, length=n, ready=n)
        return out

    # ------------------------------------------------------------------ rabbitmq
    def _read_by_declare(self, names: list[str]) -> dict[str, QueueSeen]:
        # A passive declare is exact and current for ready messages and consumers; the management
        # API adds the unacknowledged (prefetched) ones, which only it knows, but its statistics
        # lag by up to ~5 s (a queue just filled with 25 messages still read 0 there): take each
        # number from the source that has it right.
        out: dict[str, QueueSeen] = {}
        api_error: str | None = None  # a failing (or hanging) API is asked once per read, not per queue
        for name in names:
            seen, exists = self._passive(name)
            if self.management is None or not exists or seen.length is None:
                out[name] = seen
                continue
            try:
                if api_error is not None:
                    raise ManagementError(api_error)
                doc = self.management.queue(self._vhost(), name)
            except ManagementError as e:
                api_error = str(e)
                out[name] = replace(seen, error=f"{e}; unacknowledged messages not counted")
                continue
            unacked = None if doc is None else doc.get("messages_unacknowledged")
            if doc is not None and unacked is None:
                unacked = 0  # a queue so new that the broker has no statistics for it yet
            if unacked is None:  # deleted between the two calls
                out[name] = seen
                continue
            unacked = int(unacked)
            out[name] = replace(seen, length=seen.length + unacked, unacked=unacked)
        return out

    def _vhost(self) -> str:
        conn = self._connection()
        return conn.virtual_host or "/"

    def _passive(self, name: str) -> tuple[QueueSeen, bool]:
        """(ready and consumers, whether the queue exists)."""
        conn = self._connection()
        if self._channel is None:
            self._channel = conn.channel()
        try:
            ok = self._channel.queue_declare(queue=name, passive=True)
        except tuple(conn.channel_errors) as exc:
            # the broker closes the channel after a 404: open another next time
            self._close_channel()
            if _is_not_found(exc):
                return QueueSeen(name=name, length=0, ready=0, unacked=0, consumers=0), False
            return QueueSeen(name=name, length=None, error=redact.scrub(describe_error(exc))), True
        ready = int(ok.message_count)
        return QueueSeen(name=name, length=ready, ready=ready, consumers=int(ok.consumer_count)), True

    def _close_channel(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            try:
                ch.close()
            except Exception:
                pass


def redis_keys(channel, name: str) -> list[str]:
    """The Redis lists (without global_keyprefix) kombu's redis transport uses for a queue:
    one per priority step, ``name`` for step 0 and ``name + sep + step`` for the others."""
    return [channel._q_for_pri(name, pri) for pri in channel.priority_steps]


def _is_not_found(exc: BaseException) -> bool:
    code = getattr(exc, "code", None) or getattr(exc, "reply_code", None)
    return code == 404 or "NOT_FOUND" in str(exc)
