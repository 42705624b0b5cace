"""Stalled consumers (issue 10), replayed through the pure core with an injected clock.

``World`` extends the recorded fleet with what the stall rule reads: each worker's ``processed`` and
``active`` (in its heartbeats), its pool size and what it consumes and holds (its replies to the
targeted ``inspect stats`` and stall confirmations the core asks for; a reply lands in the next
observation, as in the loop), and queue lengths. No broker, no sleep.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from supervisor.config import ConfigError, parse_config
from supervisor.model import StallCheck, WorkerStats
from tests.unit.recorded import BROKER_URL, Fleet, fired, group_cfg, make_config, resolved, restart_cfg

Q = "work"


@dataclass
class Pool:
    concurrency: int = 4
    processed: int = 10
    active: int = 0
    reserved: int = 0
    pid: int = 100
    consumes: set[str] = field(default_factory=lambda: {Q})


class World(Fleet):
    def __init__(self, cfg, start: float = 0.0):
        super().__init__(cfg, start)
        self.pools: dict[str, Pool] = {}
        self.asked_stats: list[str] = []
        self.asked_checks: list[str] = []
        self._stats_due: list[str] = []
        self._checks_due: list[str] = []
        self.heartbeats = True

    def worker(self, h: str, at: float = 0.0, **kw) -> Pool:
        self.pools[h] = Pool(**kw)
        self.up(h, at=at)
        self.serve(h, *self.pools[h].consumes)
        return self.pools[h]

    def tick(self, now: float, **kw):
        for h, p in self.pools.items():
            if h in self.seen and self.status.get(h) == "up":
                hb = dict(processed=p.processed, active=p.active, pid=p.pid) if self.heartbeats else \
                    dict(processed=None, active=None, pid=None)
                self.seen[h] = replace(self.seen[h], **hb)
            self.consumes[h] = frozenset(p.consumes)
        stats = {h: WorkerStats(now - 0.5, p.concurrency, p.processed, p.pid)
                 for h in self._stats_due if (p := self.pools.get(h)) and self.status.get(h) in ("up", "quiet")}
        checks = {h: StallCheck(now - 0.5, frozenset(p.consumes), p.reserved, p.active)
                  for h in self._checks_due if (p := self.pools.get(h)) and self.status.get(h) in ("up", "quiet")}
        orig = self.observation

        def observation(t):
            return replace(orig(t), worker_stats=stats, stall_checks=checks)

        self.observation = observation
        try:
            d = super().tick(now, **kw)
        finally:
            self.observation = orig
        self._stats_due, self._checks_due = list(d.stall.stats), list(d.stall.confirm)
        self.asked_stats += d.stall.stats
        self.asked_checks += d.stall.confirm
        for p in d.plans:  # the platform restarts it: a new process, its counter from 0
            if not p.blocked and kw.get("execute", True):
                pool = self.pools[p.hostname]
                pool.pid += 1
                pool.processed = 0
                pool.reserved = 0
                pool.active = 0
                pool.consumes = {Q}
                self.restarted_now = p.hostname
        return d


def config(stall: str = "60s", n_groups: int = 1, **gkw):
    g = group_cfg("web", queues=[Q], stall_timeout=stall, restart=restart_cfg(backoff="1s", grace="20s"), **gkw)
    return make_config([g])


def grow(w: World, start: float, stop: float, step: float = 5.0, per_tick: int = 3, length: int = 5):
    """Ticks from start to stop while the queue grows by ``per_tick`` messages a tick."""
    out = []
    t = start
    n = length
    while t <= stop + 1e-9:
        w.queue(Q, n)
        out.append(w.tick(t))
        n += per_tick
        t += step
    return out


def stall_plans(ds):
    return [p for d in ds for p in d.plans if p.rule == "worker_stalled"]


# ---------------------------------------------------------------- config contract
def test_stall_timeout_defaults_to_two_minutes_zero_turns_it_off_and_short_ones_are_refused():
    data = {"broker": {"url": BROKER_URL}, "groups": [{"name": "g", "workers": ["celery@a"], "queues": ["q"]}]}
    cfg = parse_config(data, env={})
    assert cfg.groups[0].stall_timeout == 120.0
    assert cfg.queues == []  # a group queue needs no threshold entry under `queues`
    data["groups"][0]["stall_timeout"] = 0
    assert parse_config(data, env={}).groups[0].stall_timeout == 0
    data["groups"][0]["stall_timeout"] = "2s"
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert e.value.errors[0][0] == "groups.0"
    assert "stall_timeout" in e.value.errors[0][1]


# ---------------------------------------------------------------- the rule
def test_a_cancelled_consumer_is_confirmed_restarted_once_with_its_evidence_and_resolved_when_it_takes_work():
    w = World(config("60s"))
    h = "celery@web-1"
    pool = w.worker(h)
    early = grow(w, 0, 55)  # a backlog that grows, nothing taken, for less than stall_timeout
    assert not stall_plans(early) and not fired(early)
    assert w.asked_stats == [h], "the pool size is asked once, targeted"
    pool.consumes = set()  # app.control.cancel_consumer(work, destination=[h])
    later = grow(w, 60, 70, length=5 + 12 * 3)
    plans = stall_plans(later)
    assert [p.hostname for p in plans] == [h]
    reason = plans[0].reason
    assert reason.startswith(f"stalled: queue {Q} has ") and "no task taken for 1m" in reason
    assert reason.endswith(f"consumer of {Q} missing"), reason
    assert w.asked_checks == [h], "one targeted confirmation before the restart"
    assert fired(later) == [f"worker_stalled:{h}"]
    restart_tick = next(d for d in later if d.plans)
    assert restart_tick.exit_code == 2
    assert w.asked_checks[0] and restart_tick.now > 60  # confirmed on a reply sent after suspicion began
    # the restarted worker heartbeats again, holds the finding open until it takes a task
    back = grow(w, 75, 85, length=50)
    assert not stall_plans(back) and not resolved(back)
    assert f"worker_stalled:{h}" in {f.key for f in back[-1].findings}
    pool.processed = 3
    w.queue(Q, 40)
    d = w.tick(90)
    assert resolved(d) == [f"worker_stalled:{h}"]
    ev = d.stall.workers[h]
    assert ev.last_task_age == 0 and ev.concurrency == 4 and ev.active == 0 and ev.stall is None


def test_a_full_pool_is_busy_never_stalled_and_the_queue_is_reported_saturated_as_info():
    w = World(config("60s"))
    h = "celery@web-1"
    w.worker(h, concurrency=2, active=2)  # every slot taken by long tasks
    ds = grow(w, 0, 200)
    assert not stall_plans(ds) and not any(p for d in ds for p in d.plans)
    assert w.asked_checks == [], "a busy worker is not even inspected"
    last = ds[-1]
    assert last.stall.workers[h].stall == "busy"
    sat = [f for f in last.findings if f.rule == "queue_saturated"]
    assert [(f.subject, f.severity) for f in sat] == [(Q, "info")]
    assert "busy" in sat[0].summary and last.exit_code == 0
    assert last.stall.queues[Q].drain_rate < 0  # it grows


def test_a_queue_that_drains_or_a_worker_that_takes_tasks_is_not_a_suspect():
    w = World(config("60s"))
    h = "celery@web-1"
    pool = w.worker(h)
    t, n = 0.0, 500
    while t <= 300:  # drains slowly: 500, 499, ...
        w.queue(Q, n)
        d = w.tick(t)
        assert not d.plans and not d.stall.confirm
        n -= 1
        t += 5
    assert d.stall.queues[Q].drain_rate == pytest.approx(0.2, rel=0.01)
    w2 = World(config("60s"))
    pool = w2.worker(h)
    t, n = 0.0, 5
    while t <= 300:  # grows, but the worker takes a task now and then (a slow consumer)
        w2.queue(Q, n)
        if int(t) % 50 == 0:
            pool.processed += 1
        d = w2.tick(t)
        assert not d.plans and not d.stall.confirm
        n += 3
        t += 5
    assert d.stall.workers[h].processed_rate is not None


def test_a_suspect_running_a_task_is_not_restarted():
    w = World(config("60s"))
    h = "celery@web-1"
    w.worker(h)
    w.heartbeats = False  # no heartbeat: active unknown until the confirmation says
    w.quiet(h)
    w.pools[h].active = 1  # running one long task, three slots free
    ds = grow(w, 0, 200)
    assert not any(d.plans for d in ds)
    assert w.asked_checks, "confirmed before any restart"
    assert ds[-1].stall.workers[h].stall == "suspect"


def test_prefetch_stuck_reserved_messages_nothing_active_is_a_stall():
    w = World(config("60s"))
    h = "celery@web-1"
    w.worker(h, reserved=4)
    ds = grow(w, 0, 75)
    [p] = stall_plans(ds)
    assert p.reason.endswith("4 message(s) reserved, none active: prefetch stuck")


def test_a_confirmation_older_than_the_suspicion_does_not_count():
    w = World(config("60s"))
    h = "celery@web-1"
    w.worker(h)
    w.queue(Q, 5)
    w.tick(0)
    # an old reply (sent before the suspicion) that says the consumer is missing
    old = StallCheck(1.0, frozenset(), 0, 0)
    w.queue(Q, 50)
    d = w.core.decide(replace(w.observation(65), stall_checks={h: old}))
    assert not d.plans and d.stall.confirm == [h]


def test_stall_timeout_zero_turns_the_rule_off():
    w = World(config("0"))
    h = "celery@web-1"
    pool = w.worker(h)
    pool.consumes = set()
    ds = grow(w, 0, 400)
    assert not any(d.plans for d in ds) and not fired(ds) and not w.asked_checks and not w.asked_stats


def test_workers_without_heartbeats_are_judged_from_targeted_stats_at_a_bounded_rate():
    w = World(config("60s"))
    h = "celery@web-1"
    pool = w.worker(h)
    w.heartbeats = False
    w.quiet(h)
    pool.consumes = set()
    ds = grow(w, 0, 120)
    assert [p.hostname for p in stall_plans(ds)] == [h]
    # stats for processed: about every 15 s (stall_timeout / 4) while a backlog lasts, not every tick
    first_restart = next(d.now for d in ds if d.plans)
    n = sum(1 for d in ds if d.now <= first_restart and h in d.stall.stats)
    assert 3 <= n <= 7, n


def test_several_stalled_workers_of_a_group_restart_one_canary_first_and_every_consumer_stalled_is_queue_stalled():
    w = World(config("60s"))
    hs = [f"celery@web-{i}" for i in (1, 2, 3)]
    for h in hs:
        w.worker(h).consumes = set()
    ds = grow(w, 0, 70)
    first = [d for d in ds if d.plans]
    assert len(first[0].plans) == 1 and first[0].plans[0].canary
    keys = {f.key for d in ds for f in d.findings}
    assert f"queue_stalled:{Q}" in keys
    assert any(f.rule == "group_mass_loss" for d in ds for f in d.findings)


def test_a_worker_that_never_consumed_a_group_queue_is_not_judged_on_it():
    # the group lists two queues; this worker serves only one of them (known from the census)
    g = group_cfg("web", queues=[Q, "other"], stall_timeout="60s", restart=restart_cfg())
    w = World(make_config([g]))
    h = "celery@web-1"
    w.worker(h)
    t, n = 0.0, 5
    while t <= 200:
        w.queue(Q, 0)
        w.queue("other", n)  # backlog on a queue this worker does not consume
        d = w.tick(t)
        assert not d.plans and not d.stall.confirm
        n += 3
        t += 5


def test_the_budget_bounds_restarts_of_a_worker_that_stalls_again():
    g = group_cfg("web", queues=[Q], stall_timeout="30s",
                  restart=restart_cfg(backoff="1s", grace="10s", max_restarts=2, window="1h"))
    w = World(make_config([g]))
    h = "celery@web-1"
    w.worker(h)
    t, n, plans = 0.0, 5, []
    while t <= 600:
        w.pools[h].consumes = set()  # stalls again and again
        w.queue(Q, n)
        d = w.tick(t)
        plans += [p for p in d.plans if p.rule == "worker_stalled"]
        n += 1
        t += 5
    assert len(plans) == 2
    assert any(f.rule == "restart_gave_up" for f in d.findings)


def test_the_evidence_reaches_once_json_status_and_metrics():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from supervisor.loop import TickReport, report_json
    from supervisor.metrics import Metrics
    from supervisor.status import render_table

    cfg = config("60s")
    w = World(cfg)
    h = "celery@web-1"
    w.worker(h, concurrency=2, active=2)
    ds = grow(w, 0, 100)
    d = ds[-1]
    report = TickReport(d.obs, d)
    doc = report_json(report, cfg)
    [wd] = doc["workers"]
    assert (wd["active"], wd["concurrency"], wd["stall"], wd["processed"]) == (2, 2, "busy", 10)
    assert wd["last_task_age"] is None and wd["processed_rate"] == 0
    [qd] = doc["queues"]
    assert qd["name"] == Q and qd["saturated"] is True and qd["drain_rate"] == -0.6 and qd["backlog_for"] == 100
    assert "2/2" in render_table(doc) and "SATURATED" in render_table(doc)
    m = Metrics()
    m.configure(cfg)
    m.observe(report, cfg, leader=True, completed_at=1.0)
    text = generate_latest(m.registry).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    lab = (("group", "web"), ("hostname", h))
    assert got[("celery_supervisor_worker_active", lab)] == 2
    assert got[("celery_supervisor_worker_concurrency", lab)] == 2
    assert got[("celery_supervisor_worker_processed_rate", lab)] == 0
    assert got[("celery_supervisor_queue_drain_rate", (("queue", Q),))] == -0.6
    assert got[("celery_supervisor_queue_saturated", (("queue", Q),))] == 1


def test_an_open_stall_survives_a_restart_of_the_supervisor_and_resolves_only_when_work_is_taken():
    from supervisor.decide import Core

    cfg = config("60s")
    w = World(cfg)
    h = "celery@web-1"
    pool = w.worker(h)
    pool.consumes = set()
    ds = grow(w, 0, 70)
    assert fired(ds) == [f"worker_stalled:{h}"] and stall_plans(ds)
    back = grow(w, 75, 100, length=60)  # restarted, back, has taken nothing yet
    assert not resolved(back)
    memory = w.core.to_json()
    core = Core(cfg)  # the supervisor restarts
    core.restore(memory)
    w.core = core
    later = grow(w, 105, 120, length=70)
    assert not resolved(later) and not fired(later), "the open stall is neither resolved nor paged again"
    pool.processed += 1
    w.queue(Q, 69)
    assert resolved(w.tick(125)) == [f"worker_stalled:{h}"]


def test_a_group_queue_no_living_worker_consumes_is_shown_as_consumed_by_zero():
    from supervisor.loop import TickReport, report_json

    g = group_cfg("web", queues=[Q, "wrok"], stall_timeout="60s", restart=restart_cfg())
    cfg = make_config([g])
    w = World(cfg)
    w.worker("celery@web-1")
    w.worker("celery@web-2")
    w.queue(Q, 0)
    w.queue("wrok", 0)
    d = w.tick(0)
    assert d.stall.consumed_by == {Q: 2, "wrok": 0}
    doc = report_json(TickReport(d.obs, d), cfg)
    assert {q["name"]: q["consumed_by"] for q in doc["queues"]} == {Q: 2, "wrok": 0}
    assert d.exit_code == 0 and not d.findings  # a hint, not a finding
