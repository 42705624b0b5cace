"""Targeted remote control: ping the workers we expect, ask which queues they consume.

Both calls use a fresh connection of their own (connected within ``connect_timeout``) and
return early once every expected worker replied: celery's broadcast waits the whole timeout
unless ``limit`` replies arrive. No reply is an empty result; an unreachable broker raises
``BrokerUnreachable``.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu.exceptions import OperationalError

from supervisor.observe.celeryapp import BrokerUnreachable, connect, describe_error, display_url, release

__all__ = ["BrokerUnreachable", "active_queues", "ping"]


def _call(app: Celery, what: str, fn):
    conn = connect(app)  # BrokerUnreachable when the broker is down
    ok = False
    try:
        result = fn(conn)
        ok = True
        return result
    except BrokerUnreachable:
        raise
    except (OSError, OperationalError, *_broker_errors(conn)) as exc:  # the broker went away mid-call
        raise BrokerUnreachable(f"{what} failed on {display_url(app)}: {describe_error(exc)}") from None
    finally:
        release(conn, graceful=ok)


def _broker_errors(conn) -> tuple[type[BaseException], ...]:
    try:
        return tuple(conn.connection_errors) + tuple(conn.channel_errors)
    except Exception:
        return ()


def ping(app: Celery, hostnames: Iterable[str], timeout: float = 1.0) -> set[str]:
    """The hostnames among ``hostnames`` that answered a targeted ping within ``timeout``.

    Returns as soon as all of them replied.
    """
    wanted = sorted(set(hostnames))
    if not wanted:
        return set()

    def do(conn):
        return app.control.ping(destination=wanted, limit=len(wanted), timeout=timeout, connection=conn)

    replies = _call(app, "ping", do) or []
    answered: set[str] = set()
    for reply in replies:
        if isinstance(reply, dict):
            answered.update(h for h in reply if h in wanted)
    return answered


def active_queues(app: Celery, expected: int, timeout: float = 1.0) -> dict[str, list[str]]:
    """hostname -> names of the queues it consumes, for every worker that replied within
    ``timeout`` (returns early once ``expected`` workers replied; 0 waits the whole timeout)."""

    def do(conn):
        inspect = app.control.inspect(timeout=timeout, limit=expected or None, connection=conn)
        return inspect.active_queues()

    replies = _call(app, "inspect active_queues", do) or {}
    out: dict[str, list[str]] = {}
    for hostname, queues in replies.items():
        names = []
        for q in queues or []:
            name = q.get("name") if isinstance(q, dict) else None
            if name:
                names.append(name)
        out[hostname] = names
    return out
