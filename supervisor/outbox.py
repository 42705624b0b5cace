"""The alert outbox: the last stages of the pipeline (deliver -> retry), made durable.

A tick *accepts* its messages: one outbox row per (message, channel), written in the same SQLite
transaction as the decision core's memory (``StateStore.save``). Only then are they handed to the
Notifier (one thread per channel, per-attempt timeout, quick retries). The Notifier reports each
delivery; a message it gives up on, or one still queued at shutdown or at a SIGKILL, stays
pending in the outbox and is sent again later, with a growing wait, until it is delivered or
``GIVE_UP`` has passed. So an alert accepted before a crash is delivered after it, and one that
was delivered is never sent twice (at most once more if the process dies between the channel's
answer and its row's update).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable

from supervisor.model import Action
from supervisor.notify import Message, Notifier, routes
from supervisor.state import StateStore, new_msg_id

log = logging.getLogger("supervisor")
GIVE_UP = 24 * 3600.0  # an alert not delivered for this long is marked failed
RETRY_MAX = 1800.0  # outbox retries wait notify.retry's last wait (at least 1 s), doubling up to this


class Outbox:
    def __init__(self, store: StateStore, notifier: Notifier, clock: Callable[[], float] = time.time):
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self._lock = threading.Lock()
        self._queued: set[tuple[str, str]] = set()  # (msg id, channel) handed to the notifier
        retry = notifier.cfg.retry
        self.base_wait = max(float(retry[-1]) if retry else 60.0, 1.0)
        self._chained = notifier.on_done
        notifier.on_done = self._on_done

    def share_queued(self, other: Outbox) -> None:
        """Take over another Outbox's record of what is in its notifier (a config reload)."""
        self._queued = other._queued
        self._lock = other._lock

    def accept(self, msgs: Iterable[Message]) -> tuple[list[Message], list[tuple[str, str, dict]]]:
        """Give each message an id; the outbox rows to write with the tick's memory."""
        out, rows = [], []
        send_resolved = self.notifier.cfg.send_resolved
        channels = [c for c in self.notifier.cfg.channels if c.name not in self.notifier.errors]
        for m in msgs:
            m = dataclasses.replace(m, id=m.id or new_msg_id())
            out.append(m)
            if m.kind == "resolved" and not send_resolved:
                continue
            rows += [(m.id, c.name, m.to_json()) for c in routes(m, channels)]
        return out, rows

    def _waits(self, msg: Message, channel: str) -> bool:
        """An older message of the same key waits in the outbox (not in the notifier) for this
        channel: this one waits behind it, so a RESOLVED never overtakes its FIRING."""
        if not msg.key:
            return False
        for mid, ch, body, _ in self.store.outbox_pending():  # oldest first
            if mid == msg.id and ch == channel:
                return False
            if ch == channel and body.get("key") == msg.key:
                return True  # in the notifier or waiting for a retry: one message per key at a time
        return False

    def send(self, msg: Message, only: str | None = None, check_order: bool = True) -> list[Action]:
        targets = [c.name for c in routes(msg, self.notifier.cfg.channels) if only in (None, c.name)]
        actions: list[Action] = []
        go = []
        for c in targets:
            if check_order and self._waits(msg, c):  # stays pending; retry_due sends it after the older one
                actions.append(Action("alert", msg.group, c, msg.title, hostname=msg.hostname, executed=True,
                                      severity=msg.severity, result="queued (behind an older alert being retried)"))
            else:
                go.append(c)
        with self._lock:
            self._queued.update((msg.id, c) for c in go)
        for c in go:
            actions += self.notifier.send(msg, only=c)
        return actions

    def retry_due(self, all_pending: bool = False) -> int:
        """Hand the notifier the pending rows that are due (``all_pending``: at start, every one) and
        not already queued, oldest first, never a message before an older one of its key. Returns how
        many."""
        n = 0
        now = self.clock()
        blocked: set[tuple[str, str]] = set()
        with self._lock:
            queued = set(self._queued)
        for msg_id, channel, body, attempts in self.store.outbox_pending():
            key = (body.get("key", ""), channel)
            if (msg_id, channel) in queued or key in blocked or (
                    not all_pending and self._next_at(msg_id, channel) > now):
                if key[0]:  # later messages of this key wait for this one
                    blocked.add(key)
                continue
            if key[0]:
                blocked.add(key)
            msg = Message.from_json(body)
            if channel not in self.notifier.channels:  # the channel left the config
                self.store.outbox_done(msg_id, channel, False, "channel no longer configured")
                continue
            log.info("alert to channel %s from the outbox (attempt %d): %s", channel, attempts + 1, msg.title)
            self.send(msg, only=channel, check_order=False)
            n += 1
        return n

    def _next_at(self, msg_id: str, channel: str) -> float:
        row = self.store.outbox_row(msg_id, channel)
        return row[3] if row else 0.0

    def _on_done(self, channel: str, msg: Message, delivered: bool, error: str | None) -> None:
        try:
            if msg.id:
                with self._lock:
                    self._queued.discard((msg.id, channel))
                self._record(channel, msg, delivered, error)
        finally:
            if self._chained is not None:
                self._chained(channel, msg, delivered, error)

    def _record(self, channel: str, msg: Message, delivered: bool, error: str | None) -> None:
        if delivered:
            self.store.outbox_done(msg.id, channel, True, None)
            return
        row = self.store.outbox_row(msg.id, channel)
        if row is None or row[2] != "pending":
            return
        created, attempts, _, _ = row
        now = self.clock()
        if now - created > GIVE_UP:
            log.error("alert to channel %s given up after %d outbox attempts: %s", channel, attempts + 1, msg.title)
            self.store.outbox_done(msg.id, channel, False, error, retry_at=None)
            return
        wait = min(self.base_wait * 2 ** max(attempts - 1, 0), RETRY_MAX)
        self.store.outbox_done(msg.id, channel, False, error, retry_at=now + wait)
