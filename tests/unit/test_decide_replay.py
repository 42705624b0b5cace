"""Recorded observation streams replayed through ``decide.Core`` with an injected clock.

Each test reads like an incident: what the fleet did, tick by tick, and what an
operator would check afterwards: which worker was restarted and when, which
alert fired or resolved (once), and the exit code a Nagios check would return.
"""

from __future__ import annotations

from supervisor import decide, policy, rules
from supervisor.decide import Core
from tests.unit.recorded import (
    Fleet,
    fired,
    group_cfg,
    make_config,
    resolved,
    restart_cfg,
    restarts,
    status,
)

W1, W2, W3, W4 = (f"celery@web-{i}" for i in range(1, 5))
LOST1 = f"worker_lost:{W1}"


def fleet(n=3, *, min_workers=0, workers=None, queues=None, qcfg=None, **restart) -> Fleet:
    g = group_cfg("web", min_workers=min_workers, restart=restart_cfg(**restart),
                  **({"workers": workers} if workers else {}))
    cfg = make_config([g], queues=qcfg)
    f = Fleet(cfg)
    f.up(*(f"celery@web-{i}" for i in range(1, n + 1)), at=0)
    f.run(0, 30)  # a quiet half minute: everyone heartbeats
    assert all(not d.transitions and not d.plans and d.exit_code == 0 for d in f.log)
    return f


# ---------------------------------------------------------------- lost, dead, hung
class TestWorkerLost:
    def test_killed_worker_is_confirmed_by_ping_then_restarted_once(self):
        f = fleet(3)
        f.target(W1, "unknown", tid="celery-web-1.service")
        f.down(W1)  # SIGKILL right after its heartbeat at t=30
        d35, d40 = f.tick(35), f.tick(40)
        assert status(d35, W1) == status(d40, W1) == "alive"  # 10s silence is not yet past heartbeat_timeout
        assert W1 not in f.pinged[-1]
        d45 = f.tick(45)
        assert W1 in f.pinged[-1]
        assert status(d45, W1) == "lost"
        assert [(p.hostname, p.target_id, p.rule) for p in d45.plans] == [
            (W1, "celery-web-1.service", "worker_lost")]
        assert fired(d45) == [LOST1]
        assert d45.exit_code == 2
        # within grace: waiting for it, the alert stays open, nothing new is said or done
        grace = f.run(50, 100)
        assert restarts(grace) == [] and fired(grace) == [] and resolved(grace) == []
        assert {status(d, W1) for d in grace} == {"starting"}
        assert all(LOST1 in f.core.book.states for d in grace)

    def test_back_within_grace_resolves_once(self):
        f = fleet(3)
        f.down(W1)
        f.run(35, 45)
        assert restarts(f.log) == [W1]
        f.run(50, 65)
        f.up(W1, at=68)  # the restarted worker says hello
        d70 = f.tick(70)
        assert status(d70, W1) == "alive"
        assert resolved(d70) == [LOST1] and d70.exit_code == 0
        later = f.run(75, 300)
        assert fired(later) == resolved(later) == restarts(later) == []
        assert W1 not in f.core.policy.restarted  # forgotten once its grace is over

    def test_silent_but_answering_ping_is_never_restarted(self):
        f = fleet(3)
        f.quiet(W1)  # stops heartbeating (events off, or a busy solo pool) but answers ping
        ds = f.run(35, 600)
        assert restarts(ds) == [] and fired(ds) == []
        assert {status(d, W1) for d in ds} == {"alive"}
        assert sum(W1 in p for p in f.pinged) > 0  # it was asked, every time it was suspect

    def test_silent_but_not_pinged_is_not_restarted(self):
        # a decision taken without the confirming ping (a shell that skipped it) restarts nothing
        f = fleet(3)
        f.down(W1)
        obs = f.observation(100)
        d = f.core.decide(obs)  # pinged = {} in this observation
        assert status(d, W1) == "unknown"
        assert d.plans == [] and fired(d) == []


