"""The supervisor's own Celery app: same broker and transport options as the fleet, short timeouts.

Nothing the supervisor does against the broker may hang when the broker is down, refuses
connections or swallows packets: every connect, socket read and retry here is bounded by
``BrokerConfig.connect_timeout``.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from kombu import Connection
from kombu.connection import ConnectionPool, PooledConnection

from supervisor import redact
from supervisor.config import BrokerConfig
from supervisor.redis_client import sentinel_summary

REDIS_BRPOP_TIMEOUT = 0.1
GRACEFUL_CLOSE_TIMEOUT = 1.0

# Kombu's own retry knobs (``Connection.default_channel`` reads them from the transport options).
_RETRY_OPTIONS = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


class BoundedConnection(Connection):
    """A kombu Connection whose retries are always bounded.

    kombu retries "forever" wherever a caller passes no ``max_retries``: a publish with
    ``retry=True`` and no policy (every pidbox/control message does so) would, against a
    RabbitMQ that went away mid-call, reconnect every second for ever. Here an unbounded
    retry becomes one retry, and an unbounded reconnect loop is limited in time.
    """

    bounded_retries = 1

    def ensure(
        self,
        obj,
        fun,
        errback=None,
        max_retries=None,
        interval_start=1,
        interval_step=1,
        interval_max=1,
        on_revive=None,
        retry_errors=None,
    ):
        if max_retries is None:
            max_retries = self.bounded_retries
        return super().ensure(
            obj,
            fun,
            errback=errback,
            max_retries=max_retries,
            interval_start=min(interval_start, 0.5),
            interval_step=interval_step,
            interval_max=min(interval_max, 1),
            on_revive=on_revive,
            retry_errors=retry_errors,
        )

    def _ensure_connection(
        self,
        errback=None,
        max_retries=None,
        interval_start=2,
        interval_step=2,
        interval_max=30,
        callback=None,
        reraise_as_library_errors=True,
        timeout=None,
    ):
        if max_retries is None:
            max_retries = self.bounded_retries
        if timeout is None:
            timeout = 2 * float(self.connect_timeout or 3)
        return super()._ensure_connection(
            errback=errback,
            max_retries=max_retries,
            interval_start=min(interval_start, 0.5),
            interval_step=min(interval_step, 0.5),
            interval_max=min(interval_max, 1),
            callback=callback,
            reraise_as_library_errors=reraise_as_library_errors,
            timeout=timeout,
        )

    def Pool(self, limit=None, **kwargs):  # noqa: N802 (kombu's name)
        # app.pool (used by app.control.* when no connection is passed) hands out bounded ones too
        return _BoundedConnectionPool(self, limit, **kwargs)


class _BoundedPooledConnection(PooledConnection, BoundedConnection):
    pass


class _BoundedConnectionPool(ConnectionPool):
    def new(self):
        return _BoundedPooledConnection(self, **dict(self.connection._info(resolve=False)))


def _timeout_options(broker: BrokerConfig, timeout: float) -> dict[str, Any]:
    if broker.is_redis:
        return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry_on_timeout": False}
    if broker.scheme in ("amqp", "amqps", "pyamqp"):
        # SO_SNDTIMEO: a write to a black-holed broker fails instead of blocking.
        return {"write_timeout": timeout}
    return {}


def transport_options(broker: BrokerConfig, timeout: float | None = None) -> dict[str, Any]:
    """The fleet's transport options (key layout: priority_steps, sep, global_keyprefix ...) with
    our bounded timeouts on top: a larger or absent timeout of the fleet's does not apply to us."""
    timeout = float(broker.connect_timeout if timeout is None else timeout)
    opts: dict[str, Any] = dict(_RETRY_OPTIONS)
    opts.update(broker.transport_options or {})
    _bound(opts, _timeout_options(broker, timeout))
    if broker.scheme == "sentinel" and isinstance(opts.get("sentinel_kwargs"), dict):
        # the sentinels' own connections (the master is asked of them on every connect): with
        # sentinel_kwargs set, redis-py no longer copies our socket timeouts to them
        sentinel_kwargs = dict(opts["sentinel_kwargs"])
        _bound(sentinel_kwargs, {"socket_timeout": timeout, "socket_connect_timeout": timeout})
        opts["sentinel_kwargs"] = sentinel_kwargs
    return opts


def _bound(opts: dict[str, Any], limits: dict[str, Any]) -> None:
    """Our limits over the fleet's options: a bool is ours, a number the smaller of the two."""
    for key, ours in limits.items():
        theirs = opts.get(key)
        if isinstance(ours, bool) or not isinstance(theirs, (int, float)) or isinstance(theirs, bool):
            opts[key] = ours
        else:
            opts[key] = min(float(theirs), ours)


