"""Alert delivery through Apprise: messages for rule transitions, routing by severity, background
delivery with a per-attempt timeout, retries, and counters.

``send()`` never touches the network: it queues the message for each channel whose ``severities``
list its severity and returns one ``Action`` per channel at once. Each channel has its own worker
thread, so a slow or dead channel delays no other channel and never the caller. Each attempt runs in
a helper daemon thread that the worker stops waiting for after the channel's ``timeout`` (Apprise
can hang on a dead server); a failed attempt is retried after the waits in ``notify.retry``, then
the message is dropped with an ERROR log.

Secrets: every title and body goes through ``redact.scrub``; channels are named in logs and
Actions, never their URLs; Apprise's own log records are scrubbed (a filter on its logger) and kept
from propagating: the reason of a failure is re-logged here, scrubbed.

Apprise is imported lazily, inside ``Notifier`` (its import and first ``add()`` cost 0.1 to 0.3 s).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from supervisor import redact
from supervisor.config import ChannelConfig, NotifyConfig
from supervisor.durations import format_duration
from supervisor.model import Action, Transition

log = logging.getLogger(__name__)

KINDS = ("firing", "resolved", "info", "test")
DETAIL_LIMIT = 3000  # characters of `detail` (restart output, log lines) kept in a message
MAX_QUEUE = 1000  # messages held per channel; beyond this the oldest waiting one is dropped
MAX_HANGING = 3  # attempts of one channel that may still hang in the background at once

# Apprise NotifyType values (apprise.NotifyType is a str enum with these values)
_NOTIFY_TYPE = {"critical": "failure", "warning": "warning", "info": "info"}
INVALID_URL = "not a valid Apprise URL"


# ---------------------------------------------------------------- messages
@dataclass(frozen=True)
class Message:
    title: str
    body: str
    severity: str  # info | warning | critical (for a resolved message: the severity it fired with)
    kind: str  # firing | resolved | info | test
    key: str = ""  # the rule state key (rule:subject); messages of one key are delivered in order
    group: str | None = None
    hostname: str | None = None
    id: str = ""  # the outbox's id of this message (supervisor.state), "" when not kept there

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Message:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def iso_utc(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate_detail(text: str, limit: int = DETAIL_LIMIT) -> str:
    """At most about ``limit`` characters: the first line (what was done) and the END of the rest
    (the last log lines matter most), cut at a line boundary, with a marker saying how much was
    left out."""
    text = text.strip("\n")
    if len(text) <= limit:
        return text
    first, _, rest = text.partition("\n")
    head = first if len(first) <= 300 else first[:300] + "..."
    budget = max(0, limit - len(head) - 60)
    tail = rest[-budget:] if budget else ""
    nl = tail.find("\n")
    if 0 <= nl < len(tail) // 2:  # start the tail on a whole line when that costs little
        tail = tail[nl + 1 :]
    cut = (len(first) - min(len(first), 300)) + (len(rest) - len(tail))
    return "\n".join(x for x in (head, f"[... {cut} characters left out ...]", tail) if x)


def message_for(transition: Transition, detail: str = "", now: float | None = None, update: bool = False) -> Message:
    """The message people get for a rule state change (firing or resolved), or with ``update`` for
    something the supervisor did about a finding already announced (a second restart, its failure).

    ``detail`` says what the supervisor did (restart result, platform log lines); it is truncated
    to ``DETAIL_LIMIT`` characters keeping its end. ``now`` (optional) only sharpens the "for ..."
    duration of a firing message; without it the duration runs to ``fired_at``.
    """
    st = transition.state
    resolved = transition.new == "resolved"
    where = f" (group {st.group})" if st.group else ""
    if resolved:
        title = f"[RESOLVED] {st.rule} {st.subject}{where}"
    elif update:  # no state change, but the supervisor did something about it (a later restart)
        title = f"[STILL FIRING {st.severity}] {st.rule} {st.subject}{where}"
    elif transition.flapping:
        title = f"[FLAPPING {st.severity}] {st.rule} {st.subject}{where}"
    else:
        title = f"[FIRING {st.severity}] {st.rule} {st.subject}{where}"

    lines = [f"Resolved: {st.summary}" if resolved else st.summary, ""]
    if transition.flapping:
        from supervisor.rules import FLAP_COUNT, FLAP_WINDOW

        lines[1:1] = [f"This fired {FLAP_COUNT} times within {format_duration(FLAP_WINDOW)}: it is flapping. "
                      f"No more pages for it until it has been stable for {format_duration(FLAP_WINDOW)} "
                      "(then one RESOLVED if it is clear); `supervisor status` shows it meanwhile.", ""]
    lines.append(f"rule:        {st.rule}")
    lines.append(f"subject:     {st.subject}")
    lines.append(f"severity:    {st.severity}")
    if st.group:
        lines.append(f"group:       {st.group}")
    if st.hostname and st.hostname != st.subject:
        lines.append(f"hostname:    {st.hostname}")
    if resolved:
        end = st.resolved_at if st.resolved_at is not None else now
        held = f" (held {format_duration(end - st.since)})" if end is not None else ""
        lines.append(f"since:       {iso_utc(st.since)}{held}")
        if st.fired_at is not None:
            lines.append(f"fired at:    {iso_utc(st.fired_at)}")
        if st.resolved_at is not None:
            firing = f" (firing for {format_duration(st.resolved_at - st.fired_at)})" if st.fired_at else ""
            lines.append(f"resolved at: {iso_utc(st.resolved_at)}{firing}")
    else:
        end = now if now is not None else st.fired_at
        held = f" (for {format_duration(max(0.0, end - st.since))})" if end is not None else ""
        lines.append(f"since:       {iso_utc(st.since)}{held}")
        if st.fired_at is not None:
            lines.append(f"fired at:    {iso_utc(st.fired_at)}")
    detail = truncate_detail(detail) if detail else ""
    if detail:
        lines += ["", "What the supervisor did:", detail]
    lines += ["", f"-- celery-supervisor on {platform.node() or 'unknown host'}"]
    return Message(
        title=redact.scrub(title),
        body=redact.scrub("\n".join(lines)),
        severity=st.severity,
        kind="resolved" if resolved else "firing",
        key=transition.key,
        group=st.group,
        hostname=st.hostname,
    )


def build_test_message(now: float | None = None) -> Message:
    """What ``test_all`` (``supervisor test-alert``) sends."""
    node = platform.node() or "unknown host"
    when = iso_utc(now if now is not None else time.time())
    return Message(
        title=f"[TEST] celery-supervisor on {node}",
        body=f"A test notification from celery-supervisor on {node} at {when}.\n"
        "If you read this, alerts reach this channel.",
        severity="info",
        kind="test",
        key="test",
    )


def notify_type(msg: Message) -> str:
    """The Apprise NotifyType value for a message: resolved -> success, critical -> failure,
    warning -> warning, anything else -> info."""
    if msg.kind == "resolved":
        return "success"
    if msg.kind == "test":
        return "info"
    return _NOTIFY_TYPE.get(msg.severity, "info")


def routes(msg: Message, channels: Iterable[ChannelConfig]) -> list[ChannelConfig]:
    """The channels a message goes to: those listing its severity (a resolved message carries the
    severity it fired with, so it reaches the channels that got the firing); a test goes to all."""
    if msg.kind == "test":
        return list(channels)
    return [c for c in channels if msg.severity in c.severities]


# ---------------------------------------------------------------- logging hygiene
_tame_lock = threading.Lock()


def tame_apprise_logging(propagate: bool = False) -> None:
    """Scrub every record Apprise (and urllib3's connection pool, which logs request paths that can
    hold webhook tokens) emits, and keep Apprise's records to itself unless ``propagate``: the
    Notifier re-logs each failure's reason, scrubbed. Apprise's logger level is set to WARNING when
    unset, which is what its per-call result capture needs and no debug noise besides."""
    with _tame_lock:
        for name in ("apprise", "urllib3.connectionpool"):
            lg = logging.getLogger(name)
            if not any(isinstance(f, redact.ScrubFilter) for f in lg.filters):
                lg.addFilter(redact.ScrubFilter())
        alog = logging.getLogger("apprise")
        if alog.level == logging.NOTSET:
            alog.setLevel(logging.WARNING)
        alog.propagate = propagate


def url_error(url: str) -> str | None:
    """Why Apprise refuses one channel URL (never the URL itself), or None. Imports Apprise."""
    tame_apprise_logging()
    import apprise

    redact.register_url(url, tokens=True)
    try:
        _build_apprise(apprise, url)
    except ValueError as e:
        return redact.scrub(str(e))
    return None


def channel_errors(cfg: NotifyConfig) -> dict[str, str]:
    """Channel name -> why Apprise refuses its URL (never the URL itself); sends nothing."""
    out = {}
    for c in cfg.channels:
        err = url_error(c.url.get_secret_value())
        if err:
            out[c.name] = f"channel {c.name!r}: {err}"
    return out


def _build_apprise(ap: Any, url: str) -> Any:
    """One Apprise object for one URL. ValueError (without the URL) when Apprise refuses it."""
    try:
        # attempts run inline in our helper thread: no Apprise worker pool, no Apprise deadline
        asset = ap.AppriseAsset(async_mode=False, service_timeout=0)
    except Exception:  # Apprise 1.x: no service_timeout
        asset = ap.AppriseAsset(async_mode=False)
    obj = ap.Apprise(asset=asset)
    try:
        ok = obj.add(url)
    except Exception:
        ok = False
    if not ok or len(obj) == 0:
        raise ValueError(f"{INVALID_URL} ({redact.redact_apprise_url(url)})")
    return obj


# ---------------------------------------------------------------- delivery
@dataclass
class _Item:
    seq: int
    msg: Message
    due: float  # monotonic time of the next attempt
    queued_at: float  # monotonic
    attempts: int = 0
    in_flight: bool = False


@dataclass
class ChannelStats:
    delivered: int = 0  # messages that arrived
    failed: int = 0  # failed attempts (each retry that fails counts)
    retried: int = 0  # retry attempts scheduled after a failure
    dropped: int = 0  # messages given up on (retries spent, queue full, or closed)
    last_error: str | None = None
    last_delivered_at: float | None = None  # the notifier's clock
    last_failed_at: float | None = None
    last_latency: float | None = None  # seconds from send() to delivery of the last message delivered


@dataclass
class _Channel:
    cfg: ChannelConfig
    error: str | None = None  # set when the URL is unusable: the channel never delivers
    apobj: Any = None
    items: list[_Item] = field(default_factory=list)
    stats: ChannelStats = field(default_factory=ChannelStats)
    hanging: list[threading.Thread] = field(default_factory=list)
    thread: threading.Thread | None = None
    pace: float = 0.0  # seconds Apprise wants between two messages of this service (its throttle)
    last_start: float | None = None  # monotonic start of the last attempt through `apobj`

    @property
    def name(self) -> str:
        return self.cfg.name


class Notifier:
    """Delivers Messages to the configured Apprise channels in the background.

    ``on_done(channel, message, delivered, error)`` (optional) is called from a worker thread when a
    message is delivered or given up on: a hook for an outbox or metrics.
    """

    def __init__(
        self,
        cfg: NotifyConfig,
        clock: Callable[[], float] = time.time,
        on_done: Callable[[str, Message, bool, str | None], None] | None = None,
        quiet_apprise: bool = True,
        max_queue: int = MAX_QUEUE,
    ):
        self._apprise: Any = None
        if cfg.channels:
            tame_apprise_logging(propagate=not quiet_apprise)  # before the import: it logs already
            import apprise  # lazy: 0.1 s, plus 0.1 to 0.2 s on the first add()

            self._apprise = apprise
        self.cfg = cfg
        self.clock = clock
        self.on_done = on_done
        self.max_queue = max_queue
        self._retry: list[float] = [float(w) for w in cfg.retry]
        self._cond = threading.Condition()
        self._seq = 0
        self._closed = False
        self._stopping = False
        self._channels: dict[str, _Channel] = {}
        for c in cfg.channels:
            url = c.url.get_secret_value()
            redact.register_url(url, tokens=True)  # idempotent; covers configs not built by load_config
            ch = _Channel(cfg=c)
            try:
                ch.apobj = self._build(url)
                ch.pace = max(
                    (float(getattr(sv, "request_rate_per_sec", 0) or 0) for sv in ch.apobj), default=0.0
                )
            except ValueError as e:
                ch.error = redact.scrub(f"channel {c.name!r}: {e}")
                log.error("%s", ch.error)
            self._channels[c.name] = ch
        for ch in self._channels.values():
            if ch.error is None:
                ch.thread = threading.Thread(
                    target=self._worker, args=(ch,), name=f"notify-{ch.name}", daemon=True
                )
                ch.thread.start()

    # -------------------------------------------------------- building
    def _build(self, url: str) -> Any:
        return _build_apprise(self._apprise, url)

    # -------------------------------------------------------- public API
    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    @property
    def errors(self) -> dict[str, str]:
        """Channels that cannot deliver (invalid URL): name -> reason."""
        return {n: ch.error for n, ch in self._channels.items() if ch.error}

    def send(self, msg: Message, only: str | None = None) -> list[Action]:
        """Queue ``msg`` for every channel that takes its severity (``only``: just that channel, an
        outbox retry); returns at once, one Action per channel (result "queued", or why the channel
        cannot take it). A resolved message goes nowhere when ``notify.send_resolved`` is false."""
        if msg.kind not in KINDS:
            raise ValueError(f"unknown message kind {msg.kind!r}: use one of {', '.join(KINDS)}")
        if msg.kind == "resolved" and not self.cfg.send_resolved:
            return []
        msg = dataclasses.replace(msg, title=redact.scrub(msg.title), body=redact.scrub(msg.body))
        actions: list[Action] = []
        dropped: list[tuple[_Channel, _Item]] = []
        targets = routes(msg, (ch.cfg for ch in self._channels.values()))
        if only is not None:
            targets = [c for c in targets if c.name == only]
        with self._cond:
            for c in targets:
                ch = self._channels[c.name]
                if ch.error is not None:
                    result, executed = f"failed: {INVALID_URL}", False
                elif self._closed:
                    result, executed = "failed: notifier closed", False
                else:
                    now = time.monotonic()
                    self._seq += 1
                    ch.items.append(_Item(seq=self._seq, msg=msg, due=now, queued_at=now))
                    if len(ch.items) > self.max_queue:
                        victim = next((i for i in ch.items if not i.in_flight), None)
                        if victim is not None:
                            ch.items.remove(victim)
                            ch.stats.dropped += 1
                            dropped.append((ch, victim))
                    result, executed = "queued", True
                actions.append(
                    Action(
                        kind="alert",
                        group=msg.group,
                        target=c.name,
                        hostname=msg.hostname,
                        reason=msg.title,
                        executed=executed,
                        severity=msg.severity,
                        result=result,
                    )
                )
            self._cond.notify_all()
        for ch, item in dropped:
            log.error(
                "alert to channel %s dropped: more than %d messages wait for it (%s)",
                ch.name,
                self.max_queue,
                item.msg.title,
            )
            self._done(ch, item, False, "queue full")
        return actions

    def pending(self) -> int:
        """Messages queued or being delivered, over all channels (those waiting for a retry included)."""
        with self._cond:
            return sum(len(ch.items) for ch in self._channels.values())

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued message is delivered or dropped. True when the queues are empty."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(ch.items for ch in self._channels.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, timeout: float = 10.0) -> bool:
        """Take no more messages, deliver what is queued for up to ``timeout`` seconds, then stop the
        workers; messages still queued are dropped (logged). True when nothing was left behind."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        clean = self.flush(timeout)
        with self._cond:
            self._stopping = True
            # an attempt under way is left to its worker: it ends delivered or dropped (no retry now)
            left = [(ch, i) for ch in self._channels.values() for i in ch.items if not i.in_flight]
            for ch, item in left:
                ch.items.remove(item)
                ch.stats.dropped += 1
            self._cond.notify_all()
        for ch, item in left:
            log.error("alert to channel %s not delivered before shutdown: %s", ch.name, item.msg.title)
            self._done(ch, item, False, "not delivered before shutdown")
        for ch in self._channels.values():
            if ch.thread is not None and ch.thread is not threading.current_thread():
                ch.thread.join(1.0)
        return clean

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per channel: delivered, failed (attempts), retried, dropped, pending, last_error, ..."""
        with self._cond:
            out = {}
            for name, ch in self._channels.items():
                d = dataclasses.asdict(ch.stats)
                d["pending"] = len(ch.items)
                d["hanging"] = sum(1 for t in ch.hanging if t.is_alive())
                if ch.error:
                    d["last_error"] = ch.error
                out[name] = d
            return out

    def test_all(self, timeout: float | None = None) -> dict[str, str | None]:
        """Send a test message to every channel now, all channels at once, without queue or retry.
        channel name -> None when delivered, else the (scrubbed) reason. ``timeout`` bounds each
        channel's attempt (default: the channel's own ``timeout``)."""
        msg = build_test_message(self.clock())
        out: dict[str, str | None] = {}
        threads = []
        lock = threading.Lock()

        def one(ch: _Channel) -> None:
            limit = timeout if timeout is not None else ch.cfg.timeout
            try:
                ok, err = self._attempt(ch, msg, limit)
            except Exception as e:
                ok, err = False, redact.scrub(f"{type(e).__name__}: {e}")
            with lock:
                out[ch.name] = None if ok else err

        for ch in self._channels.values():
            if ch.error is not None:
                out[ch.name] = ch.error
                continue
            t = threading.Thread(target=one, args=(ch,), name=f"notify-test-{ch.name}", daemon=True)
            t.start()
            threads.append((ch, t))
        for ch, t in threads:
            limit = timeout if timeout is not None else ch.cfg.timeout
            t.join(limit + 5.0)
            with lock:
                out.setdefault(ch.name, f"no answer within {format_duration(limit)}")
        return {name: out[name] for name in self._channels}

    # -------------------------------------------------------- internals
    def _next(self, ch: _Channel) -> tuple[_Item | None, float | None]:
        """The item to attempt now (earliest due; a message waits for older ones of its key), or how
        long to wait for one. Called with the lock held."""
        now = time.monotonic()
        best: _Item | None = None
        keys_ahead: set[str] = set()
        for it in ch.items:  # in seq order
            blocked = bool(it.msg.key) and it.msg.key in keys_ahead
            if it.msg.key:
                keys_ahead.add(it.msg.key)
            if blocked or it.in_flight:
                continue
            if best is None or it.due < best.due:
                best = it
        if best is None:
            return None, None
        if best.due <= now:
            return best, None
        return None, best.due - now

    def _worker(self, ch: _Channel) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    item, wait = self._next(ch)
                    if item is not None and ch.last_start is not None:
                        # Apprise throttles some services (email: 5.5 s between messages) by
                        # sleeping inside notify(); wait here instead, so that the sleep does
                        # not count against the attempt's timeout
                        gap = ch.last_start + ch.pace + 0.01 - time.monotonic()
                        if ch.pace > 0 and gap > 0:
                            item, wait = None, gap
                    if item is not None:
                        item.in_flight = True
                        item.attempts += 1
                        break
                    self._cond.wait(wait)
            started = time.monotonic()
            try:
                ok, err = self._attempt(ch, item.msg, ch.cfg.timeout, shared=True)
            except Exception as e:  # never let a worker die
                ok, err = False, redact.scrub(f"{type(e).__name__}: {e}")
            self._settle(ch, item, ok, err, time.monotonic() - started)

    def _settle(self, ch: _Channel, item: _Item, ok: bool, err: str | None, took: float) -> None:
        """Count the attempt, then log and call on_done BEFORE a finished message leaves the queue,
        so that flush() returning True means its logs and hooks are done too."""
        total = len(self._retry) + 1
        with self._cond:
            if item not in ch.items:  # dropped meanwhile (close)
                item.in_flight = False
                return
            retry_in: float | None = None
            if ok:
                ch.stats.delivered += 1
                ch.stats.last_delivered_at = self.clock()
                ch.stats.last_latency = time.monotonic() - item.queued_at
            else:
                ch.stats.failed += 1
                ch.stats.last_error = err
                ch.stats.last_failed_at = self.clock()
                if item.attempts < total and not self._stopping:
                    retry_in = self._retry[item.attempts - 1]
                    item.due = time.monotonic() + retry_in
                    item.in_flight = False  # only this worker picks it up again
                    ch.stats.retried += 1
                else:
                    ch.stats.dropped += 1
        if ok:
            level = logging.INFO if item.attempts > 1 else logging.DEBUG
            log.log(
                level,
                "alert delivered to channel %s in %s (attempt %d): %s",
                ch.name,
                format_duration(took),
                item.attempts,
                item.msg.title,
            )
            self._done(ch, item, True, None)
        elif retry_in is not None:
            log.warning(
                "alert to channel %s failed (attempt %d of %d): %s; retrying in %s: %s",
                ch.name,
                item.attempts,
                total,
                err,
                format_duration(retry_in),
                item.msg.title,
            )
            with self._cond:
                self._cond.notify_all()
            return
        else:
            log.error(
                "alert to channel %s dropped after %d attempts: %s: %s",
                ch.name,
                item.attempts,
                err,
                item.msg.title,
            )
            self._done(ch, item, False, err)
        with self._cond:
            item.in_flight = False
            if item in ch.items:
                ch.items.remove(item)
            self._cond.notify_all()

    def _done(self, ch: _Channel, item: _Item, ok: bool, err: str | None) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(ch.name, item.msg, ok, err)
        except Exception:
            log.exception("notify on_done hook failed for channel %s", ch.name)

    def _attempt(
        self, ch: _Channel, msg: Message, timeout: float, shared: bool = False
    ) -> tuple[bool, str | None]:
        """One delivery attempt, in a helper daemon thread we stop waiting for after ``timeout``.

        ``shared``: use the channel's own Apprise object (the worker does, so that Apprise's
        per-service state such as its throttle carries over) unless an abandoned attempt may still
        be using it; otherwise a fresh one (test_all, which runs beside the worker)."""
        with self._cond:
            ch.hanging = [t for t in ch.hanging if t.is_alive()]
            stale = len(ch.hanging)
        if stale >= MAX_HANGING:
            return False, f"{stale} earlier attempts still hang; not starting another"
        if shared and stale == 0:
            apobj = ch.apobj
            with self._cond:
                ch.last_start = time.monotonic()
        else:
            apobj = self._build(ch.cfg.url.get_secret_value())
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["result"] = self._deliver(apobj, msg)
            except Exception as e:
                box["result"] = (False, redact.scrub(f"{type(e).__name__}: {e}"))
            finally:
                done.set()

        t = threading.Thread(target=run, name=f"notify-{ch.name}-attempt", daemon=True)
        t.start()
        if not done.wait(timeout):
            with self._cond:
                ch.hanging.append(t)
            return False, f"no answer within {format_duration(timeout)} (the attempt was abandoned)"
        return box["result"]

    def _deliver(self, apobj: Any, msg: Message) -> tuple[bool, str | None]:
        res = apobj.notify(
            body=msg.body,
            title=msg.title,
            notify_type=notify_type(msg),
            body_format="text",
        )
        try:
            ok = bool(res)  # Apprise 2.x: an AppriseResult (truthy on success); 1.x: a bool
            if ok:
                return True, None
            return False, redact.scrub(_failure_reason(res))
        finally:
            close = getattr(res, "close", None)
            if callable(close):
                close()


def _failure_reason(res: Any) -> str:
    """The warnings and errors Apprise captured during the call, or its status."""
    lines: list[str] = []
    logs = getattr(res, "logs", None)
    if callable(logs):
        try:
            for entry in logs():
                text = str(entry.message).strip()
                if entry.level in ("WARNING", "ERROR", "CRITICAL") and text and text not in lines:
                    lines.append(text)
        except Exception:
            pass
    status = getattr(res, "status", None)
    text = "; ".join(lines)[:500]
    if not text:
        text = f"delivery failed ({getattr(status, 'name', 'FAILURE').lower()})"
    return text
