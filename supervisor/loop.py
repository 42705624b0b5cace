"""The shell around the core: observe -> decide -> act -> record, once per tick.

All I/O lives here and in observe/, notify, platforms/; every decision is made by
``decide.Core``. A failing broker, platform or alert channel is reported and
retried on the next tick; it never ends the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from supervisor import redact
from supervisor.config import Config, GroupConfig
from supervisor.decide import Core, Decision
from supervisor.durations import format_duration as fd
from supervisor.model import Action, Observation, QueueSeen, Target, Transition, WorkerVerdict

log = logging.getLogger("supervisor")
LOG_LINES = 30  # lines of a crashed target's output attached to its alert
ONCE_LISTEN = 2.5  # seconds `once` listens to heartbeats (workers send one every 2 s)
# the census (one broadcast `inspect active_queues`: which workers live, what each consumes), when a
# group has globs (workers without heartbeats are found by it) or a Redis queue has min_consumers
CENSUS_EVERY = 30.0
CENSUS_SOON = 10.0  # sooner, while a living worker's queues are unknown
FORGET_AFTER = 3600.0  # a glob-matched worker that left gracefully is forgotten after this long


@dataclass
class TickReport:
    obs: Observation
    decision: Decision
    actions: list[Action] = field(default_factory=list)
    duration: float = 0.0
    platform_errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # hostname -> why it is not restarted now

    @property
    def exit_code(self) -> int:
        return self.decision.exit_code


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        *,
        dry_run: bool = False,
        one_shot: bool = False,
        clock: Callable[[], float] = time.time,
        on_tick: Callable[[TickReport], None] | None = None,
        on_event: Callable[[str, str, float], None] | None = None,
        state=None,
        wakeup=None,
    ):
        """``state``: a supervisor.state.StateStore (durable memory, restart history, outbox,
        silences), or None to keep everything in memory (tests of the loop, `nagios`). With
        ``dry_run`` it is only read."""
        from supervisor.notify import Notifier
        from supervisor.observe import heartbeats
        from supervisor.observe.celeryapp import make_app
        from supervisor.observe.queues import QueueReader

        self.cfg = cfg
        self.dry_run = dry_run
        self.one_shot = one_shot
        self.clock = clock
        self.on_tick = on_tick
        self.app = make_app(cfg.broker)
        # the lean Redis reader on Redis brokers, celery's event receiver elsewhere
        self.heartbeats = heartbeats.make_source(self.app, cfg.broker, clock=clock, on_event=on_event)
        self.queue_reader = QueueReader(cfg.broker, self.app)
        from supervisor.observe.control import Control

        # pings and the census run off the tick's path; their replies land in the next observation
        self.control = Control(self.app, cfg.loop.ping_timeout, clock)
        # supervisor.wake.Wakeup (the daemon's): platforms report deaths through it, a completed
        # ping round pokes it, and each tick leaves the workers' heartbeat deadlines in it
        self.wakeup = wakeup
        if wakeup is not None:
            self.control.on_ping_done = lambda: wakeup.wake("ping replies")
            self.heartbeats.on_heard = self._heard
        self._census_asked: float | None = None
        self._expected: set[str] | None = None  # `once`: the hostnames it must hear from
        self._unconsumed_warned: set[str] = set()  # group queues said to be consumed by none (a typo?)
        self.notifier = Notifier(cfg.notify)
        self.core = Core(cfg)
        self._own_state = state == "open"
        if state == "open":  # the durable state at loop.state_path, owned (and closed) by this object
            state = open_state(cfg, readonly=dry_run)
        self.state = state
        self.outbox = None
        if state is not None:
            memory = state.load_memory()
            self.core.restore(memory.get("core", {}))
            unsent = set(memory.get("unsent") or ())  # ha: a standby's unpaged alerts, across restarts
            if not dry_run:
                from supervisor.outbox import Outbox

                self.outbox = Outbox(state, self.notifier, clock)
        self.platforms: dict = {}
        self._lock = threading.Lock()  # one tick at a time
        self.last_report: TickReport | None = None
        self.ticks = 0
        self._pruned_at = 0.0
        # ha: the leader lease (supervisor.lease), None = act alone. Only a leader restarts and alerts:
        # ``lease.is_leader()`` is a local check (no I/O), ``lease.confirm()`` asks the lease store
        # that our fencing token is still the current one, just before a restart.
        self.lease = None
        # keys a standby did not page: paged again if it takes over (kept in the state file)
        self._unsent: set[str] = unsent if state is not None else set()

    def acting(self, confirm: bool = False) -> bool:
        """May this replica act now? (always, without a lease)"""
        if self.lease is None:
            return True
        if not self.lease.is_leader():
            # alerts only: the leader of the moment the lease store became unreachable goes on alerting
            # (with ha.lease auto the store is the broker: somebody must say that it is down)
            return not confirm and self.lease.may_alert()
        return self.lease.confirm() if confirm else True

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.heartbeats.start()
        if self.outbox is not None:
            # alerts accepted before the last stop (or crash) and not delivered: send them now
            n = self.outbox.retry_due(all_pending=True)
            if n:
                log.info("%d alert(s) from the outbox of an earlier run queued for delivery", n)

    def close(self, flush: float = 5.0) -> None:
        self.heartbeats.stop(timeout=3.0)
        self.control.close(timeout=1.0)
        try:
            self.queue_reader.close()
        except Exception as e:  # closing must not fail the shutdown
            log.debug("closing the queue reader: %s", redact.scrub(e))
        try:
            self.notifier.flush(flush)
        finally:
            self.notifier.close(1.0)
        for p in self.platforms.values():
            try:
                p.close()
            except Exception as e:  # closing must not fail the shutdown
                log.warning("closing platform %s: %s", p.kind, redact.scrub(e))
        if self._own_state and self.state is not None:
            self.state.close()

    # ------------------------------------------------------------ platforms (lazy)
    def platform(self, kind: str):
        if kind not in self.platforms:
            from platforms import load_adapter

            adapter = self.platforms[kind] = load_adapter(kind, self.cfg)
            if self.wakeup is not None:
                try:  # a death the platform reports wakes the loop at once (optional: no-op by default)
                    adapter.watch(self.wakeup.wake)
                except Exception as e:  # the tick still polls the platform every loop.interval
                    log.warning("platform %s: cannot watch for worker deaths, polling only: %s", kind,
                                redact.scrub(e))
        return self.platforms[kind]

    def _inventory(self, g: GroupConfig, known: list[str], seen: dict) -> tuple[tuple[Target, ...], str | None]:
        try:
            adapter = self.platform(g.restart.platform)
            return tuple(adapter.inventory(g, known, seen=seen)), None
        except Exception as e:
            return (), redact.scrub(f"{type(e).__name__}: {e}" if not str(e) else str(e))

    # ------------------------------------------------------------ observe
    def observe(self, broker_error: str | None | bool = False) -> Observation:
        """``broker_error``: the result of a broker check the caller just made (`once`), so that a
        down broker is not waited for twice; False to check here."""
        from supervisor.observe.celeryapp import BrokerUnreachable, check_broker

        cfg = self.cfg
        now = self.clock()
        err = check_broker(self.app, cfg.broker.connect_timeout) if broker_error is False else broker_error
        snap = self.heartbeats.snapshot()
        workers = dict(snap.workers)
        gone = [h for h, w in workers.items() if w.offline_at is not None and now - w.offline_at > FORGET_AFTER
                and not any(h in g.workers for g in cfg.groups)]
        if gone:  # left gracefully long ago and not expected back: forget them (flower#604, #1422)
            self.heartbeats.forget(gone)
            for h in gone:
                del workers[h]
        targets: dict[str, tuple[Target, ...]] = {}
        perrs: dict[str, str] = {}
        for g in cfg.groups:
            if g.restart is None:
                continue
            known = sorted({h for h in workers if cfg.group_of(h) is g} | set(g.workers)
                           | self.core.remembered_hostnames(g.name))
            targets[g.name], e = self._inventory(g, known, {h: workers[h] for h in known if h in workers})
            if e:
                perrs[g.name] = e
        news = self.control.collect()  # replies to the pings and census of earlier ticks
        obs = Observation(
            now=now, broker_ok=err is None, broker_error=err, listening_since=snap.listening_since,
            stream_error=snap.error,
            workers=workers, targets=targets, platform_errors=perrs, one_shot=self.one_shot,
            pong_at=news.pongs, noreply_at=news.noreplies, worker_queues=news.queues, census_at=news.census_at,
            worker_stats=news.stats, stall_checks=news.checks,
        )
        if err is not None:
            return obs
        try:
            # confirmation pings go out in the background: a worker that does not answer costs this
            # tick nothing; its silence is confirmed in the next observation
            due = self.core.suspects(obs)
            if due:
                self.control.ping(due)
            if self._census_due(now):
                self._census_asked = now
                self.control.census()
            if self.one_shot and self.control.busy:
                # `once` has no next tick: it waits for the replies (a round returns as soon as every
                # worker asked has answered, else after ping_timeout)
                self.control.wait(cfg.loop.ping_timeout + cfg.broker.connect_timeout + 1.0)
                more = self.control.collect()
                obs = replace(obs, pong_at={**obs.pong_at, **more.pongs},
                              noreply_at={**obs.noreply_at, **more.noreplies},
                              worker_queues={**obs.worker_queues, **more.queues},
                              census_at=more.census_at or obs.census_at,
                              worker_stats={**obs.worker_stats, **more.stats},
                              stall_checks={**obs.stall_checks, **more.checks})
            queues = self._queues()
        except BrokerUnreachable as e:  # the broker went away mid-tick (anything else is a bug: raise)
            return replace(obs, broker_ok=False, broker_error=redact.scrub(e))
        return replace(obs, queues=queues, now=self.clock())

    def _census_needed(self) -> bool:
        cfg = self.cfg
        # stall detection (supervisor/stall.py) learns from it which group queues each worker consumes
        return any(g.hostnames or (g.stall_timeout > 0 and g.queues) for g in cfg.groups) or (
            cfg.broker.is_redis and any(q.min_consumers for q in cfg.queues))

    def _census_due(self, now: float) -> bool:
        """At start, every CENSUS_EVERY, and every CENSUS_SOON while a living worker's queues are unknown."""
        if not self._census_needed():
            return False
        if self._census_asked is None:
            return True
        since = now - self._census_asked
        if since >= CENSUS_EVERY:
            return True
        d = self.last_report.decision if self.last_report is not None else None
        if since >= CENSUS_SOON and d is not None and d.obs is not None:
            return any(v.alive and v.hostname not in d.obs.worker_queues for v in d.verdicts)
        return False

    def _queues(self) -> dict[str, QueueSeen]:
        """Queue lengths. RabbitMQ counts consumers itself (passive declare); on Redis the core counts
        them from what each worker last said it consumes (the census)."""
        from supervisor.stall import group_queues

        cfg = self.cfg
        names = [q.name for q in cfg.queues] + group_queues(cfg)  # thresholds, and the stall rule's evidence
        if not names:
            return {}
        return self.queue_reader.read(names)

    # ------------------------------------------------------------ one tick
    def tick(self, broker_error: str | None | bool = False) -> TickReport:
        with self._lock:
            t0 = time.monotonic()
            obs = self.observe(broker_error)
            silences = self._load_state(obs.now)
            if self._unsent and self.acting():  # ha: took over; the standby paged nothing: what still fires pages
                for key in self._unsent:
                    self.core.book.notified.pop(key, None)
                self._unsent.clear()
            # what the core announced is only kept once the tick's alerts are accepted into the
            # outbox: if anything fails before that, the core forgets this tick's announcements
            snap = self.core.to_json() if self.state is not None else None
            try:
                decision = self.core.decide(obs, silenced=lambda f: any(
                    s.covers(f.group, f.hostname, f.subject) for s in silences))
                obs = decision.obs or obs  # as judged: the core's memory merged in, consumers counted
                report = TickReport(obs, decision, platform_errors=dict(obs.platform_errors))
                details: dict[str, list[str]] = {}
                for plan in decision.plans:
                    action, detail = self._restart(plan, decision, obs)
                    report.actions.append(action)
                    details.setdefault(plan.hostname, []).append(detail)
                report.actions += self._dispatch(self._alert(decision, details))
                # stall evidence: pool sizes and confirmations of suspects, targeted, off the tick's
                # path; the replies land in the next observation
                if (decision.stall.stats or decision.stall.confirm) and obs.broker_ok:
                    self.control.inspect(stats=decision.stall.stats, check=decision.stall.confirm)
                self._warn_unconsumed(decision)
            except Exception:
                if snap is not None:
                    self.core.restore(snap)
                raise
            if self.outbox is not None:
                self.outbox.retry_due()
            self._housekeeping(obs.now)
            report.notes = dict(self.core.policy.notes)
            report.duration = time.monotonic() - t0
            self.ticks += 1
            self.last_report = report
            self._save_status(report)
            if self.wakeup is not None:
                self.wakeup.deadlines(self.heartbeat_deadlines(obs))
        self._log(report)
        if self.on_tick is not None:
            self.on_tick(report)
        return report

    def _target(self, group: GroupConfig, hostname: str, obs: Observation) -> Target:
        from supervisor.rules import target_of

        return target_of(obs, group.name, hostname) or self.platform(group.restart.platform).target_for(group, hostname)

    def _restart(self, plan, decision: Decision, obs: Observation) -> tuple[Action, str]:
        g = self.cfg.group(plan.group)
        kind = g.restart.platform
        base = Action("restart", plan.group, plan.target_id, plan.reason, hostname=plan.hostname,
                      budget_left=plan.budget_left, canary=plan.canary)
        try:
            adapter = self.platform(kind)
            target = self._target(g, plan.hostname, obs)
            command = adapter.describe(target)
        except Exception as e:
            msg = redact.scrub(e)
            self.core.not_executed(plan)
            return replace(base, result=f"cannot restart: {msg}"), f"could not restart through {kind}: {msg}"
        base = replace(base, target=target.id, command=command)
        # only a leader whose fencing token the lease store confirms right now restarts
        standby = not plan.blocked and not self.dry_run and not self.acting(confirm=True)
        if plan.blocked or self.dry_run or standby:
            self.core.not_executed(plan)
        if plan.blocked:
            return (replace(base, result=f"not executed: {plan.blocked}"),
                    f"cannot restart now ({plan.blocked}); by hand: {command}")
        if self.dry_run:
            return replace(base, result="dry run: not executed"), f"would restart through {kind}: {command}"
        if standby:
            return (replace(base, result="not executed: standby (another replica holds the lease)"),
                    f"standby: the leader restarts ({command})")
        logs = ""
        try:
            logs = adapter.logs(target, LOG_LINES)
        except Exception as e:
            logs = f"(logs unavailable: {redact.scrub(e)})"
        at = self.clock()
        row = None
        if self.state is not None:  # before the platform is asked: a crash now still spends the budget
            row = self.state.restart_started(at, target.id, plan.group, plan.hostname, plan.reason)
        try:
            result = adapter.restart(target, plan.reason)
            ok, msg = result.ok, result.message
        except Exception as e:
            ok, msg = False, f"{type(e).__name__}: {e}"
        msg = redact.scrub(msg)
        self.core.record_restart(plan, at, ok)
        if row is not None:
            self.state.restart_finished(row, ok, msg)
        what = "canary restart" if plan.canary else "restarted"
        detail = (f"{what} {target.id} through {kind} ({command}): {'ok' if ok else 'FAILED'}"
                  f"{': ' + msg if msg else ''}; {plan.budget_left} restart(s) left in the window")
        if logs.strip():
            detail += f"\n\nlast output of {target.id}:\n{logs.rstrip()}"
        return replace(base, executed=True, result=("ok" if ok else "failed") + (f": {msg}" if msg else "")), detail

    def _alert(self, decision: Decision, details: dict[str, list[str]]) -> list:
        """The messages of this tick (the pipeline's inhibit, silence, dedup and flap stages ran in
        the core; repeat runs here)."""
        from supervisor.notify import message_for

        msgs = []
        told = {tr.state.hostname for tr in decision.transitions}
        updates = []
        for host, done in details.items():
            if host in told:
                continue
            # a restart without a state change (the 2nd in the window, a failed one): say it anyway
            st = next((st for st in decision.states.values() if st.hostname == host and st.state == "firing"
                       and st.rule in ("worker_lost", "worker_unresponsive", "worker_stalled")), None)
            if st is not None and st.key in self.core.book.notified and st.key not in self.core.silenced:
                updates.append((Transition(st.key, "firing", "firing", st), "\n".join(done)))
        every = self.cfg.notify.repeat_every
        for tr in self.core.book.due_repeats(decision.now, every, muted=self.core.silenced):
            if tr.state.hostname not in details:
                updates.append((tr, f"still firing; a reminder every {fd(every)} (notify.repeat_every)"))
        for tr, text in updates:
            msgs.append(message_for(tr, text, update=True))
        for tr in decision.transitions:
            extra = list(details.get(tr.state.hostname or "", []))
            if tr.new == "firing" and not extra and tr.state.hostname:
                note = self.core.policy.notes.get(tr.state.hostname)
                if note:
                    extra.append(f"no restart now: {note}")
            if tr.new == "resolved" and tr.state.fired_at is not None:
                extra.append(f"resolved after {fd(decision.now - tr.state.fired_at)}")
            msgs.append(message_for(tr, "\n".join(extra)))
        return msgs

    def _dispatch(self, msgs: list) -> list[Action]:
        """Accept the tick's messages (outbox rows + the core's memory, one transaction), then
        deliver them. A dry run or a standby sends nothing."""
        from supervisor.notify import routes

        if self.dry_run or not self.acting():
            why = "dry run: not sent" if self.dry_run else "standby: not sent"
            if not self.dry_run:
                self._unsent.update(m.key for m in msgs if m.key and m.kind == "firing")
                self._unsent.difference_update(m.key for m in msgs if m.kind == "resolved")
            if self.state is not None and not self.dry_run:
                self.state.save({"core": self.core.to_json(), "unsent": sorted(self._unsent)})
            return [Action("alert", m.group, ch.name, m.title, hostname=m.hostname, severity=m.severity, result=why)
                    for m in msgs for ch in routes(m, self.cfg.notify.channels)]
        if self.outbox is None:
            return [a for m in msgs for a in self.notifier.send(m)]
        msgs, rows = self.outbox.accept(msgs)
        self.state.save({"core": self.core.to_json(), "unsent": sorted(self._unsent)}, rows)
        crash_point("accepted" if msgs else "saved")
        return [a for m in msgs for a in self.outbox.send(m)]

    def _warn_unconsumed(self, decision: Decision) -> None:
        """A group queue that no living worker of the group consumes (each said what it consumes) is
        probably a typo in `groups[].queues`: said once in the log (and `consumed_by` in JSON)."""
        warned = self._unconsumed_warned
        for q, n in decision.stall.consumed_by.items():
            if n == 0 and q not in warned:
                warned.add(q)
                log.warning("queue %s is listed in a group's queues but no living worker of the group consumes "
                            "it (census): a typo? The stall rule ignores it for those workers.", q)
            elif n > 0:
                warned.discard(q)

    def _load_state(self, now: float) -> list:
        """Restart history (``supervisor reset`` may have cleared some) and active silences."""
        if self.state is None:
            return []
        windows = [g.restart.window for g in self.cfg.groups if g.restart is not None]
        self.core.policy.history = self.state.history(now - max(windows, default=0.0))
        return self.state.silences(now)

    def _housekeeping(self, now: float) -> None:
        """Once an hour: old restart rows, delivered alerts and expired silences leave the state file."""
        if self.state is None or self.dry_run or now - self._pruned_at < 3600:
            return
        self._pruned_at = now
        try:
            self.state.prune()
        except Exception as e:  # housekeeping never fails a tick
            log.warning("could not prune the state file: %s", redact.scrub(e))

    def _save_status(self, report: TickReport) -> None:
        if self.state is None or self.dry_run:
            return
        try:
            self.state.save({"status": report_json(report, self.cfg)})
        except Exception as e:  # status is for people: never fail the tick for it
            log.warning("could not save the status document: %s", redact.scrub(e))

    def _log(self, r: TickReport) -> None:
        d = r.decision
        if not r.obs.broker_ok:
            log.error("could not observe the broker: %s", r.obs.broker_error)
        elif r.obs.listening_since is None:
            # normal for a moment at start and after an outage; the finding pages if it lasts
            log.log(logging.INFO if self.ticks < 3 else logging.WARNING, "heartbeat stream not connected: %s",
                    r.obs.stream_error or "connecting")
        for tr in d.transitions:
            lvl = logging.WARNING if tr.new == "firing" else logging.INFO
            log.log(lvl, "%s %s: %s", tr.new.upper(), tr.key, tr.state.summary)
        for a in r.actions:
            if a.kind == "restart":
                log.warning("restart %s (%s): %s -> %s", a.target, a.hostname, a.reason, a.result)
        for g, e in r.platform_errors.items():
            log.warning("platform of group %s: %s", g, e)
        alive = sum(v.alive for v in d.verdicts)
        log.debug("tick %d: %d/%d workers alive, %d findings, %d actions, %.3fs", self.ticks, alive,
                  len(d.verdicts), len(d.findings), len(r.actions), r.duration)

    # ------------------------------------------------------------ heartbeat deadlines (wake.py)
    def _deadline(self, hostname: str, last: float | None, offline: float | None) -> float | None:
        g = self.cfg.group_of(hostname)
        if g is None or last is None or offline is not None:
            return None
        return last + g.heartbeat_timeout

    def _heard(self, hostname: str, at: float) -> None:
        """A worker heard first (or back) between two ticks: its deadline goes into the heap now."""
        when = self._deadline(hostname, at, None)
        if when is not None and self.wakeup is not None:
            self.wakeup.at(when, hostname)

    def heartbeat_deadlines(self, obs: Observation) -> list[tuple[float, str]]:
        """When each worker heard so far goes silent (last_heartbeat + its group's heartbeat_timeout),
        for the ones not silent yet: the wake thread runs a tick at that moment."""
        out = []
        for h, w in obs.workers.items():
            at = self._deadline(h, w.last_heartbeat, w.offline_at)
            if at is not None and at > obs.now:
                out.append((at, h))
        if obs.listening_since is not None:
            # an explicit worker not heard yet (it died as the supervisor started) is silent from when
            # the stream listens: its deadline too (a little after, so that its silence is past it)
            for g in self.cfg.groups:
                for h in g.workers:
                    at = obs.listening_since + g.heartbeat_timeout + 0.05
                    if h not in obs.workers and self.cfg.group_of(h) is g and at > obs.now:
                        out.append((at, h))
        return out

    def expired(self, hostnames: list[str]) -> list[str]:
        """Of the workers whose deadline passed, those still silent now; a worker heard since gets its
        new deadline back in the heap."""
        now = self.clock()
        out = []
        for h in hostnames:
            w = self.heartbeats.worker(h)
            if w is None:  # an explicit worker never heard: its deadline counted from when we listen
                out.append(h)
                continue
            at = self._deadline(h, w.last_heartbeat, w.offline_at)
            if at is None:
                continue
            if at > now:
                if self.wakeup is not None:
                    self.wakeup.at(at, h)
            else:
                out.append(h)
        return out

    # ------------------------------------------------------------ once
    def once(self, listen: float = ONCE_LISTEN) -> TickReport:
        """One observe/decide/act pass without history. A healthy fleet answers at once: a targeted
        ping (returns when every explicit worker answered) and a broadcast ping with a limit for glob
        groups with min_workers; only when something is missing (or a glob group sets no
        min_workers, so nothing says when all were heard) does it listen about one heartbeat interval."""
        from supervisor.observe.celeryapp import BrokerUnreachable, check_broker

        err = check_broker(self.app, self.cfg.broker.connect_timeout)
        if err is None:
            self.start()
            answered: set[str] = set()
            try:
                quick = self._once_quick(answered)
            except BrokerUnreachable as e:  # the tick checks the broker again and says why
                log.debug("once: quick ping failed: %s", redact.scrub(e))
                quick = False
            if not quick:
                if self._census_needed():  # answered while we listen: no wait of its own
                    self._census_asked = self.clock()
                    self.control.census()
                deadline = time.monotonic() + listen + self.cfg.broker.connect_timeout
                while self.heartbeats.snapshot().listening_since is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                since = self.heartbeats.snapshot().listening_since
                if since is not None:
                    # until every expected worker was heard (a reply that came late under load, then
                    # its heartbeat), at most about one heartbeat interval
                    end = time.monotonic() + max(0.0, listen - (self.clock() - since))
                    while time.monotonic() < end:
                        heard = answered | {h for h, w in self.heartbeats.snapshot().workers.items()
                                            if w.last_heartbeat is not None and w.last_heartbeat >= since}
                        if self._expected is not None and self._complete(heard) and not self.control.busy:
                            log.debug("once: every expected worker heard; stopped listening")
                            break
                        time.sleep(0.05)
        return self.tick(broker_error=err)

    def _complete(self, heard: set[str]) -> bool:
        """Every expected worker (``_expected``: explicit and remembered) and min_workers per glob group."""
        cfg = self.cfg
        if not self._expected <= heard:
            return False
        return all(sum(cfg.group_of(h) is g for h in heard) >= g.min_workers for g in cfg.groups if g.hostnames)

    def _once_quick(self, answered: set[str]) -> bool:
        """Ask the expected workers directly; True when every one expected answered (no listening
        needed). ``answered`` gets who did."""
        cfg = self.cfg
        globs = [g for g in cfg.groups if g.hostnames]
        if any(g.min_workers <= 0 for g in globs):
            return False  # nothing says how many to expect: listen
        explicit = {h for g in cfg.groups for h in g.workers}
        for g in cfg.groups:  # glob workers an earlier run saw (durable state): expected back too
            explicit |= set(self.core.remembered_hostnames(g.name))
        self._expected = explicit
        need = sum(g.min_workers for g in globs)
        answered |= self.control.ask_now(explicit, broadcast=len(explicit) + need if globs else 0)
        if not self._complete(answered):
            return False
        if self._census_needed():  # what each one consumes: asked of those who answered, targeted
            self._census_asked = self.clock()
            self.control.census_now(h for h in answered if cfg.group_of(h) is not None)
            if cfg.broker.is_redis and any(q.min_consumers for q in cfg.queues):
                news = self.control._news.queues
                for q in cfg.queues:
                    if q.min_consumers and sum(q.name in wq.names for wq in news.values()) < q.min_consumers:
                        self.control.census()  # a consumer outside the fleet we asked: the broadcast census
                        break
        # the stream must be connected for the core to judge (it is, after the pings, on a healthy broker)
        deadline = time.monotonic() + cfg.broker.connect_timeout
        while self.heartbeats.snapshot().listening_since is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.heartbeats.snapshot().listening_since is None:
            return False
        log.debug("once: every expected worker answered a ping (%d): not listening for heartbeats", len(answered))
        return True