def make_app(broker: BrokerConfig) -> Celery:
    """A Celery app for observing the fleet (never the current app, no result backend, no tasks)."""
    timeout = float(broker.connect_timeout)
    app = Celery(
        "celery-supervisor",
        broker=broker.url.get_secret_value(),
        set_as_current=False,
        fixups=[],
    )
    app.amqp.Connection = BoundedConnection  # every connection the app makes (pool, control, events)
    app.conf.update(
        broker_transport_options=transport_options(broker),
        broker_connection_timeout=timeout,
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=1,
        broker_pool_limit=4,
        broker_pool_acquire_timeout=timeout,
        broker_heartbeat=0,
        result_backend=None,
        worker_hijack_root_logger=False,
    )
    # kept for the observers (display URL, management API, redis detection)
    app.supervisor_broker = broker  # type: ignore[attr-defined]
    return app


def broker_of(app: Celery) -> BrokerConfig | None:
    return getattr(app, "supervisor_broker", None)


def display_url(app: Celery) -> str:
    broker = broker_of(app)
    if broker is not None:
        return broker.display_url
    return redact.redact_url(app.conf.broker_url or "")


def describe_error(exc: BaseException) -> str:
    """A short human description of a broker error, secrets scrubbed."""
    text = str(exc).strip()
    # kombu and redis-py wrap socket errors: "Error 111 connecting to ... Connection refused."
    if isinstance(exc, TimeoutError) and not text:  # socket.timeout is TimeoutError
        text = "timed out"
    inner = exc.__cause__ or exc.__context__
    if not text and inner is not None:
        text = str(inner).strip()
    if not text:
        text = type(exc).__name__
    return redact.scrub(sentinel_summary(text) or text)


class BrokerUnreachable(Exception):
    """The broker could not be reached (refused, timed out, bad credentials). The message is
    fit to print: it names the redacted URL and holds no secret."""


def connect(app: Celery, timeout: float | None = None, heartbeat: float | None = None) -> Connection:
    """A new, connected kombu connection with its default channel open (on Redis that is a real
    round trip), or BrokerUnreachable within about ``timeout``."""
    broker = broker_of(app)
    if timeout is None:
        timeout = float(broker.connect_timeout) if broker is not None else 3.0
    per_call = _timeout_options(broker, timeout) if broker is not None else {}
    conn = app.connection_for_write(connect_timeout=timeout, heartbeat=heartbeat, transport_options=per_call)
    try:
        conn.ensure_connection(
            max_retries=1, timeout=timeout, interval_start=0, interval_step=0, interval_max=0
        )
        channel = conn.default_channel  # opens the channel; on Redis a PING
        if getattr(conn.transport, "driver_type", None) == "redis":
            _short_brpop(app, conn, channel)
        return conn
    except Exception as exc:
        release(conn)
        raise BrokerUnreachable(f"cannot connect to {display_url(app)}: {describe_error(exc)}") from None


def _short_brpop(app: Celery, conn: Connection, channel: Any) -> None:
    """Replies (pings, inspect) are awaited with BRPOP, 1 s by default: drain_events(timeout)
    overshoots by up to that, and closing the channel waits for the BRPOP in flight, so a 0.5 s
    ping took 1.1 s. Redis >= 6 takes fractional BRPOP timeouts; older servers keep 1 s."""
    ok = getattr(app, "_supervisor_fractional_brpop", None)
    if ok is None:
        try:
            version = str(channel.client.info("server").get("redis_version", "0"))
            ok = int(version.split(".")[0]) >= 6
        except Exception:  # INFO renamed or refused (managed Redis): keep kombu's default
            ok = False
        app._supervisor_fractional_brpop = ok  # type: ignore[attr-defined]
    if ok:
        conn.transport.brpop_timeout = REDIS_BRPOP_TIMEOUT
        channel.brpop_timeout = REDIS_BRPOP_TIMEOUT


def check_broker(app: Celery, timeout: float | None = None) -> str | None:
    """None when the broker answers a round trip, else a short human error (no secrets).

    Returns within about ``timeout`` (+ 1 s) whatever the broker does: refuses, is down,
    or accepts TCP and never answers.
    """
    if timeout is None:
        broker = broker_of(app)
        timeout = float(broker.connect_timeout) if broker is not None else 3.0
    t0 = time.monotonic()
    try:
        conn = connect(app, timeout)
    except BrokerUnreachable as exc:
        msg = str(exc)
        if time.monotonic() - t0 >= timeout * 0.9 and "time" not in msg.lower():
            msg = f"{msg} (no answer within {timeout:g}s)"
        return redact.scrub(msg)
    release(conn, graceful=True)
    return None


def release(conn: Any, graceful: bool = False) -> None:
    """Close a kombu connection, never raising. ``graceful`` says goodbye to the broker (only for a
    connection that just worked); otherwise the sockets are dropped without a round trip."""
    if conn is None:
        return
    if graceful:
        try:
            # amqp waits for Close-Ok without a timeout: bound the wait on the socket itself
            raw = getattr(conn, "_connection", None)
            sock = getattr(getattr(raw, "transport", None), "sock", None)
            if sock is not None:
                sock.settimeout(GRACEFUL_CLOSE_TIMEOUT)
            conn.release()
            return
        except Exception:
            pass
    try:
        conn.collect(socket_timeout=0.5)
    except Exception:
        pass