class TestPlatformDeath:
    def test_reported_exit_is_restarted_at_once(self):
        f = fleet(3)
        f.down(W1)
        f.target(W1, "exited", since=32, tid="celery-web-1.service", detail="exit code -9")
        d = f.tick(35)  # 5s after its last heartbeat: far from heartbeat_timeout
        assert status(d, W1) == "dead"
        assert [(p.hostname, p.target_id) for p in d.plans] == [(W1, "celery-web-1.service")]
        assert fired(d) == [LOST1] and d.exit_code == 2
        assert W1 not in f.pinged[-1]

    def test_crashed_cf_instance_restarted_within_budget(self):
        f = fleet(3, max_restarts=1)
        f.down(W1)
        f.target(W1, "crashed", since=31, tid="web/0", detail="CRASHED")
        f.tick(35)
        f.target(W1, "crashed", since=40)  # crashed again after our restart
        ds = f.run(40, 400)
        assert restarts(f.log) == [W1]  # one restart in the window: the budget holds
        assert fired(ds) == [f"restart_gave_up:{W1}"]


class TestHung:
    def test_busy_until_hung_timeout_then_unresponsive_and_restarted(self):
        f = fleet(3, min_workers=3)
        f.target(W1, "running", tid="celery-web-1.service")
        f.hang(W1)  # last heartbeat at 30: a solo pool busy with a long task, or hung
        d45 = f.tick(45)
        assert status(d45, W1) == "busy"  # healthy within hung_timeout: nothing pages, exit 0
        assert fired(d45) == [] and d45.plans == [] and d45.exit_code == 0
        waiting = f.run(50, 625)
        assert restarts(waiting) == [] and fired(waiting) == []
        assert {d.exit_code for d in waiting} == {0}
        # re-checked at a bounded rate (about once per heartbeat_timeout), not on every tick
        assert sum(W1 in p for p in f.pinged[-len(waiting):]) <= len(waiting) * 5 / 10 + 2
        d630 = f.tick(630)  # silent 600s = hung_timeout; a ping sent now confirms it
        assert W1 in f.pinged[-1]
        assert status(d630, W1) == "unresponsive"
        assert [(p.hostname, p.rule) for p in d630.plans] == [(W1, "worker_unresponsive")]
        assert fired(d630) == [f"worker_unresponsive:{W1}"]  # group_below_min is muted: W1 has its own alert
        assert d630.exit_code == 2  # ... but a hung worker is no longer counted: 2 of 3 alive
        # it comes back: the warning resolves once
        f.up(W1, at=650)
        d = f.run(635, 700)
        assert resolved(d) == [f"worker_unresponsive:{W1}"]
        assert restarts(d) == []


