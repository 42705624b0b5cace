"""Following worker heartbeats: worker-online / worker-heartbeat / worker-offline, on our own clock.

``HeartbeatSource`` is the small interface the loop uses; ``make_source`` picks its implementation:

- ``RedisHeartbeatSource`` (supervisor.observe.redis_heartbeats) for every Redis broker: redis-py
  subscribed to kombu's own fanout pattern for ``worker.#``, a sixth of celery's receiver's cost;
- ``EventReceiverSource`` (here) for RabbitMQ and the rest: celery's event receiver, bound to
  ``worker.#`` only (no task event ever reaches us) and never broadcasting ``enable_events``.

Both share ``ThreadedSource``: the background thread with its reconnect backoff and outage
bookkeeping (``listening_since``, ``error``), and ``apply_event``, the one place where an event
updates the fixed record kept per worker, a ``WorkerSeen`` in snapshots (hostnames checked
first, see supervisor.hostnames).

Every event is stamped with the supervisor's clock at arrival, never the worker's timestamp:
a worker with a wrong clock, or events delayed in the broker, must not make a worker look
alive or dead.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from celery import Celery
from kombu import Consumer

from supervisor import redact
from supervisor.hostnames import Refusals
from supervisor.model import WorkerSeen
from supervisor.observe.celeryapp import broker_of, describe_error, display_url, release

log = logging.getLogger(__name__)

EventCallback = Callable[[str, str, float], None]  # (kind, hostname, at)
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")


@dataclass(frozen=True)
class HeartbeatSnapshot:
    workers: dict[str, WorkerSeen] = field(default_factory=dict)
    # since when the stream has been consuming without a break; None while disconnected
    listening_since: float | None = None
    error: str | None = None  # why the stream is down (scrubbed); None while consuming


class HeartbeatSource:
    """What the loop needs from a heartbeat stream. Implementations run in the background and
    must make ``snapshot()`` cheap and safe to call from another thread."""

    on_event: EventCallback | None = None
    # (hostname, at): a worker heard for the first time, or again after worker-offline / worker-online
    on_heard: Callable[[str, float], None] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 2.0) -> None:
        raise NotImplementedError

    def snapshot(self) -> HeartbeatSnapshot:
        raise NotImplementedError

    def forget(self, hostnames) -> None:
        """Drop what is known of workers that left for good (memory stays flat across deploys)."""
        raise NotImplementedError

    def worker(self, hostname: str) -> WorkerSeen | None:
        """What is known of one worker now (the wake thread's check of an expired deadline)."""
        return self.snapshot().workers.get(hostname)

    def __enter__(self) -> HeartbeatSource:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_instances = itertools.count()


def default_node_id() -> str:
    """``supervisor.<host>.<pid>``, with a suffix for a second source in the same process.

    Stable for the life of a source: its event queue (and, on Redis, its member of the set
    ``_kombu.binding.celeryev``) is the same after every reconnect."""
    n = next(_instances)
    base = f"supervisor.{socket.gethostname()}.{os.getpid()}"
    return base if n == 0 else f"{base}.{n}"


class WorkerRecord:
    """The fixed record kept per worker (nothing per event is kept beyond it). Updated in place by
    ``apply_event``; ``seen()`` is its immutable ``WorkerSeen``, built at most once per change (a
    snapshot per tick, not an object per heartbeat)."""

    __slots__ = ("hostname", "last_heartbeat", "online_at", "offline_at", "active", "processed", "pid", "freq",
                 "_seen")

    def __init__(self, hostname: str):
        self.hostname = hostname
        self.last_heartbeat = self.online_at = self.offline_at = None
        self.active = self.processed = self.pid = self.freq = None
        self._seen: WorkerSeen | None = None

    def seen(self) -> WorkerSeen:
        s = self._seen
        if s is None:
            s = self._seen = WorkerSeen(
                hostname=self.hostname, last_heartbeat=self.last_heartbeat, online_at=self.online_at,
                offline_at=self.offline_at, active=self.active, processed=self.processed, pid=self.pid,
                freq=self.freq)
        return s


def apply_event(rec: WorkerRecord, kind: str, event: dict, now: float) -> None:
    """What one worker event (already known to carry an acceptable hostname) makes of the record
    kept for that worker, stamped ``now`` on our clock (the worker's own timestamp is never used)."""
    rec._seen = None
    if kind == "worker-offline":
        rec.offline_at = now
        return
    rec.last_heartbeat = now
    rec.offline_at = None
    if kind == "worker-online":
        rec.online_at = now
    get = event.get
    # the common case (what celery sends) without a call; anything else through _int / _float
    v = get("active")
    rec.active = v if type(v) is int else _int(v, rec.active)
    v = get("processed")
    rec.processed = v if type(v) is int else _int(v, rec.processed)
    v = get("pid")
    rec.pid = v if type(v) is int else _int(v, rec.pid)
    v = get("freq")
    rec.freq = v if type(v) is float else _float(v, rec.freq)


class ThreadedSource(HeartbeatSource):
    """What both sources share: a daemon thread that runs ``_consume`` (connect, listen until stopped
    or broken) again and again with capped backoff, the fixed record per worker, and the outage
    bookkeeping.

    - ``snapshot().listening_since`` is None while disconnected and the time consuming resumed
      after a reconnect (set by ``_listening()``); ``snapshot().error`` says why it is down (None
      while consuming); ``last_error`` keeps the last one.
    - ``_on_worker_event`` / ``_on_other_event`` / ``_bad_message`` take what the stream decoded.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        node_id: str | None = None,
        on_event: EventCallback | None = None,
        *,
        backoff: tuple[float, float] = (0.5, 5.0),
        display: str = "the broker",
    ):
        self.clock = clock
        self.node_id = node_id or default_node_id()
        self.on_event = on_event
        self.backoff = backoff
        self.display = display  # the broker's redacted URL, for messages
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerRecord] = {}
        self._listening_since: float | None = None
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # anyone who can publish to the broker can forge an event: a hostname with whitespace, a
        # quote, a control character or a leading "-" is refused (logged once per hostname)
        self._refusals = Refusals(log, "worker events")
        self.connects = 0  # successful (re)connections, for tests and narration
        self.other_events = 0  # events that are not worker-* (should stay 0)
        self.bad_messages = 0  # undecodable or malformed event messages, ignored
        self.last_error: tuple[float, str] | None = None  # (when, what), kept after a reconnect

    # ------------------------------------------------------------------ interface
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"heartbeats:{self.node_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        with self._lock:
            self._listening_since = None

    def snapshot(self) -> HeartbeatSnapshot:
        with self._lock:
            return HeartbeatSnapshot({h: r.seen() for h, r in self._workers.items()}, self._listening_since,
                                     self._error)

    def forget(self, hostnames) -> None:
        with self._lock:
            for h in hostnames:
                self._workers.pop(h, None)

    def worker(self, hostname: str) -> WorkerSeen | None:
        with self._lock:
            rec = self._workers.get(hostname)
            return rec.seen() if rec is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ events
    def _on_worker_event(self, event: dict) -> None:
        self._on_worker_events((event,))

    def _on_worker_events(self, events, stamp: float | None = None) -> None:
        """Worker events read together (one drain of the stream): stamped ``stamp`` (a time on our
        clock no later than their arrival; None: now), applied under one acquisition of the lock;
        callbacks run after it is released."""
        workers, accept = self._workers, self._refusals.accept
        now = self.clock() if stamp is None else stamp
        heard: list[str] = []
        told: list[tuple[str, str]] | None = [] if self.on_event is not None else None
        with self._lock:
            for event in events:
                hostname = event.get("hostname")
                if not hostname:
                    continue
                # a hostname already on record was accepted then: checked once, not on every heartbeat
                rec = workers.get(hostname) if type(hostname) is str else None
                if rec is None:
                    if not accept(hostname):
                        continue
                    rec = workers[hostname] = WorkerRecord(hostname)
                kind = event.get("type", "")
                if (rec.last_heartbeat is None or rec.offline_at is not None or kind == "worker-online") \
                        and kind != "worker-offline":
                    heard.append(hostname)  # first heard, or back: its heartbeat deadline starts (wake.py)
                apply_event(rec, kind, event, now)
                if told is not None:
                    told.append((kind, hostname))
        if heard and self.on_heard is not None:
            for hostname in heard:
                try:
                    self.on_heard(hostname, now)
                except Exception:  # the stream must never stop for it; the next tick sets the deadline
                    log.exception("heartbeat on_heard callback failed")
        if told:
            for kind, hostname in told:
                self._narrate(kind, hostname, now)

    def _on_other_event(self, event: dict) -> None:
        self.other_events += 1
        self._narrate(str(event.get("type", "?")), str(event.get("hostname", "")), self.clock())

    def _bad_message(self, exc: BaseException | str) -> None:
        self.bad_messages += 1
        if self.bad_messages == 1 or self.bad_messages % 1000 == 0:
            log.warning(
                "ignored %d event message(s) that could not be read (event_serializer must be json): %s",
                self.bad_messages,
                redact.scrub(exc),
            )

    def _narrate(self, kind: str, hostname: str, at: float) -> None:
        cb = self.on_event
        if cb is None:
            return
        try:
            cb(kind, hostname, at)
        except Exception:
            log.exception("heartbeat on_event callback failed")

    # ------------------------------------------------------------------ the thread
    def _listening(self) -> None:
        """Called by ``_consume`` once it receives: the stream is up again, from now on."""
        with self._lock:
            self._listening_since = self.clock()
            self._error = None
        self.connects += 1
        log.info("listening to worker heartbeats on %s", self.display)

    def _run(self) -> None:
        from supervisor import osthread

        osthread.name("cs-heartbeats")
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                self._consume()
                delay = self.backoff[0]
                with self._lock:
                    self._listening_since = None
            except Exception as exc:  # anything at all: record it, back off, reconnect
                msg = redact.scrub(f"event stream from {self.display}: {describe_error(exc)}")
                with self._lock:  # both at once: a reader never sees "down" without its reason
                    self._listening_since = None
                    self._error = msg
                self.last_error = (self.clock(), msg)
                log.warning("%s (reconnecting in %.1fs)", msg, delay)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.backoff[1])

    def _consume(self) -> None:
        """Connect, call ``_listening()``, deliver events until ``self._stop`` is set (return) or the
        connection breaks (raise)."""
        raise NotImplementedError


class EventReceiverSource(ThreadedSource):
    """Celery's event receiver in a daemon thread, reconnecting with capped backoff.

    - Bound to ``worker.#`` only, under a stable node id (one queue, one Redis binding member,
      whatever the number of reconnects; a clean ``stop()`` removes the member).
    - On each (re)connect it broadcasts the control command ``heartbeat`` (``wakeup``), so that
      every live worker shows up at once instead of within its 2 s interval.
    - A broker that dies is noticed at once (the socket closes); one that goes silent is noticed
      by AMQP heartbeats (``amqp_heartbeat``, about 2-3 of them) or, on Redis, by a PING every
      ``liveness_interval`` bounded by the socket timeout (``connect_timeout``).
    - On Redis it sleeps ``batch_interval`` (50 ms) after each batch it reads, so that it wakes a
      few times a second whatever the event rate (the lean source does the same).
    - ``stop()`` returns within about ``drain_interval`` (0.5 s), or ``timeout`` at worst while
      a connect attempt to a silent broker is in progress (the daemon thread then ends alone).
    """

    routing_key = "worker.#"

    def __init__(
        self,
        app: Celery,
        clock: Callable[[], float] = time.time,
        node_id: str | None = None,
        on_event: EventCallback | None = None,
        *,
        wakeup: bool = True,
        backoff: tuple[float, float] = (0.5, 5.0),
        drain_interval: float = 0.5,
        liveness_interval: float = 5.0,
        amqp_heartbeat: float = 5.0,
        batch_interval: float = 0.05,
    ):
        super().__init__(clock, node_id, on_event, backoff=backoff, display=display_url(app))
        self.batch_interval = batch_interval  # Redis: sleep after each batch (0: wake per message)
        self.app = app
        self.wakeup = wakeup
        self.drain_interval = drain_interval
        self.liveness_interval = liveness_interval
        self.amqp_heartbeat = amqp_heartbeat
        broker = broker_of(app)
        self.connect_timeout = float(broker.connect_timeout) if broker is not None else 3.0

    def _consume(self) -> None:
        is_amqp = getattr(broker_of(self.app), "scheme", "") in ("amqp", "amqps", "pyamqp")
        conn = self.app.connection_for_read(
            connect_timeout=self.connect_timeout, heartbeat=self.amqp_heartbeat if is_amqp else None
        )
        clean = False
        try:
            conn.ensure_connection(
                max_retries=1, timeout=self.connect_timeout, interval_start=0, interval_step=0, interval_max=0
            )
            channel = conn.channel()
            handlers = {k: self._on_worker_event for k in WORKER_EVENTS}
            handlers["*"] = self._on_other_event
            receiver = self.app.events.Receiver(
                channel, handlers=handlers, routing_key=self.routing_key, node_id=self.node_id
            )

            def on_message(body, message) -> None:
                try:
                    receiver._receive(body, message)  # decodes, adjusts the logical clock, dispatches
                except Exception as exc:  # one odd message must not cost a reconnect
                    self._bad_message(exc)

            consumer = Consumer(
                channel,
                queues=[receiver.queue],
                callbacks=[on_message],
                no_ack=True,
                accept=receiver.accept,  # json only: never unpickle what the broker hands us
                on_decode_error=lambda message, exc: self._bad_message(exc),
            )
            consumer.consume()
            self._listening()
            if self.wakeup:
                # ask every worker for a heartbeat now (a control `heartbeat`, not enable_events)
                try:
                    receiver.wakeup_workers(channel=channel)
                except Exception as exc:
                    log.debug("could not wake workers: %s", redact.scrub(exc))
            last_check = time.monotonic()
            # on Redis one drain_events reads every message the socket holds: sleeping after it lets
            # the next ones pile up (one wake-up per batch, not per message). Not on AMQP, where a
            # drain_events delivers one message.
            batch = 0.0 if is_amqp else self.batch_interval
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=self.drain_interval)
                    if batch:
                        time.sleep(batch)
                except TimeoutError:  # socket.timeout
                    pass
                if is_amqp:
                    conn.heartbeat_check()
                if time.monotonic() - last_check >= self.liveness_interval:
                    last_check = time.monotonic()
                    self._check_alive(channel)
            # a graceful stop: leave nothing behind in the broker
            try:
                consumer.cancel()
                if not is_amqp:
                    # Redis: drop our member of _kombu.binding.celeryev (RabbitMQ auto-deletes the queue)
                    channel.queue_delete(receiver.queue.name)
            except Exception as exc:
                log.debug("cleanup of the event queue failed: %s", redact.scrub(exc))
            clean = True
        finally:
            release(conn, graceful=clean)

    def _check_alive(self, channel) -> None:
        """A silent Redis (no FIN, no RST) never wakes the subscriber: ping it with the bounded
        socket timeout. AMQP has its heartbeats for that."""
        client = getattr(channel, "client", None)
        if client is not None and hasattr(client, "ping"):
            client.ping()


def _int(v, default):
    try:
        return int(v) if v is not None else default
    except (TypeError, ValueError):
        return default


def _float(v, default):
    try:
        return float(v) if v is not None else default
    except (TypeError, ValueError):
        return default


# which source follows the heartbeats: "auto" (the default: the lean one on Redis, celery's receiver
# elsewhere), "redis" or "kombu" (celery's receiver on Redis too: an escape hatch, should a Redis
# proxy or a fleet's transport need kombu's own reader)
SOURCE_ENV = "SUPERVISOR_HEARTBEAT_SOURCE"


def source_kind(broker, environ=None) -> str:
    """"redis" (RedisHeartbeatSource) or "kombu" (EventReceiverSource) for this broker."""
    wanted = (os.environ if environ is None else environ).get(SOURCE_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "redis", "kombu"):
        log.warning("%s=%r is not auto, redis or kombu: using auto", SOURCE_ENV, wanted[:40])
        wanted = "auto"
    is_redis = broker is not None and broker.is_redis
    if wanted == "kombu" or not is_redis:
        return "kombu"
    return "redis"


def make_source(
    app: Celery,
    broker=None,
    clock: Callable[[], float] = time.time,
    on_event: EventCallback | None = None,
    **kwargs,
) -> ThreadedSource:
    """The heartbeat source for this broker (``broker``: a BrokerConfig, by default the app's):
    the lean Redis reader for every Redis-family URL, celery's event receiver for the rest."""
    broker = broker if broker is not None else broker_of(app)
    if source_kind(broker) == "redis":
        from supervisor.observe.redis_heartbeats import RedisHeartbeatSource

        return RedisHeartbeatSource(broker, clock=clock, on_event=on_event, app=app, **kwargs)
    return EventReceiverSource(app, clock=clock, on_event=on_event, **kwargs)
