"""Prometheus metrics of the daemon, in a registry of its own (never prometheus_client's global one).

Names and labels are a contract (dashboards and alert rules use them); no label ever carries a URL
or another secret: groups, queues, rules and channels are the names the config gives them.

======================================================  =============================================
metric                                                  meaning
======================================================  =============================================
celery_supervisor_workers{group,status}                 workers per group by verdict: alive, busy,
                                                        starting, lost, dead, unresponsive, stopping,
                                                        retired, unknown (every status of every
                                                        group, 0 too)
celery_supervisor_queue_length{queue}                   messages in the queue (ready + unacked where
                                                        the broker tells); absent while unreadable
celery_supervisor_queue_ready{queue}                    ready messages, where known
celery_supervisor_queue_unacked{queue}                  delivered, not yet acknowledged, where known
celery_supervisor_queue_consumers{queue}                consumers, where measured
celery_supervisor_findings{rule,state}                  findings by rule and state (pending, firing);
                                                        a pair seen once stays, at 0, when it clears
celery_supervisor_restarts_total{group,outcome}         restarts planned: ok, failed (executed) or
                                                        not_executed (blocked, standby, dry run, ...)
celery_supervisor_alerts_total{channel,outcome}         alert messages finished per channel:
                                                        delivered, or failed (given up after retries)
celery_supervisor_cycles_total{outcome}                 cycles: ok (completed) or failed (raised)
celery_supervisor_cycle_duration_seconds                histogram of completed cycles' durations
celery_supervisor_last_cycle_timestamp_seconds          unix time the last cycle completed
celery_supervisor_broker_up                             1 when the last cycle could reach the broker
celery_supervisor_leader                                1 when this replica acts (holds the lease, or
                                                        runs without one), 0 on a standby
celery_supervisor_info{version}                         always 1
celery_supervisor_worker_processed_rate{group,hostname} tasks the worker took per second over the last
                                                        minute (groups with stall_timeout; issue 10)
celery_supervisor_worker_active{group,hostname}         tasks running (heartbeat), where known
celery_supervisor_worker_concurrency{group,hostname}    pool size (targeted inspect stats), where known
celery_supervisor_worker_last_task_age_seconds{group,hostname}
                                                        seconds since its processed count last moved
celery_supervisor_queue_drain_rate{queue}               messages per second the length went down over
                                                        the last minute (negative: it grows)
celery_supervisor_queue_saturated{queue}                1 when the queue does not drain and every
                                                        consumer is busy (info: needs more workers)
======================================================  =============================================
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, get_args

from supervisor import __version__
from supervisor.model import WorkerStatus

if TYPE_CHECKING:
    from supervisor.config import Config
    from supervisor.loop import TickReport
    from supervisor.notify import Message

STATUSES = get_args(WorkerStatus)
RESTART_OUTCOMES = ("ok", "failed", "not_executed")
ALERT_OUTCOMES = ("delivered", "failed")
CYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # no *_created series beside every counter (the process is ours: this global switch is too)
        getattr(prometheus_client, "disable_created_metrics", lambda: None)()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.workers = Gauge("celery_supervisor_workers", "Workers per group by verdict status.",
                             ["group", "status"], registry=r)
        self.queue_length = Gauge("celery_supervisor_queue_length",
                                  "Messages in the queue (ready + unacked where the broker tells).", ["queue"], registry=r)
        self.queue_ready = Gauge("celery_supervisor_queue_ready", "Ready messages in the queue.", ["queue"], registry=r)
        self.queue_unacked = Gauge("celery_supervisor_queue_unacked", "Unacknowledged messages of the queue.",
                                   ["queue"], registry=r)
        self.queue_consumers = Gauge("celery_supervisor_queue_consumers", "Consumers of the queue.", ["queue"],
                                     registry=r)
        self.findings = Gauge("celery_supervisor_findings", "Findings by rule and state (pending, firing).",
                              ["rule", "state"], registry=r)
        self.restarts = Counter("celery_supervisor_restarts", "Restarts by group and outcome (ok, failed, not_executed).",
                                ["group", "outcome"], registry=r)
        self.alerts = Counter("celery_supervisor_alerts", "Alert messages by channel and outcome (delivered, failed).",
                              ["channel", "outcome"], registry=r)
        self.cycles = Counter("celery_supervisor_cycles", "Cycles by outcome (ok, failed).", ["outcome"], registry=r)
        self.cycle_duration = Histogram("celery_supervisor_cycle_duration_seconds",
                                        "Duration of completed observe/decide/act cycles.", buckets=CYCLE_BUCKETS,
                                        registry=r)
        self.last_cycle = Gauge("celery_supervisor_last_cycle_timestamp_seconds",
                                "Unix time the last cycle completed.", registry=r)
        self.broker_up = Gauge("celery_supervisor_broker_up", "1 when the last cycle could reach the broker.",
                               registry=r)
        self.worker_rate = Gauge("celery_supervisor_worker_processed_rate",
                                 "Tasks the worker took per second over the last minute.", ["group", "hostname"],
                                 registry=r)
        self.worker_active = Gauge("celery_supervisor_worker_active", "Tasks the worker runs.",
                                   ["group", "hostname"], registry=r)
        self.worker_concurrency = Gauge("celery_supervisor_worker_concurrency", "The worker's pool size.",
                                        ["group", "hostname"], registry=r)
        self.worker_task_age = Gauge("celery_supervisor_worker_last_task_age_seconds",
                                     "Seconds since the worker last took a task.", ["group", "hostname"], registry=r)
        self.queue_drain = Gauge("celery_supervisor_queue_drain_rate",
                                 "Messages per second the queue went down over the last minute.", ["queue"],
                                 registry=r)
        self.queue_saturated = Gauge("celery_supervisor_queue_saturated",
                                     "1 when the queue does not drain and every consumer is busy.", ["queue"],
                                     registry=r)
        self.leader = Gauge("celery_supervisor_leader", "1 when this replica acts (leader or no lease).", registry=r)
        Gauge("celery_supervisor_info", "celery-supervisor version.", ["version"], registry=r).labels(__version__).set(1)
        for outcome in ("ok", "failed"):
            self.cycles.labels(outcome)
        self._lock = threading.Lock()
        self._series: dict[str, set[tuple[str, ...]]] = {}

    # ------------------------------------------------------------ config (start, reload)
    def configure(self, cfg: Config) -> None:
        """Create the counters' series at 0 for every group and channel (so that rate() sees the
        first increase), and drop the worker series of groups a reload removed."""
        for g in cfg.groups:
            for o in RESTART_OUTCOMES:
                self.restarts.labels(g.name, o)
        for c in cfg.notify.channels:
            for o in ALERT_OUTCOMES:
                self.alerts.labels(c.name, o)
        with self._lock:
            self._replace(self.workers, "workers",
                          {(g.name, s): 0.0 for g in cfg.groups for s in STATUSES}, keep=False, only_new=True)
            from supervisor.stall import group_queues

            queues = {(q.name,) for q in cfg.queues} | {(q,) for q in group_queues(cfg)}
            for name, gauge in self._queue_gauges():
                for labels in list(self._series.get(name, ())):
                    if labels not in queues:
                        _remove(gauge, labels)
                        self._series[name].discard(labels)

    # ------------------------------------------------------------ one cycle
    def observe(self, report: TickReport, cfg: Config, leader: bool, completed_at: float | None = None) -> None:
        """Feed one completed cycle's report; ``leader``: Supervisor.acting() (this replica acts)."""
        obs, d = report.obs, report.decision
        counts = {(g.name, s): 0.0 for g in cfg.groups for s in STATUSES}
        for v in d.verdicts:
            key = (v.group, v.status if v.status in STATUSES else "unknown")
            counts[key] = counts.get(key, 0.0) + 1
        findings: dict[tuple[str, ...], float] = {}
        for f in d.findings:
            st = d.states.get(f.key)
            state = st.state if st is not None else "pending"
            findings[(f.rule, state)] = findings.get((f.rule, state), 0.0) + 1
        qvals: dict[str, dict[tuple[str, ...], float]] = {n: {} for n, _ in self._queue_gauges()}
        for q in obs.queues.values():
            for name, value in (("queue_length", q.length), ("queue_ready", q.ready),
                                ("queue_unacked", q.unacked), ("queue_consumers", q.consumers)):
                if value is not None:
                    qvals[name][(q.name,)] = float(value)
        wvals: dict[str, dict[tuple[str, ...], float]] = {n: {} for n, _ in self._stall_gauges()}
        group_of = {v.hostname: v.group for v in d.verdicts}
        for h, ev in d.stall.workers.items():
            labels = (group_of.get(h, ""), h)
            for name, value in (("worker_processed_rate", ev.processed_rate), ("worker_active", ev.active),
                                ("worker_concurrency", ev.concurrency), ("worker_last_task_age", ev.last_task_age)):
                if value is not None:
                    wvals[name][labels] = float(value)
        saturated = {f.subject for f in d.findings if f.rule == "queue_saturated"}
        for name, ev in d.stall.queues.items():
            if ev.drain_rate is not None:
                wvals["queue_drain_rate"][(name,)] = float(ev.drain_rate)
            wvals["queue_saturated"][(name,)] = 1.0 if name in saturated else 0.0
        with self._lock:
            if obs.broker_ok:
                for name, gauge in self._stall_gauges():
                    self._replace(gauge, name, wvals[name], keep=False)
            self._replace(self.workers, "workers", counts, keep=False)
            self._replace(self.findings, "findings", findings, keep=True)
            if obs.broker_ok:  # a down broker leaves the last counts (their age: last_cycle)
                for name, gauge in self._queue_gauges():
                    self._replace(gauge, name, qvals[name], keep=False)
        for a in report.actions:
            if a.kind != "restart":
                continue
            if a.executed:
                outcome = "ok" if (a.result or "").startswith("ok") else "failed"
            else:
                outcome = "not_executed"
            self.restarts.labels(a.group or "", outcome).inc()
        self.cycles.labels("ok").inc()
        self.cycle_duration.observe(max(report.duration, 0.0))
        self.last_cycle.set(completed_at if completed_at is not None else time.time())
        self.broker_up.set(1 if obs.broker_ok else 0)
        self.leader.set(1 if leader else 0)

    def cycle_failed(self) -> None:
        self.cycles.labels("failed").inc()

    def alert_done(self, channel: str, msg: Message, delivered: bool, error: str | None) -> None:
        """Notifier.on_done hook (chained after any existing one, see ``chain_on_done``)."""
        self.alerts.labels(channel, "delivered" if delivered else "failed").inc()

    def chain_on_done(self, notifier) -> None:
        """Count the notifier's finished messages, calling its existing on_done hook first."""
        prev = notifier.on_done
        if getattr(prev, "_metrics", None) is self:
            return

        def on_done(channel, msg, delivered, error):
            try:
                if prev is not None:
                    prev(channel, msg, delivered, error)
            finally:
                self.alert_done(channel, msg, delivered, error)

        on_done._metrics = self  # type: ignore[attr-defined]  (marks it as ours: never chained twice)
        notifier.on_done = on_done

    # ------------------------------------------------------------ internals
    def _stall_gauges(self):
        return (("worker_processed_rate", self.worker_rate), ("worker_active", self.worker_active),
                ("worker_concurrency", self.worker_concurrency), ("worker_last_task_age", self.worker_task_age),
                ("queue_drain_rate", self.queue_drain), ("queue_saturated", self.queue_saturated))

    def _queue_gauges(self):
        return (("queue_length", self.queue_length), ("queue_ready", self.queue_ready),
                ("queue_unacked", self.queue_unacked), ("queue_consumers", self.queue_consumers))

    def _replace(self, gauge, name: str, values: dict[tuple[str, ...], float], keep: bool,
                 only_new: bool = False) -> None:
        """Set ``values``; series set before and absent now are set to 0 (``keep``) or removed.
        ``only_new``: leave the value of a series that exists already (configure)."""
        seen = self._series.setdefault(name, set())
        for labels, v in values.items():
            if only_new and labels in seen:
                continue
            gauge.labels(*labels).set(v)
        for labels in list(seen - set(values)):
            if keep:
                gauge.labels(*labels).set(0)
            else:
                _remove(gauge, labels)
                seen.discard(labels)
        seen.update(values)


def _remove(gauge, labels: tuple[str, ...]) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