# ---------------------------------------------------------------- warm shutdown and retirement
class TestWarmShutdown:
    def test_offline_while_process_runs_is_stopping_not_restarted(self):
        f = fleet(3)
        f.target(W1, "running")
        f.offline(W1, at=31)
        ds = f.run(35, 300)  # a long warm shutdown (tasks finishing)
        assert {status(d, W1) for d in ds} == {"stopping"}
        assert restarts(ds) == [] and fired(ds) == []
        assert all(d.exit_code == 0 for d in ds)

    def test_glob_only_worker_that_left_and_exited_is_retired_quietly(self):
        f = fleet(3)
        f.target(W1, "running")
        f.offline(W1, at=31)
        f.run(35, 60)
        f.target(W1, "exited", since=62)
        ds = f.run(65, 600)
        assert {status(d, W1) for d in ds} == {"retired"}
        assert restarts(f.log) == [] and fired(f.log) == [] and resolved(f.log) == []

    def test_explicit_worker_that_left_and_exited_is_restarted(self):
        f = fleet(3, workers=[W1])
        f.target(W1, "running", tid="celery-web-1.service")
        f.offline(W1, at=31)
        assert restarts(f.run(35, 60)) == []
        f.target(W1, "exited", since=62)
        d = f.tick(65)
        assert status(d, W1) == "dead"
        assert [p.target_id for p in d.plans] == ["celery-web-1.service"]
        assert fired(d) == [LOST1]

    def test_explicit_worker_that_left_without_platform_view_is_brought_back(self):
        # An explicit worker must come back (DESIGN: "every explicit workers entry"). When the platform
        # cannot tell its state, it is judged like any silent worker: pinged, found lost, restarted.
        f = fleet(3, workers=[W1])
        f.target(W1, "unknown", tid="celery-web-1.service")
        f.offline(W1, at=31)
        ds = f.run(35, 100)
        assert restarts(ds) == [W1], [(status(d, W1), next(v.reason for v in d.verdicts if v.hostname == W1))
                                      for d in ds[-1:]]
        assert LOST1 in fired(ds)

    def test_glob_only_worker_whose_pod_was_replaced_is_retired(self):
        f = fleet(3, min_workers=3)
        f.down(W1)  # SIGKILLed by the rolling deploy, no worker-offline
        f.target(W1, "missing", tid="web-abc12")
        ds = f.run(35, 300)
        assert {status(d, W1) for d in ds if d.now > 40} == {"retired"}  # once its heartbeat is stale
        assert restarts(ds) == []
        # ...but the group count still watches: 2 alive < min_workers 3
        assert fired(ds) == ["group_below_min:web"]
        assert f"worker_lost:{W1}" not in fired(ds)

    def test_group_below_min_fires_after_graceful_exit_and_resolves_when_replaced(self):
        f = fleet(2, min_workers=2)
        f.offline(W1, at=31)
        d = f.tick(35)
        assert status(d, W1) == "retired"
        assert fired(d) == ["group_below_min:web"] and d.exit_code == 2
        assert fired(f.run(40, 100)) == []
        f.up(W3, at=101)  # the new deploy's worker
        d = f.tick(105)
        assert resolved(d) == ["group_below_min:web"] and d.exit_code == 0


# ---------------------------------------------------------------- budget, backoff, gave up
class TestBudget:
    def test_backoff_doubles_then_gives_up_once_then_budget_returns(self):
        f = fleet(3, max_restarts=4, backoff="30s", grace="10s", window="30m")
        f.down(W1)  # never comes back, whatever we do
        ds = f.run(35, 1840)
        at = [d.now for d in ds if d.plans]
        assert at == [45, 75, 135, 255]  # gaps 30s, 60s, 120s: doubling backoff
        assert [d.plans[0].budget_left for d in ds if d.plans] == [3, 2, 1, 0]
        gave_up = f"restart_gave_up:{W1}"
        assert fired(ds) == [LOST1, gave_up]  # one gave-up alert, not one per tick
        assert [d.now for d in ds if gave_up in fired(d)] == [265]
        assert all(d.exit_code == 2 for d in ds if d.now >= 45)
        # 30 minutes after the first restart it leaves the window: one restart is possible again
        d = f.tick(1845)
        assert restarts(d) == [W1]
        assert resolved(d) == [gave_up]

    def test_failed_restart_gives_no_grace_but_counts(self):
        f = fleet(3, backoff="30s")
        f.down(W1)
        f.run(35, 40)
        d45 = f.tick(45, ok=False)  # the platform refused
        assert restarts(d45) == [W1]
        d50 = f.tick(50)
        assert status(d50, W1) == "lost"  # not "starting": nothing is on its way
        assert d50.plans == []  # but backoff applies to the failed attempt
        assert f.core.budget("web", W1, 50).used == 1
        assert "backing off" in f.core.policy.notes[W1]
        assert restarts(f.run(55, 70)) == []
        assert restarts(f.tick(75)) == [W1]

    def test_budget_is_per_target(self):
        f = fleet(3, max_restarts=1, grace="10s")
        f.down(W1)
        f.target(W1, "exited", tid="t1")
        ds = f.run(35, 100)
        assert restarts(ds) == [W1]
        f.down(W2)
        f.target(W2, "exited", tid="t2")
        assert restarts(f.tick(105)) == [W2]  # web-1's spent budget is not web-2's


