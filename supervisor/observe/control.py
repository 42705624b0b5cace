"""Targeted remote control: ping the workers we expect, ask which queues they consume.

Both calls use a fresh connection of their own (connected within ``connect_timeout``) and
return early once every expected worker replied: celery's broadcast waits the whole timeout
unless ``limit`` replies arrive. No reply is an empty result; an unreachable broker raises
``BrokerUnreachable``.

``Control`` runs them off the tick's path: a tick asks for pings (and a census of the queues
every worker consumes) and goes on; the replies, each stamped with the time its inquiry was
sent, land in a later observation. A worker that is down costs the tick nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from celery import Celery
from kombu.exceptions import OperationalError

from supervisor import redact
from supervisor.model import StallCheck, WorkerQueues, WorkerStats
from supervisor.observe.celeryapp import BrokerUnreachable, connect, describe_error, display_url, release

__all__ = ["BrokerUnreachable", "Control", "ControlNews", "active_queues", "ping", "stall_check", "stats"]
log = logging.getLogger(__name__)


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


def broadcast_ping(app: Celery, limit: int, timeout: float = 1.0) -> set[str]:
    """Every hostname that answered a broadcast ping; returns as soon as ``limit`` replied (0: waits
    the whole ``timeout``)."""

    def do(conn):
        return app.control.ping(limit=limit or None, timeout=timeout, connection=conn)

    answered: set[str] = set()
    for reply in _call(app, "ping", do) or []:
        if isinstance(reply, dict):
            answered.update(h for h in reply if isinstance(h, str))
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


def _targeted(app: Celery, method: str, hostnames: list[str], timeout: float) -> dict:
    """hostname -> reply of a targeted ``inspect <method>`` (returns once every one replied)."""

    def do(conn):
        inspect = app.control.inspect(destination=hostnames, timeout=timeout, limit=len(hostnames), connection=conn)
        return getattr(inspect, method)()

    replies = _call(app, f"inspect {method}", do) or {}
    return {h: r for h, r in replies.items() if h in hostnames}


def _int(x) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 10**12 else None


def stats(app: Celery, hostnames: Iterable[str], timeout: float = 1.0, at: float = 0.0) -> dict[str, WorkerStats]:
    """Targeted ``inspect stats``: each worker's pool size and the tasks it took (sum of ``total``)."""
    wanted = sorted(set(hostnames))
    if not wanted:
        return {}
    out = {}
    for h, r in _targeted(app, "stats", wanted, timeout).items():
        if not isinstance(r, dict):
            continue
        pool = r.get("pool") if isinstance(r.get("pool"), dict) else {}
        conc = _int(pool.get("max-concurrency"))
        if conc is None and isinstance(pool.get("processes"), list):
            conc = len(pool["processes"]) or None
        total = r.get("total") if isinstance(r.get("total"), dict) else {}
        counts = [_int(v) for v in total.values()]
        processed = sum(c for c in counts if c is not None)
        out[h] = WorkerStats(at, conc, processed, _int(r.get("pid")))
    return out


def stall_check(app: Celery, hostnames: Iterable[str], timeout: float = 1.0, at: float = 0.0) -> dict[str, StallCheck]:
    """Targeted ``active_queues``, ``reserved`` and ``active``: what a stall suspect consumes and holds.
    Only workers that answered all three are returned."""
    wanted = sorted(set(hostnames))
    if not wanted:
        return {}
    queues = _targeted(app, "active_queues", wanted, timeout)
    reserved = _targeted(app, "reserved", wanted, timeout)
    active = _targeted(app, "active", wanted, timeout)
    out = {}
    for h in wanted:
        if h not in queues or h not in reserved or h not in active:
            continue
        names = frozenset(q["name"] for q in (queues[h] or []) if isinstance(q, dict) and isinstance(q.get("name"), str))
        r, a = reserved[h], active[h]
        out[h] = StallCheck(at, names, len(r) if isinstance(r, list) else 0, len(a) if isinstance(a, list) else 0)
    return out


