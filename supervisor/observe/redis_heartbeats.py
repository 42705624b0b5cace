"""The lean heartbeat source for Redis brokers: redis-py subscribed to kombu's own fanout pattern.

On Redis, kombu publishes every event of the ``celeryev`` exchange with ``PUBLISH`` to the channel
``{global_keyprefix}/{db}.celeryev/{routing_key}`` (``kombu.transport.redis.Channel._put_fanout``),
whatever consumers exist, and an event receiver bound to ``worker.#`` subscribes with
``PSUBSCRIBE {global_keyprefix}/{db}.celeryev/worker.*``: Redis filters the pattern, so no task event
reaches the process. This source makes the same subscription itself and reads kombu's envelope
(JSON: ``body`` base64, ``content-type`` application/json) straight from the connection, in RESP2:
no virtual transport, no Message object, no Lamport clock, no binding in ``_kombu.binding.celeryev``.
It drains what is available, then sleeps ``drain_interval`` (200 ms): five wake-ups a second whatever
the event rate (at 250 heartbeats a second, 50 ms cost half as much again), well under a fifth of
celery's receiver's CPU (``bench/heartbeats.py``, ``bench/fleet.py``). Every event of a drain is stamped with the moment the drain before it read the
socket: at most 200 ms before the event arrived, never after. A heartbeat that arrived before a death
the platform reports is then never taken for life after that death (which would cost the restart a
confirming ping), and a silence is judged at most 200 ms early, which the confirming ping covers.

The channel layout follows the fleet's transport options as kombu does: the database number,
``global_keyprefix``, ``fanout_prefix`` (True: ``/{db}.``, a string, or off) and ``fanout_patterns``
(off: every event of the exchange arrives on one channel, and the non-worker ones are counted in
``other_events`` and dropped undecoded); on Sentinel, ``sentinel_fanout_compat`` also subscribes to
the literal ``/{db}.`` topic of kombu < 5.4 (a message seen on both is taken once). Sentinel masters
and unix sockets are reached through supervisor.redis_client.

Outages as with the kombu source: ``listening_since`` None and ``error`` set while disconnected,
reconnect and re-subscribe with capped backoff, a silent Redis found by a PING every
``liveness_interval`` that must be answered within ``connect_timeout``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import select
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from supervisor.config import BrokerConfig
from supervisor.observe.heartbeats import WORKER_EVENTS, EventCallback, ThreadedSource

try:  # a third of the stdlib's time per heartbeat; the stdlib's json where no wheel exists
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is a dependency
    _loads = json.loads

log = logging.getLogger(__name__)

_GLOB_SPECIAL = frozenset("*?[]\\")
_DEDUP = 1000  # delivery tags remembered when one message may arrive on two topics
# what kombu's envelope of a JSON event starts with and holds (json.dumps of its dict, body first)
_FAST_HEAD = b'{"body": "'
_CTYPE, _CENC, _BENC = b'"content-type": "application/json"', b'"content-encoding": "utf-8"', b'"body_encoding": "base64"'
_COMPRESSION = b'"compression"'


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a PSUBSCRIBE pattern (a key prefix may hold ``*`` or ``[``)."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def subscribe_patterns(transport_options: dict[str, Any] | None, db: int, exchange: str = "celeryev",
                       routing_key: str = "worker.#", sentinel: bool = False) -> list[str]:
    """The PSUBSCRIBE patterns kombu's redis transport uses for a fanout queue bound with
    ``routing_key`` to ``exchange`` (``Channel._get_subscribe_topics``, prefixed as
    ``PrefixedRedisPubSub`` does), with the literal parts escaped."""
    opts = transport_options or {}
    fanout_prefix = opts.get("fanout_prefix", True)
    # kombu: a string replaces "/{db}.", any other true value keeps it, a false one drops it
    raw_prefix = (fanout_prefix if isinstance(fanout_prefix, str) else "/{db}.") if fanout_prefix else ""
    try:
        prefix = raw_prefix.format(db=db)
    except (KeyError, IndexError, ValueError):  # kombu would fail the same way; keep it literal
        prefix = raw_prefix
    keyprefix = str(opts.get("global_keyprefix") or "")
    prefixes = [prefix]
    if sentinel and opts.get("sentinel_fanout_compat") and raw_prefix != prefix:
        prefixes.append(raw_prefix)  # kombu < 5.4 on Sentinel: the literal "/{db}."
    out = []
    for p in prefixes:
        literal = _glob_escape(keyprefix + p + exchange)
        if opts.get("fanout_patterns", True):
            out.append(f"{literal}/{routing_key.replace('#', '*')}")
        else:
            out.append(literal)  # every event of the exchange: filtered here by type
    return out


class RedisHeartbeatSource(ThreadedSource):
    """Worker events from a Redis broker, read by redis-py from kombu's fanout channels.

    ``app`` (optional) is used for one thing: after each (re)subscribe, the control broadcast
    ``heartbeat`` asks every live worker for a heartbeat now (``wakeup``), as celery's receiver does.
    ``stop()`` returns within about ``drain_interval``, or ``timeout`` at worst while a connect
    attempt to a silent broker is in progress (the daemon thread then ends alone).
    """

    def __init__(
        self,
        broker: BrokerConfig,
        clock: Callable[[], float] = time.time,
        node_id: str | None = None,
        on_event: EventCallback | None = None,
        *,
        app=None,
        wakeup: bool = True,
        backoff: tuple[float, float] = (0.5, 5.0),
        drain_interval: float = 0.2,
        liveness_interval: float = 5.0,
        exchange: str | None = None,
    ):
        super().__init__(clock, node_id, on_event, backoff=backoff, display=broker.display_url)
        if not broker.is_redis:
            raise ValueError(f"{broker.display_url} is not a Redis broker")
        self.broker = broker
        self.app = app
        self.wakeup = wakeup and app is not None
        self.drain_interval = drain_interval
        self.liveness_interval = liveness_interval
        self.connect_timeout = float(broker.connect_timeout)
        self.exchange = exchange or (str(app.conf.event_exchange) if app is not None else "celeryev")
        self.patterns: list[str] = []  # what the last (re)subscribe asked for
        self._seen_tags: OrderedDict[str, None] | None = None
        self._fast = False

    # ------------------------------------------------------------------ the thread
    def _consume(self) -> None:
        from supervisor.redis_client import redis_client

        client = redis_client(self.broker.url.get_secret_value(), self.broker.transport_options,
                              timeout=self.connect_timeout, protocol=2)
        pool = client.connection_pool
        conn = None
        try:
            conn = pool.get_connection()
            db = int(pool.connection_kwargs.get("db") or 0)
            self.patterns = subscribe_patterns(self.broker.transport_options, db, self.exchange,
                                               sentinel=self.broker.scheme == "sentinel")
            self._seen_tags = OrderedDict() if len(self.patterns) > 1 else None
            # Redis filters by routing key and no message comes twice: the fast path may skip the envelope
            self._fast = self._seen_tags is None and bool((self.broker.transport_options or {}).get(
                "fanout_patterns", True))
            conn.send_command("PSUBSCRIBE", *self.patterns, check_health=False)
            # from here on we read the socket ourselves (redis-py connected, authenticated and
            # selected; its pure-Python parser costs 3x ours per message)
            reader = Resp2Reader(conn._sock)
            deadline = time.monotonic() + self.connect_timeout
            for _ in self.patterns:  # one confirmation per pattern, within the socket timeout
                reply = reader.wait_one(deadline)
                if not (isinstance(reply, list) and reply and reply[0] == b"psubscribe"):
                    raise ConnectionError(f"unexpected answer to PSUBSCRIBE: {str(reply)[:80]}")
            self._listening()
            if self.wakeup:
                self._wake_workers()
            self._drain(conn, reader)
        finally:
            _close(client, conn)

    def _drain(self, conn, reader: Resp2Reader) -> None:
        """Read everything available, handle it, sleep ``drain_interval``; PING now and then."""
        stopped, sleep = self._stop.is_set, time.sleep
        timeout, every = self.connect_timeout, self.liveness_interval
        pinged: float | None = None  # when the PING in flight went out
        quiet_since = time.monotonic()  # the last PONG (or the subscription)
        messages, clock = self._messages, self.clock
        read_at = clock()  # subscribed: whatever is read from now on arrived after this
        while True:
            # what this drain reads arrived after the previous one read the socket: stamped with that
            # moment (a lower bound), never later than it arrived
            stamp, read_at = read_at, clock()
            payloads = []
            for r in reader.read_available():
                kind = r[0] if type(r) is list and r else None
                if kind == b"pmessage" and len(r) == 4:
                    payloads.append(r[3])
                elif kind == b"pong":
                    pinged, quiet_since = None, time.monotonic()
            if payloads:
                messages(payloads, stamp)
            sleep(self.drain_interval)  # a plain sleep: half the CPU of Event.wait per wake-up here
            if stopped():
                return
            now = time.monotonic()
            if pinged is not None:
                if now - pinged > timeout:
                    raise TimeoutError(f"no answer to PING within {timeout:g}s")
            elif now - quiet_since >= every:
                reader.send(b"*1\r\n$4\r\nPING\r\n")  # in RESP2 pub/sub the answer is ["pong", ""]
                pinged = now

    def _messages(self, payloads: list[bytes], stamp: float | None = None) -> None:
        """The messages of one drain: decoded, then their worker events applied together, stamped
        ``stamp`` (None: now)."""
        workers: list[dict] = []
        fast = self._fast
        for data in payloads:
            events = None
            if fast and data.startswith(_FAST_HEAD):
                # kombu's own layout (body first, a base64 string has no quote): the body without
                # parsing the envelope, a third of the time. Anything else takes the full path.
                end = data.find(b'"', 10)
                if end > 0 and data.find(_CTYPE, end) > 0 and data.find(_CENC, end) > 0 \
                        and data.find(_BENC, end) > 0 and data.find(_COMPRESSION, end) < 0:
                    try:
                        events = _loads(binascii.a2b_base64(data[10:end]))
                    except Exception as exc:
                        self._bad_message(f"{type(exc).__name__}: {str(exc)[:200]}")
                        continue
            if events is None:
                events = self._decode(data)
                if events is None:
                    continue
            if type(events) is dict:
                if events.get("type") in WORKER_EVENTS:
                    workers.append(events)
                    continue
                events = (events,)
            self._sort(events, workers)
        if workers:
            self._on_worker_events(workers, stamp)

    def _sort(self, events, workers: list[dict]) -> None:
        for ev in events if isinstance(events, list | tuple) else (events,):  # celery >= 4 may send a list
            if not isinstance(ev, dict):
                self._bad_message(f"an event that is not a JSON object ({type(ev).__name__})")
            elif ev.get("type") in WORKER_EVENTS:
                workers.append(ev)
            else:
                self._on_other_event(ev)

    def _message(self, data: bytes) -> None:
        """One message on its own (tests; the stream reads them by the batch, ``_messages``)."""
        self._messages([data])

    def _decode(self, data: bytes):
        """One kombu envelope read in full: ``{"body": base64(json(event or [events])), "content-type":
        "application/json", "content-encoding": "utf-8", "properties": {"body_encoding": "base64",
        "delivery_info": {"routing_key": "worker.heartbeat", ...}, ...}, "headers": {...}}``; the event
        (or list of events) it holds, or None when it is not ours or cannot be read (counted)."""
        try:
            env = json.loads(data)
            props = env.get("properties") or {}
            info = props.get("delivery_info") or {}
            rk = info.get("routing_key")
            if isinstance(rk, str) and not rk.startswith("worker."):
                self.other_events += 1  # fanout_patterns off: every event comes; not ours
                return None
            if self._seen_tags is not None and not self._first_time(props.get("delivery_tag")):
                return None
            ctype = env.get("content-type")
            if ctype != "application/json":
                raise ValueError(f"content-type {str(ctype)[:40]!r}")
            if (env.get("headers") or {}).get("compression"):
                raise ValueError("compressed event messages are not read")
            body = env["body"]
            if props.get("body_encoding") == "base64":
                body = base64.b64decode(body)
            encoding = str(env.get("content-encoding") or "utf-8").lower()
            if isinstance(body, bytes) and encoding not in ("utf-8", "utf8", "binary"):
                body = body.decode(encoding)
            return json.loads(body)
        except Exception as exc:  # one odd message must not cost a reconnect
            self._bad_message(f"{type(exc).__name__}: {str(exc)[:200]}")
            return None

    def _first_time(self, tag) -> bool:
        """False for a delivery tag already seen (a message published on two topics)."""
        if not isinstance(tag, str):
            return True
        seen = self._seen_tags
        if tag in seen:
            return False
        seen[tag] = None
        if len(seen) > _DEDUP:
            seen.popitem(last=False)
        return True

    def _wake_workers(self) -> None:
        """The control broadcast ``heartbeat``: every live worker heartbeats now (not enable_events)."""
        from supervisor.observe.celeryapp import release

        conn = None
        try:
            conn = self.app.connection_for_write(connect_timeout=self.connect_timeout)
            self.app.control.broadcast("heartbeat", connection=conn)
        except Exception as exc:
            from supervisor import redact

            log.debug("could not wake workers: %s", redact.scrub(exc))
        finally:
            release(conn)


_PMESSAGE = b"*4\r\n$8\r\npmessage\r\n"
# bytes asked of the socket per recv: 64 KiB, not more (a 256 KiB request costs 20 us against 3.5 us
# here, whatever arrives: above malloc's mmap threshold, every call maps and unmaps its buffer)
_RECV = 65536


class _Incomplete(Exception):
    pass


class Resp2Reader:
    """The RESP2 replies a subscribed connection gets (arrays of bulk strings and integers), read
    without blocking from the connection's socket (TCP, TLS or unix), everything available at once."""

    def __init__(self, sock):
        if sock is None:
            raise ConnectionError("not connected")
        self.sock = sock
        self.buf = b""
        sock.setblocking(False)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 5.0
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if time.monotonic() > deadline:
                    raise TimeoutError("could not write to Redis") from None
                select.select([], [self.sock], [], 0.05)

    def _fill(self) -> bool:
        """Append what the socket holds now; False when it held nothing. ConnectionError at EOF."""
        got = False
        while True:
            try:
                chunk = self.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return got
            if not chunk:
                raise ConnectionError("Connection closed by server.")
            self.buf += chunk
            got = True
            if len(chunk) < _RECV and not getattr(self.sock, "pending", lambda: 0)():
                return got

    def read_available(self) -> list:
        """Every complete reply the socket holds now (the rest stays buffered)."""
        self._fill()
        out = []
        buf, pos = self.buf, 0
        size = len(buf)
        try:
            while pos < size:
                if buf.startswith(_PMESSAGE, pos):  # the common case, inline: three bulk strings
                    p, parts = pos + len(_PMESSAGE), [b"pmessage"]
                    for _ in range(3):
                        if p >= size:
                            raise _Incomplete
                        end = buf.find(b"\r\n", p)
                        if buf[p] != 36 or end < 0:  # not "$", or not all there: the general way
                            break
                        n = int(buf[p + 1:end])
                        if n < 0:
                            break
                        p = end + 4 + n
                        if p > size:
                            raise _Incomplete
                        parts.append(buf[end + 2:p - 2])
                    else:
                        out.append(parts)
                        pos = p
                        continue
                value, pos = _parse(buf, pos)
                out.append(value)
        except _Incomplete:
            pass
        self.buf = buf[pos:]
        return out

    def wait_one(self, deadline: float):
        """The next reply, waiting until ``deadline`` (monotonic) at most."""
        while True:
            if self.buf:
                try:
                    value, pos = _parse(self.buf, 0)
                except _Incomplete:
                    pass
                else:
                    self.buf = self.buf[pos:]
                    return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Timeout reading from socket")
            if not getattr(self.sock, "pending", lambda: 0)():
                select.select([self.sock], [], [], left)
            self._fill()


def _parse(buf: bytes, pos: int):
    """One RESP2 value at ``pos``: (value, position after it); _Incomplete when it is not all there."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2:stop], stop + 2
    if kind == 42:  # * array
        n = int(buf[pos + 1:end])
        pos = end + 2
        items = []
        for _ in range(max(n, 0)):
            value, pos = _parse(buf, pos)
            items.append(value)
        return (items if n >= 0 else None), pos
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1:end], end + 2
    if kind == 45:  # - error: the subscription is not what we think it is
        raise ConnectionError(f"Redis answered an error: {buf[pos + 1:end][:200].decode('utf-8', 'replace')}")
    raise ConnectionError(f"unexpected data from Redis (type byte {kind!r})")


def _close(client, conn) -> None:
    """Drop the connection and the sentinels' ones, never raising."""
    try:
        if conn is not None:
            conn.disconnect()
    except Exception:
        pass
    pool = getattr(client, "connection_pool", None)
    try:
        if pool is not None:
            pool.disconnect()
    except Exception:
        pass
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        try:
            manager.close()
        except Exception:
            pass