# ---------------------------------------------------------------- grace
class TestGrace:
    def test_no_new_restart_and_no_new_alert_within_grace(self):
        f = fleet(3, grace="60s")
        f.target(W1, "exited", since=31)
        f.down(W1)
        d = f.tick(35)
        assert restarts(d) == [W1] and fired(d) == [LOST1]
        f.target(W1, "exited", since=31)  # the platform still shows the old exit while it restarts
        ds = f.run(40, 90)
        assert {status(x, W1) for x in ds} == {"starting"}
        assert restarts(ds) == [] and fired(ds) == [] and resolved(ds) == []
        assert all(x.exit_code == 2 for x in ds)  # still down: still critical
        f.target(W1, "running", since=91)
        f.up(W1, at=92)
        d = f.tick(95)
        assert resolved(d) == [LOST1] and d.exit_code == 0

    def test_not_back_after_grace_is_restarted_again(self):
        f = fleet(3, grace="60s", backoff="30s")
        f.down(W1)
        f.run(35, 45)
        ds = f.run(50, 100)
        assert restarts(ds) == []
        d = f.tick(105)  # grace over, confirmed by ping again, backoff (30s) long over
        assert W1 in f.pinged[-1] and restarts(d) == [W1]
        assert fired(d) == []  # the same incident: no second worker_lost notification