@dataclass
class ControlNews:
    """What remote control learned since the last ``Control.collect()`` (times: our clock, when
    each inquiry was sent)."""

    pongs: dict[str, float] = field(default_factory=dict)  # answered a ping or the census
    noreplies: dict[str, float] = field(default_factory=dict)  # a ping it did not answer
    queues: dict[str, WorkerQueues] = field(default_factory=dict)  # its reply to the census
    census_at: float | None = None  # the last census that completed
    stats: dict[str, WorkerStats] = field(default_factory=dict)  # targeted inspect stats replies
    checks: dict[str, StallCheck] = field(default_factory=dict)  # stall confirmation replies
    error: str | None = None  # the last round that failed (broker unreachable), scrubbed


class Control:
    """Pings and censuses in two background lanes (one thread each, one round at a time each):
    ``ping(hostnames)`` and ``census()`` return at once; hostnames asked while a round is in flight
    go out in the next round, together. ``collect()`` hands over the replies. ``wait()`` is for
    `once`, which has no next tick."""

    def __init__(self, app: Celery, timeout: float, clock: Callable[[], float] = time.time):
        self.app = app
        self.timeout = timeout
        self.clock = clock
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._in_flight: set[str] = set()
        self._census_pending = False
        self._census_in_flight = False
        self._inspect_pending: dict[str, set[str]] = {"stats": set(), "check": set()}
        self._inspect_in_flight = False
        self._news = ControlNews()
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = False
        self.sent: Counter[str] = Counter()  # pings sent per hostname (narration, bench, tests)
        self.rounds = 0  # ping rounds sent
        self.censuses = 0
        self.on_ping_done: Callable[[], None] | None = None  # a ping round completed (supervisor.wake)

    # ---- asking
    def ping(self, hostnames: Iterable[str]) -> None:
        with self._cond:
            self._pending.update(h for h in hostnames if h not in self._in_flight)
            if self._pending:
                self._start("ping", self._ping_lane)
                self._cond.notify_all()

    def census(self) -> None:
        """One broadcast ``active_queues``: every worker that answers says it lives and what it consumes."""
        with self._cond:
            if not self._census_in_flight:
                self._census_pending = True
                self._start("census", self._census_lane)
                self._cond.notify_all()

    def inspect(self, stats: Iterable[str] = (), check: Iterable[str] = ()) -> None:
        """Targeted ``inspect stats`` (pool size, tasks taken) and stall confirmations, off the tick's path."""
        with self._cond:
            self._inspect_pending["stats"].update(stats)
            self._inspect_pending["check"].update(check)
            if any(self._inspect_pending.values()):
                self._start("inspect", self._inspect_lane)
                self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy()

    def _busy(self) -> bool:
        return bool(self._pending or self._in_flight or self._census_pending or self._census_in_flight
                    or any(self._inspect_pending.values()) or self._inspect_in_flight)

    def wait(self, timeout: float) -> bool:
        """Until every round asked for has completed (True), or ``timeout`` (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def ask_now(self, hostnames: Iterable[str] = (), broadcast: int = 0) -> set[str]:
        """For `once`, which has no next tick: synchronous. A broadcast ping that returns once
        ``broadcast`` workers replied (0: none is sent), then a targeted ping (returns once all
        replied) of the ``hostnames`` that did not answer it. Replies land in the news as pongs,
        stamped with the time the first ping was sent; hostnames asked that did not answer, as
        noreplies. Returns who answered. BrokerUnreachable when the broker is down."""
        at = self.clock()
        answered: set[str] = set()
        if broadcast > 0:
            answered |= broadcast_ping(self.app, broadcast, self.timeout)
        wanted = set(hostnames)
        rest = wanted - answered
        if rest:
            answered |= ping(self.app, rest, self.timeout)
        with self._cond:
            for h in answered:
                self._news.pongs[h] = max(at, self._news.pongs.get(h, at))
            for h in wanted - answered:
                self._news.noreplies[h] = at
        return answered

    def census_now(self, hostnames: Iterable[str]) -> None:
        """For `once`: a targeted ``active_queues`` of workers known to live (returns once all
        replied), recorded as a census (what each consumes)."""
        wanted = sorted(set(hostnames))
        at = self.clock()
        replies = _targeted(self.app, "active_queues", wanted, self.timeout) if wanted else {}
        with self._cond:
            for h, qs in replies.items():
                names = frozenset(q["name"] for q in (qs or []) if isinstance(q, dict) and isinstance(q.get("name"), str))
                self._news.pongs[h] = max(at, self._news.pongs.get(h, at))
                self._news.queues[h] = WorkerQueues(at, names)
            self._news.census_at = at
            self.censuses += 1

    def collect(self) -> ControlNews:
        with self._cond:
            news, self._news = self._news, ControlNews(census_at=None)
            return news

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in list(self._threads.values()):
            if t is not threading.current_thread():
                t.join(timeout)

    # ---- the lanes
    def _start(self, name: str, target) -> None:
        t = self._threads.get(name)
        if self._stopping or (t is not None and t.is_alive()):
            return
        def run() -> None:
            from supervisor import osthread

            osthread.name(f"cs-{name}")
            target()

        t = threading.Thread(target=run, name=f"control:{name}", daemon=True)
        self._threads[name] = t
        t.start()

    def _ping_lane(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                hosts = sorted(self._pending)
                self._pending.clear()
                self._in_flight = set(hosts)
            at = self.clock()
            answered, error = None, None
            try:
                answered = ping(self.app, hosts, self.timeout)
            except Exception as e:  # the broker went away: nothing learned; the tick says why
                error = redact.scrub(e)
                log.debug("ping round failed: %s", error)
            with self._cond:
                if answered is not None:
                    for h in hosts:
                        if h in answered:
                            self._news.pongs[h] = max(at, self._news.pongs.get(h, at))
                        else:
                            self._news.noreplies[h] = at
                    self.sent.update(hosts)
                    self.rounds += 1
                else:
                    self._news.error = error
                self._in_flight = set()
                self._cond.notify_all()
            if answered is not None and self.on_ping_done is not None:
                self.on_ping_done()

    def _census_lane(self) -> None:
        while True:
            with self._cond:
                while not self._census_pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._census_pending = False
                self._census_in_flight = True
            at = self.clock()
            replies, error = None, None
            try:
                replies = active_queues(self.app, 0, self.timeout)  # everyone: it finds workers too
            except Exception as e:
                error = redact.scrub(e)
                log.debug("census failed: %s", error)
            with self._cond:
                if replies is not None:
                    for h, names in replies.items():
                        self._news.pongs[h] = max(at, self._news.pongs.get(h, at))
                        self._news.queues[h] = WorkerQueues(at, frozenset(names))
                    self._news.census_at = at
                    self.censuses += 1
                else:
                    self._news.error = error
                self._census_in_flight = False
                self._cond.notify_all()

    def _inspect_lane(self) -> None:
        while True:
            with self._cond:
                while not any(self._inspect_pending.values()) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                want = {k: sorted(v) for k, v in self._inspect_pending.items()}
                for v in self._inspect_pending.values():
                    v.clear()
                self._inspect_in_flight = True
            at = self.clock()
            got_stats, got_checks, error = {}, {}, None
            try:
                if want["stats"]:
                    got_stats = stats(self.app, want["stats"], self.timeout, at)
                if want["check"]:
                    got_checks = stall_check(self.app, want["check"], self.timeout, at)
            except Exception as e:
                error = redact.scrub(e)
                log.debug("inspect round failed: %s", error)
            with self._cond:
                for h, st in got_stats.items():
                    self._news.stats[h] = st
                    self._news.pongs[h] = max(at, self._news.pongs.get(h, at))
                for h, c in got_checks.items():
                    self._news.checks[h] = c
                    self._news.pongs[h] = max(at, self._news.pongs.get(h, at))
                if error:
                    self._news.error = error
                self._inspect_in_flight = False
                self._cond.notify_all()
