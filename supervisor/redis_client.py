"""A redis-py client for the broker's Redis, however the Celery app reaches it: ``redis://`` and
``rediss://`` (TCP, TLS), ``redis+socket:///path/redis.sock`` (a unix socket) or
``sentinel://h1:26379;sentinel://h2:26379`` (the master the sentinels name for
``transport_options.master_name``), read the way kombu's redis transport reads these URLs: the same
database, user and password, so that what we write (the lease) sits where the fleet's keys are.

Every socket operation is bounded by ``timeout``; the sentinels too (kombu's ``sentinel_kwargs``
get our bounded socket timeouts unless they set smaller ones). Used by the leader lease.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


def _db(path: str, query: dict[str, str]) -> int:
    """kombu: the db is the URL path (``/3``), or ``virtual_host`` in the query; default 0."""
    raw = query.get("virtual_host") or query.get("db") or path.strip("/") or "0"
    try:
        return int(raw.strip("/") or 0)
    except ValueError:
        raise ValueError(f"the Redis database must be a number, not {raw!r}") from None


def _bounded(kwargs: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    out = dict(kwargs or {})
    for key in ("socket_timeout", "socket_connect_timeout"):
        theirs = out.get(key)
        out[key] = timeout if not isinstance(theirs, (int, float)) or isinstance(theirs, bool) else min(
            float(theirs), timeout)
    return out


def redis_client(url: str, transport_options: dict[str, Any] | None = None, *, timeout: float = 3.0,
                 **extra: Any):
    """A ``redis.Redis`` on the broker's Redis (its master, with Sentinel). ``extra`` goes to every
    connection (``retry``, ``health_check_interval``, ...). ValueError for a URL it cannot use."""
    import redis

    opts = transport_options or {}
    base = {"socket_timeout": timeout, **extra}
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss"):
        return redis.Redis.from_url(url, socket_connect_timeout=timeout, **base)
    if scheme == "redis+socket":
        # kombu: redis+socket://[:password@]/path/to/redis.sock[?virtual_host=N]
        parts = urlsplit(url.split("+", 1)[1])
        query = dict(parse_qsl(parts.query))
        if not parts.path:
            raise ValueError("redis+socket:// needs the socket's path: redis+socket:///run/redis/redis.sock")
        return redis.Redis(unix_socket_path=unquote(parts.path), db=_db("", query),
                           username=unquote(parts.username) if parts.username else None,
                           password=unquote(parts.password) if parts.password else None, **base)
    if scheme == "sentinel":
        from redis.sentinel import Sentinel

        master = opts.get("master_name")
        if not master:
            raise ValueError("a sentinel:// broker needs transport_options.master_name")
        urls = [u for u in url.split(";") if u.strip()]
        sentinels = []
        for u in urls:
            parts = urlsplit(u.strip())
            sentinels.append((parts.hostname or "127.0.0.1", parts.port or 26379))
        # as kombu: user, password and db of the first URL are the master's; the sentinels get
        # sentinel_kwargs (else only the socket options)
        first = urlsplit(urls[0].strip())
        db = _db(first.path, dict(parse_qsl(first.query)))
        user = unquote(first.username) if first.username else None
        password = unquote(first.password) if first.password else None
        sentinel_kwargs = opts.get("sentinel_kwargs")
        manager = Sentinel(
            sentinels, min_other_sentinels=int(opts.get("min_other_sentinels") or 0),
            sentinel_kwargs=_bounded(sentinel_kwargs if isinstance(sentinel_kwargs, dict) else None, timeout),
            socket_connect_timeout=timeout, **base)
        return manager.master_for(master, redis.Redis, db=db, username=user, password=password)
    raise ValueError(f"{scheme}:// is not a Redis broker")


_NO_MASTER = re.compile(r"No master found for (?P<name>'[^']*'|\"[^\"]*\")(?: : (?P<rest>.*))?\Z", re.S)
_SENTINEL_FAILED = re.compile(
    r"host=(?P<host>[^,)]+),port=(?P<port>\d+).*? - (?P<err>.+?)(?=, <redis\.|\Z)", re.S)


def sentinel_summary(text: str) -> str | None:
    """redis-py's MasterNotFoundError quotes the repr of every sentinel client (a few hundred
    characters each): say which sentinels failed and why, in one short line."""
    m = _NO_MASTER.match(text)
    if m is None:
        return None
    failed = []
    for e in _SENTINEL_FAILED.finditer(m["rest"] or ""):
        err = re.sub(r"^[\w:.]*?Error(?:\(.*?\))?: ", "", e["err"].strip())
        failed.append(f"sentinel {e['host']}:{e['port']}: {err}")
    if failed:
        return f"no master found for {m['name']} ({'; '.join(failed)})"
    if m["rest"]:
        return f"no master found for {m['name']} (no sentinel answered)"
    return f"no master found for {m['name']}: the sentinels answering monitor no such master (check master_name)"