# ---------------------------------------------------------------- broker outage
class TestBrokerOutage:
    def test_outage_restarts_nothing_alerts_once_and_freezes_other_alerts(self):
        f = fleet(3, qcfg=[{"name": "default", "warning": 100, "for": 0}], max_restarts=0)
        f.down(W1)  # lost, and left so (restarts disabled): its alert stays firing
        f.queue("default", 500)
        before = f.run(35, 60)
        assert sorted(fired(before)) == ["queue_backlog:default", LOST1]
        # the broker goes away; meanwhile web-2's process dies and the platform says so
        f.broker_down()
        f.down(W2, W3)
        f.target(W2, "exited", since=70)
        outage = f.run(65, 160)
        assert restarts(outage) == []
        assert fired(outage) == ["broker_unreachable:broker"]
        assert resolved(outage) == []  # neither the hung worker nor the backlog is "resolved"
        assert {d.exit_code for d in outage} == {3}
        assert all(status(d, W2) == "unknown" for d in outage)

    def test_after_outage_broker_resolves_once_and_silent_workers_get_time(self):
        f = fleet(3, min_workers=3)
        f.broker_down()
        f.run(35, 100)
        f.down(W1, W2, W3)  # they reconnect with their own backoff
        f.broker_up(at=103)
        # outage 35..103 -> settle 60s (2x outage, capped): until 163
        d105 = f.tick(105)
        assert resolved(d105) == ["broker_unreachable:broker"] and d105.exit_code == 0
        f.run(110, 130)
        f.up(W1, W2, at=131)  # these two resume within the settle period
        f.run(135, 160)
        settling = f.log[-12:]
        assert restarts(settling) == [] and fired(settling) == []
        assert all(not f.pinged[-i] for i in range(1, 12))  # nobody pinged while settling
        assert {status(d, W3) for d in settling} == {"unknown"}
        # web-3 never came back: once the settle period is over it is judged as usual
        after = f.run(165, 180)
        assert restarts(after) == [W3]
        # one page: the group's shortfall is web-3's own alert (group_below_min is held but muted)
        assert set(fired(after)) == {f"worker_lost:{W3}"}
        assert f.core.book.states["group_below_min:web"].state == "firing"  # held, not announced
        assert "group_below_min:web" not in f.core.book.notified

    def test_platform_death_after_reconnect_is_not_delayed_by_settling(self):
        f = fleet(3)
        f.broker_down()
        f.run(35, 60)
        f.down(W2)
        f.target(W2, "exited", since=50)
        assert restarts(f.log) == []
        f.broker_up(at=63)
        d = f.tick(65)
        assert restarts(d) == [W2]

    def test_firing_worker_alert_survives_outage_without_refire(self):
        f = fleet(3, max_restarts=0)  # restarts disabled: the alert stays open
        f.down(W1)
        ds = f.run(35, 60)
        assert fired(ds) == [LOST1]
        f.broker_down()
        f.run(65, 100)
        f.broker_up(at=103)
        ds = f.run(105, 300)
        assert fired(ds) == []  # the same incident: not announced twice
        assert resolved(ds) == ["broker_unreachable:broker"]
        assert ds[-1].exit_code == 2 and status(ds[-1], W1) == "lost"

    def test_canary_judged_only_after_settle(self):
        # A canary restarted just before a broker outage cannot be heard during it. Once the broker is
        # back, the settle period says silence proves nothing yet: the group must wait for the canary,
        # neither forgetting the mass loss nor declaring it systemic while nobody can be judged.
        f = fleet(3)
        f.down(W1, W2, W3)
        f.run(35, 45)
        assert [p.canary for d in f.log for p in d.plans] == [True]
        canary = f.core.policy.groups["web"].canary
        f.broker_down()
        f.run(50, 130)
        f.broker_up(at=133)  # settle until 193
        settling = f.run(135, 150)
        assert resolved(settling) == ["broker_unreachable:broker"]  # the mass loss is not over
        f.up(canary, at=151)  # the canary reconnects within the settle period
        ds = f.run(155, 250)
        assert "group_systemic:web" not in fired(f.log)
        assert [(p.hostname, p.canary) for d in ds for p in d.plans] == [
            (h, False) for h in sorted({W1, W2, W3} - {canary})]  # the others, no second canary
        assert fired(ds) == []

    def test_systemic_stop_survives_a_broker_blip(self):
        # DESIGN: canary not back -> stop, one alert; no more restarts until the group recovers or
        # `supervisor reset`. A 3-second broker blip is neither.
        f = fleet(3)
        f.down(W1, W2, W3)
        f.run(35, 105)
        assert fired(f.log) == ["group_mass_loss:web", "group_systemic:web"]
        f.broker_down()
        f.tick(200)
        f.broker_up(at=203)
        ds = f.run(205, 600)
        assert restarts(ds) == []
        assert resolved(ds) == []  # a 3 s blip is below the transient hold: it never paged
        assert fired(ds) == []  # no second mass-loss alert, no second canary
        assert f.core.policy.groups["web"].mode == "systemic"

    def test_dead_worker_is_not_called_alive_after_a_short_outage(self):
        # heartbeat_timeout (30s) longer than the settle period (10s after a 3s blip): once settled, a
        # worker silent since long before the outage is not yet provably lost, but it is not alive either.
        g = group_cfg("web", heartbeat_timeout="30s", restart=restart_cfg(max_restarts=0))
        f = Fleet(make_config([g]))
        f.up(W1, W2, at=0)
        f.run(0, 30)
        f.down(W1)
        ds = f.run(35, 100)
        assert fired(ds) == [LOST1]
        f.broker_down()
        f.tick(105)
        f.broker_up(at=108)  # settle until 118
        ds = f.run(110, 200)
        assert {status(d, W1) for d in ds} <= {"unknown", "lost"}
        assert resolved(ds) == []  # no "web-1 resolved" (and the 3 s blip never paged) ...
        assert fired(ds) == []  # ... and no second "web-1 lost" 30s later