def open_state(cfg: Config, readonly: bool = False):
    """The StateStore at loop.state_path (read-only for a dry run: None when there is none yet)."""
    from supervisor.state import StateStore

    path = cfg.loop.state_path
    if readonly and not path.exists():
        return None
    if readonly:  # a dry run plans without the state it cannot read (and says why)
        from supervisor.state import StateError

        try:
            return StateStore(path, readonly=True)
        except StateError as e:
            log.warning("%s: planning without it", e)
            return None
    return StateStore(path)


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at a named point of the tick when
    SUPERVISOR_CRASH_AT names it (``accepted``: alerts accepted into the outbox, none sent yet)."""
    import os

    if os.environ.get("SUPERVISOR_CRASH_AT") == name:
        import signal

        log.warning("SUPERVISOR_CRASH_AT=%s: killing myself (a test of crash recovery)", name)
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------ JSON document of `once --json` / status
def verdict_json(v: WorkerVerdict, obs: Observation, stall=None) -> dict:
    ws = obs.workers.get(v.hostname)
    d = {
        "hostname": v.hostname,
        "group": v.group,
        "alive": v.alive,  # alive, or busy within hung_timeout
        "status": v.status,
        "reason": v.reason,
        "explicit": v.explicit,
        "last_heartbeat_age": round(obs.now - ws.last_heartbeat, 3) if ws and ws.last_heartbeat else None,
        "active": ws.active if ws else None,
        # workers without heartbeats are judged by their replies to ping, each with its own time
        "last_pong_age": round(obs.now - obs.pong_at[v.hostname], 3) if v.hostname in obs.pong_at else None,
    }
    if v.target is not None:
        d["target"] = v.target.id
        d["platform_state"] = v.target.state
    # issue 10: the stall evidence (groups with stall_timeout; null where not measured)
    ev = stall.workers.get(v.hostname) if stall is not None else None
    d.update(processed=ws.processed if ws else None, processed_rate=None, concurrency=None, last_task_age=None,
             stall=None, stall_reason=None)
    if ev is not None:
        d.update(processed=ev.processed, processed_rate=ev.processed_rate, concurrency=ev.concurrency,
                 last_task_age=ev.last_task_age, stall=ev.stall, stall_reason=ev.stall_reason)
        if d["active"] is None:
            d["active"] = ev.active
    return d


def report_json(r: TickReport, cfg: Config) -> dict:
    obs, d = r.obs, r.decision
    return {
        "time": obs.now,
        "broker": {"url": cfg.broker.display_url, "ok": obs.broker_ok, "error": obs.broker_error},
        "exit_code": r.exit_code,
        "severity": d.severity if d.observable else "unknown",
        "workers": [verdict_json(v, obs, d.stall) for v in d.verdicts],
        "queues": [
            {"name": q.name, "length": q.length, "ready": q.ready, "unacked": q.unacked,
             "consumers": q.consumers, "error": q.error, **_queue_evidence(d, q.name)}
            for q in obs.queues.values()
        ],
        "findings": [
            {"rule": f.rule, "subject": f.subject, "severity": f.severity, "summary": f.summary,
             "group": f.group, "hostname": f.hostname,
             "state": d.states[f.key].state if f.key in d.states else "pending"}
            for f in d.findings
        ],
        "actions": [a.to_json() for a in r.actions],
        "platform_errors": r.platform_errors,
        "notes": r.notes,
        "duration": round(r.duration, 3),
    }



def _queue_evidence(d: Decision, name: str) -> dict:
    """issue 10: how fast the queue drains (messages/s over the last minute; negative: it grows), how
    long it has had a backlog, and whether every consumer is busy (saturation)."""
    ev = d.stall.queues.get(name)
    if ev is None:
        return {}
    saturated = any(f.rule == "queue_saturated" and f.subject == name for f in d.findings)
    return {"drain_rate": ev.drain_rate, "backlog_for": ev.backlog_for, "saturated": saturated,
            "consumed_by": d.stall.consumed_by.get(name)}