# ---------------------------------------------------------------- mass loss
class TestMassLoss:
    def test_canary_then_the_others(self):
        f = fleet(4, min_workers=3)
        f.down(W1, W2, W3)  # 3 of 4 in one tick
        d = f.tick(45)
        assert [(p.hostname, p.canary) for p in d.plans] == [(W1, True)]
        assert fired(d) == ["group_mass_loss:web"]  # one voice: no per-worker or below-min alert
        assert d.exit_code == 2
        wait = f.run(50, 65)
        assert restarts(wait) == [] and fired(wait) == []
        f.up(W1, at=68)
        d70 = f.tick(70)
        assert sorted(restarts(d70)) == [W2, W3]
        assert all(not p.canary for p in d70.plans)
        f.up(W2, W3, at=80)
        ds = f.run(85, 200)
        assert resolved(f.log) == ["group_mass_loss:web"]
        assert fired(f.log) == ["group_mass_loss:web"]  # muted worker alerts never went out
        assert f.core.policy.groups["web"].mode == "normal"
        assert ds[-1].exit_code == 0

    def test_canary_not_back_is_systemic_once_and_stops(self):
        f = fleet(3)
        f.down(W1, W2, W3)
        ds = f.run(35, 100)
        assert restarts(ds) == [W1]
        d = f.tick(105)  # grace (60s) over, the canary did not come back
        assert fired(d) == ["group_systemic:web"]
        later = f.run(110, 2000)
        assert restarts(later) == [] and fired(later) == []
        assert all(x.exit_code == 2 for x in later)
        # the fleet recovers on its own (someone fixed the broker credentials): all resolved
        f.up(W1, W2, W3, at=2001)
        d = f.tick(2005)
        assert sorted(resolved(d)) == ["group_mass_loss:web", "group_systemic:web"]
        assert f.core.policy.groups["web"].mode == "normal"

    def test_platform_reported_mass_death_also_uses_a_canary(self):
        f = fleet(2)
        for h in (W1, W2):
            f.down(h)
            f.target(h, "exited", since=32)
        d = f.tick(35)
        assert [p.canary for p in d.plans] == [True]

    def test_one_of_two_is_not_a_mass_loss(self):
        f = fleet(2)
        f.down(W1)
        ds = f.run(35, 45)
        assert [(p.hostname, p.canary) for d in ds for p in d.plans] == [(W1, False)]
        assert fired(ds) == [LOST1]

    def test_single_worker_group_is_never_a_mass_loss(self):
        f = fleet(1)
        f.down(W1)
        ds = f.run(35, 45)
        assert [(p.hostname, p.canary) for d in ds for p in d.plans] == [(W1, False)]
        assert "group_mass_loss:web" not in fired(ds)


# ---------------------------------------------------------------- queues
class TestQueues:
    def make(self, **q):
        qc = {"name": "default", "warning": 1000, "critical": 10000, "for": "2m", "min_consumers": 1}
        qc.update(q)
        f = fleet(2, qcfg=[qc])
        return f

    def test_backlog_pending_then_firing_escalates_then_resolves(self):
        f = self.make()
        f.queue("default", 1500, consumers=2)
        d = f.tick(100)
        assert fired(d) == [] and d.exit_code == 1  # `for` delays the alert, never the exit code
        assert f.core.book.states["queue_backlog:default"].state == "pending"
        assert fired(f.run(105, 215)) == []
        d = f.tick(220)
        assert fired(d) == ["queue_backlog:default"]
        assert d.transitions[0].state.severity == "warning"
        f.queue("default", 20000, consumers=2)
        d = f.tick(225)
        assert fired(d) == ["queue_backlog:default"] and d.transitions[0].state.severity == "critical"
        assert d.exit_code == 2
        assert fired(f.run(230, 300)) == []
        f.queue("default", 12, consumers=2)
        d = f.tick(305)
        assert resolved(d) == ["queue_backlog:default"] and d.exit_code == 0

    def test_short_spike_never_alerts_but_shows_in_exit_code(self):
        f = self.make()
        f.queue("default", 50000, consumers=2)
        d = f.tick(100)
        assert d.exit_code == 2
        f.queue("default", 0, consumers=2)
        ds = f.run(105, 400)
        assert fired(f.log) == resolved(f.log) == []
        assert ds[-1].exit_code == 0

    def test_no_consumer(self):
        f = self.make(**{"for": 0})
        f.queue("default", 3, consumers=0)
        d = f.tick(100)
        assert fired(d) == ["queue_consumers:default"] and d.exit_code == 2
        f.queue("default", 3, consumers=1)
        assert resolved(f.tick(105)) == ["queue_consumers:default"]

    def test_unreadable_queue_warns(self):
        f = self.make()
        f.queue("default", None, error="NOAUTH Authentication required")
        d = f.tick(100)
        # one failed read does not page (transient hold); the exit code says it at once
        assert fired(d) == [] and d.exit_code == 1
        assert fired(f.tick(111)) == ["queue_unreadable:default"]
        f.queue("default", 0, consumers=1)
        assert resolved(f.tick(115)) == ["queue_unreadable:default"]

    def test_unreadable_queue_does_not_resolve_its_backlog_alert(self):
        # We cannot tell that the backlog drained: resolving it would tell on-call all is well.
        f = self.make(**{"for": 0})
        f.queue("default", 50000, consumers=2)
        assert fired(f.tick(100)) == ["queue_backlog:default"]
        f.queue("default", None, error="timed out")
        d = f.tick(105)
        assert "queue_backlog:default" not in resolved(d)


# ---------------------------------------------------------------- the core as a whole
class TestCore:
    def test_worker_in_a_glob_group_and_named_in_another_is_restarted_once(self):
        cfg = make_config([group_cfg("all", hostnames=["celery@*"]), group_cfg("special", workers=["celery@sp-1"])])
        f = Fleet(cfg)
        f.up("celery@sp-1", W1, W2, at=0)
        f.run(0, 30)
        f.down("celery@sp-1")
        ds = f.run(35, 45)
        assert [(d.now, p.hostname) for d in ds for p in d.plans] == [(45, "celery@sp-1")]

    def test_restart_of_the_supervisor_neither_refires_nor_forgets_the_budget(self):
        f = fleet(3, max_restarts=1, grace="10s")
        f.down(W1)
        f.run(35, 60)
        assert restarts(f.log) == [W1] and fired(f.log) == [LOST1, f"restart_gave_up:{W1}"]
        # what state.py persists, loaded by a new process
        book = rules.RuleBook(f.core.book.states, f.core.book.notified)
        state = policy.PolicyState(history={k: list(v) for k, v in f.core.policy.history.items()},
                                   restarted=dict(f.core.policy.restarted))
        g = Fleet(f.cfg, start=70, core=Core(f.cfg, state, book))
        g.seen, g.status = dict(f.seen), dict(f.status)
        ds = g.run(70, 200)
        assert fired(ds) == [] and restarts(ds) == []

    def test_one_shot_exit_codes(self):
        cfg = make_config([group_cfg("web", workers=[W1, W2])])
        f = Fleet(cfg, start=0)
        f.one_shot = True
        f.up(W2, at=1)
        f.down(W1)
        f.status.pop(W1)
        d = f.tick(3)
        assert status(d, W1) == "lost" and status(d, W2) == "alive"
        assert d.exit_code == 2
        assert restarts(d) == [W1]

    def test_exit_code_3_wins_when_not_observable(self):
        f = fleet(2)
        f.broker_down()
        d = f.tick(35)
        assert d.exit_code == 3 and d.severity == "critical"

    def test_settle_bounds(self):
        assert decide.SETTLE_MIN <= decide.SETTLE_MAX
        f = fleet(2)
        f.broker_down()
        f.tick(35)
        f.broker_up(at=36)  # a one-second blip still gives SETTLE_MIN
        f.tick(40)
        assert f.core.settle_until == 36 + decide.SETTLE_MIN
