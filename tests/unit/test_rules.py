"""rules.py: one observation -> verdicts and findings; RuleBook: pending -> firing -> resolved."""

from __future__ import annotations

from supervisor import rules
from supervisor.model import Finding, Observation, QueueSeen, Target, WorkerSeen
from tests.unit.recorded import group_cfg, make_config, restart_cfg

W1, W2 = "celery@web-1", "celery@web-2"


def cfg_one(**kw):
    return make_config([group_cfg("web", **kw)])


def obs(now=100.0, workers=(), pinged=(), pongs=(), targets=(), **kw) -> Observation:
    return Observation(
        now=now,
        listening_since=kw.pop("listening_since", 0.0),
        workers={w.hostname: w for w in workers},
        pinged=frozenset(pinged),
        pongs=frozenset(pongs),
        targets={"web": tuple(targets)} if targets else {},
        **kw,
    )


def verdict(cfg, o, host=W1, restarts=None, settle_until=None):
    vs = rules.judge(cfg, o, restarts or {}, settle_until)
    return next(v for v in vs if v.hostname == host)


# ---------------------------------------------------------------- worker verdicts
class TestLost:
    def test_silent_and_pinged_without_pong_is_lost(self):
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=85)], pinged=[W1])
        v = verdict(cfg, o)
        assert v.status == "lost"
        assert v.silent_for == 15
        [f] = rules.worker_findings(cfg, o, [v], {})
        assert (f.rule, f.subject, f.severity) == ("worker_lost", W1, "critical")

    def test_silent_but_not_yet_pinged_is_not_judged(self):
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=85)])
        v = verdict(cfg, o)
        assert v.status == "unknown"
        assert rules.worker_findings(cfg, o, [v], {}) == []
        # ...but it is the one the loop must ping
        assert rules.suspects(cfg, o, {}) == [W1]

    def test_missing_heartbeat_but_answered_ping_is_alive(self):
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=10)], pinged=[W1], pongs=[W1])
        assert verdict(cfg, o).status == "alive"

    def test_within_heartbeat_timeout_is_alive_and_not_pinged(self):
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=91)])
        assert verdict(cfg, o).status == "alive"
        assert rules.suspects(cfg, o, {}) == []

    def test_silence_counts_from_when_we_started_listening(self):
        # the supervisor just (re)connected: a worker not heard for 90s is not yet provably lost
        # (we listened only 5s), and not pinged yet; but nor is it "alive": its last heartbeat is stale
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=10)], listening_since=95)
        assert rules.suspects(cfg, o, {}) == []
        assert verdict(cfg, o).status == "unknown", verdict(cfg, o).reason

    def test_explicit_worker_never_heard_is_lost_once_pinged(self):
        cfg = make_config([group_cfg("web", workers=[W1])])
        assert verdict(cfg, obs(5, [])).status == "unknown"  # listening for 5s: too early
        assert rules.suspects(cfg, obs(20, []), {}) == [W1]
        v = verdict(cfg, obs(20, [], pinged=[W1]))
        assert v.status == "lost" and v.explicit

    def test_heartbeat_stream_not_connected_judges_nothing(self):
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=10)], pinged=[W1], listening_since=None)
        assert verdict(cfg, o).status == "unknown"
        assert rules.suspects(cfg, o, {}) == []


class TestPlatformDeath:
    def test_exited_target_is_dead_at_once(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited", "exit code -9", since=99)
        o = obs(100, [WorkerSeen(W1, last_heartbeat=98)], targets=[t])  # heartbeat 2s ago, not pinged
        v = verdict(cfg, o)
        assert v.status == "dead"
        assert "exit code -9" in v.reason
        [f] = rules.worker_findings(cfg, o, [v], {})
        assert f.key == f"worker_lost:{W1}" and f.severity == "critical"

    def test_crashed_target_is_dead(self):
        cfg = cfg_one()
        t = Target("app/1", "web", W1, "crashed", "CRASHED", since=99.5)
        assert verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=99)], targets=[t])).status == "dead"

    def test_a_death_the_platform_did_not_witness_is_confirmed_by_ping(self):
        """A stale pid file (since None) against a fresh heartbeat: ping first, never restart blind."""
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited", "not running (pid 7 gone)", since=None)
        seen = [WorkerSeen(W1, last_heartbeat=99)]
        assert rules.suspects(cfg, obs(100, seen, targets=[t]), {}) == [W1]
        assert verdict(cfg, obs(100, seen, targets=[t])).status == "unknown"
        assert verdict(cfg, obs(100, seen, pinged=[W1], pongs=[W1], targets=[t])).status == "alive"
        assert verdict(cfg, obs(100, seen, pinged=[W1], targets=[t])).status == "dead"

    def test_heard_after_the_platform_saw_it_die_is_confirmed_by_ping(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited", since=95)
        seen = [WorkerSeen(W1, last_heartbeat=99)]
        assert verdict(cfg, obs(100, seen, targets=[t])).status == "unknown"
        assert verdict(cfg, obs(100, seen, pinged=[W1], pongs=[W1], targets=[t])).status == "alive"

    def test_dead_target_is_not_pinged(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited")
        assert rules.suspects(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=10)], targets=[t]), {}) == []

    def test_pong_beats_a_stale_platform_state(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=10)], pinged=[W1], pongs=[W1], targets=[t])
        assert verdict(cfg, o).status == "alive"


class TestHung:
    def test_running_target_silent_without_pong_is_busy_within_hung_timeout(self):
        cfg = cfg_one(min_workers=1)
        t = Target("web-1.service", "web", W1, "running")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=80)], pinged=[W1], targets=[t])
        v = verdict(cfg, o)
        assert v.status == "busy" and v.alive
        assert v.silent_for == 20
        assert rules.worker_findings(cfg, o, [v], {}) == []  # no warning, and it counts for min_workers

    def test_running_target_silent_for_hung_timeout_is_unresponsive_warning(self):
        cfg = cfg_one(hung_timeout="60s")
        t = Target("web-1.service", "web", W1, "running")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=40)], pinged=[W1], targets=[t])
        v = verdict(cfg, o)
        assert v.status == "unresponsive" and not v.alive
        assert v.silent_for == 60
        [f] = rules.worker_findings(cfg, o, [v], {})
        assert (f.rule, f.severity) == ("worker_unresponsive", "warning")

    def test_hung_timeout_needs_a_ping_sent_after_it(self):
        # the last failed ping went out before hung_timeout was reached: confirm again first
        cfg = cfg_one(hung_timeout="60s")
        t = Target("web-1.service", "web", W1, "running")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=40)], noreply_at={W1: 95.0}, targets=[t])
        v = verdict(cfg, o)
        assert v.status == "busy" and "confirming by ping" in v.reason
        [need] = rules.ping_needs(cfg, o, {})
        assert (need.hostname, need.kind, need.after) == (W1, "hung", 100.0)

    def test_platform_restarting_is_starting(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "restarting")
        assert verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=80)], targets=[t])).status == "starting"


class TestWarmShutdown:
    def test_offline_while_process_runs_is_stopping(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "running")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60, offline_at=61)], pinged=[W1], targets=[t])
        v = verdict(cfg, o)
        assert v.status == "stopping"
        assert rules.worker_findings(cfg, o, [v], {}) == []
        assert rules.suspects(cfg, o, {}) == []

    def test_glob_only_worker_that_left_and_exited_is_retired(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited", since=62)
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60, offline_at=61)], targets=[t])
        v = verdict(cfg, o)
        assert v.status == "retired"
        assert rules.worker_findings(cfg, o, [v], {}) == []

    def test_glob_only_worker_that_left_without_a_target_is_retired(self):
        cfg = cfg_one()
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60, offline_at=61)])
        assert verdict(cfg, o).status == "retired"

    def test_explicit_worker_that_left_and_exited_is_dead(self):
        cfg = make_config([group_cfg("web", workers=[W1])])
        t = Target("web-1.service", "web", W1, "exited", since=62)
        v = verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=60, offline_at=61)], targets=[t]))
        assert v.status == "dead" and v.explicit

    def test_explicit_worker_that_left_is_pinged_once_silent(self):
        # "an explicit worker that left must come back": judged like a silent one, which needs a ping
        cfg = make_config([group_cfg("web", workers=[W1])])
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60, offline_at=61)])
        assert rules.suspects(cfg, o, {}) == [W1]

    def test_glob_only_worker_whose_target_is_missing_is_retired(self):
        # pod replaced by a rolling deploy, killed without worker-offline
        cfg = cfg_one()
        t = Target("web-1-abc", "web", W1, "missing")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60)], pinged=[W1], targets=[t])
        assert verdict(cfg, o).status == "retired"

    def test_explicit_worker_whose_target_is_missing_is_lost(self):
        cfg = make_config([group_cfg("web", workers=[W1])])
        t = Target("web-1-abc", "web", W1, "missing")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60)], pinged=[W1], targets=[t])
        assert verdict(cfg, o).status == "lost"

    def test_glob_only_worker_killed_with_its_target_still_there_is_lost(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "unknown")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60)], pinged=[W1], targets=[t])
        assert verdict(cfg, o).status == "lost"

    def test_group_below_min_counts_retired_workers_out(self):
        cfg = make_config([group_cfg("web", min_workers=2)])
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60, offline_at=61), WorkerSeen(W2, last_heartbeat=99)])
        vs = rules.judge(cfg, o, {})
        assert {v.hostname: v.status for v in vs} == {W1: "retired", W2: "alive"}
        [f] = rules.worker_findings(cfg, o, vs, {})
        assert (f.rule, f.subject, f.value) == ("group_below_min", "web", 1)


class TestGrace:
    def test_within_grace_a_silent_worker_is_starting_and_not_pinged(self):
        cfg = cfg_one()
        restarts = {W1: (95.0, "worker_lost")}
        o = obs(100, [WorkerSeen(W1, last_heartbeat=60)], pinged=[W1])
        v = verdict(cfg, o, restarts=restarts)
        assert v.status == "starting"
        assert rules.suspects(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=60)]), restarts) == []
        [f] = rules.worker_findings(cfg, o, [v], restarts)
        assert (f.rule, f.severity) == ("worker_lost", "critical")  # stays open until it is back

    def test_heartbeat_from_before_the_restart_does_not_count(self):
        cfg = cfg_one()
        v = verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=94)]), restarts={W1: (95.0, "worker_lost")})
        assert v.status == "starting"

    def test_heartbeat_after_the_restart_is_alive(self):
        cfg = cfg_one()
        v = verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=99)]), restarts={W1: (95.0, "worker_lost")})
        assert v.status == "alive"

    def test_exit_reported_before_the_restart_is_not_a_new_death(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited", since=90)
        v = verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=60)], targets=[t]),
                    restarts={W1: (95.0, "worker_lost")})
        assert v.status == "starting"

    def test_exit_after_the_restart_is_a_new_death(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited", since=98)
        v = verdict(cfg, obs(100, [WorkerSeen(W1, last_heartbeat=97)], targets=[t]),
                    restarts={W1: (95.0, "worker_lost")})
        assert v.status == "dead"

    def test_grace_is_over(self):
        cfg = cfg_one()
        o = obs(200, [WorkerSeen(W1, last_heartbeat=60)], pinged=[W1])
        assert verdict(cfg, o, restarts={W1: (95.0, "worker_lost")}).status == "lost"


class TestSettleAndBroker:
    def test_broker_down_judges_no_worker_and_raises_one_finding(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited")
        o = obs(100, [WorkerSeen(W1, last_heartbeat=10)], pinged=[W1], targets=[t], broker_ok=False,
                broker_error="Connection refused")
        v = verdict(cfg, o)
        assert v.status == "unknown"
        assert rules.worker_findings(cfg, o, [v], {}) == []
        assert rules.queue_findings(cfg, o) == []
        [f] = rules.broker_findings(cfg, o)
        assert (f.rule, f.subject, f.severity) == ("broker_unreachable", "broker", "critical")
        assert "Connection refused" in f.summary
        assert rules.suspects(cfg, o, {}) == []

    def test_broker_finding_shows_no_password(self):
        cfg = cfg_one()
        [f] = rules.broker_findings(cfg, obs(100, broker_ok=False))
        assert "brokerpass" not in f.summary
        assert "localhost:6379" in f.summary

    def test_silent_worker_is_not_judged_while_settling(self):
        cfg = cfg_one()
        o = obs(130, [WorkerSeen(W1, last_heartbeat=60)], pinged=[W1], listening_since=115)
        assert verdict(cfg, o, settle_until=140).status == "unknown"
        assert rules.suspects(cfg, o, {}, settle_until=140) == []
        assert verdict(cfg, o, settle_until=None).status == "lost"

    def test_platform_death_is_judged_while_settling(self):
        cfg = cfg_one()
        t = Target("web-1.service", "web", W1, "exited")
        o = obs(130, [WorkerSeen(W1, last_heartbeat=60)], targets=[t], listening_since=115)
        assert verdict(cfg, o, settle_until=140).status == "dead"


class TestOneShot:
    def test_once_judges_a_worker_not_heard_in_the_window_and_not_answering_as_lost(self):
        cfg = make_config([group_cfg("web", workers=[W1, W2])])
        o = obs(3, [WorkerSeen(W2, last_heartbeat=1)], listening_since=0, one_shot=True)
        assert rules.suspects(cfg, o, {}) == [W1]
        from dataclasses import replace

        vs = {v.hostname: v.status for v in rules.judge(cfg, replace(o, pinged=frozenset([W1])), {})}
        assert vs == {W1: "lost", W2: "alive"}


# ---------------------------------------------------------------- group and queue findings
class TestGroupAndQueues:
    def test_group_below_min_waits_for_every_verdict(self):
        cfg = make_config([group_cfg("web", min_workers=2)])
        o = obs(100, [WorkerSeen(W1, last_heartbeat=99), WorkerSeen(W2, last_heartbeat=10)])
        vs = rules.judge(cfg, o, {})
        assert rules.worker_findings(cfg, o, vs, {}) == []  # web-2 not pinged yet: cannot count

    def queues_cfg(self, **q):
        base = {"name": "default", "warning": 100, "critical": 1000, "for": "2m", "min_consumers": 1}
        base.update(q)
        return make_config([group_cfg("web", queues=["default"])], queues=[base])

    def test_backlog_levels(self):
        cfg = self.queues_cfg()
        for n, want in [(0, None), (99, None), (100, "warning"), (999, "warning"), (1000, "critical")]:
            o = obs(100, queues={"default": QueueSeen("default", n, consumers=2)})
            fs = rules.queue_findings(cfg, o)
            assert [f.severity for f in fs] == ([want] if want else []), n
            if want:
                assert fs[0].key == "queue_backlog:default" and fs[0].hold == 120

    def test_min_consumers(self):
        cfg = self.queues_cfg()
        [f] = rules.queue_findings(cfg, obs(100, queues={"default": QueueSeen("default", 0, consumers=0)}))
        assert (f.rule, f.severity, f.value) == ("queue_consumers", "critical", 0)
        assert rules.queue_findings(cfg, obs(100, queues={"default": QueueSeen("default", 0, consumers=None)})) == []

    def test_unreadable_queue(self):
        cfg = self.queues_cfg()
        o = obs(100, queues={"default": QueueSeen("default", None, error="NOPERM")})
        [f] = rules.queue_findings(cfg, o)
        assert (f.rule, f.severity) == ("queue_unreadable", "warning")
        assert "NOPERM" in f.summary

    def test_worst(self):
        f = lambda sev: Finding("r", sev, sev, "s")  # noqa: E731
        assert rules.worst([]) == "ok"
        assert rules.worst([f("info")]) in ("ok", "info")  # info never changes the exit code
        assert rules.worst([f("warning"), f("info")]) == "warning"
        assert rules.worst([f("warning"), f("critical"), f("info")]) == "critical"


class TestGroupMatching:
    def test_first_matching_group_owns_a_hostname(self):
        cfg = make_config([
            group_cfg("a", hostnames=["celery@web-1"]),
            group_cfg("b", hostnames=["celery@web-*"], restart=restart_cfg()),
        ])
        o = Observation(now=1, listening_since=0, workers={W1: WorkerSeen(W1, 1), W2: WorkerSeen(W2, 1)})
        assert rules.group_hostnames(cfg, cfg.groups[0], o) == [W1]
        assert rules.group_hostnames(cfg, cfg.groups[1], o) == [W2]

    def test_a_hostname_is_judged_in_one_group_only(self):
        # a catch-all glob group listed before a group that names the worker explicitly
        cfg = make_config([group_cfg("all", hostnames=["celery@*"]), group_cfg("special", workers=["celery@sp-1"])])
        o = Observation(now=100, listening_since=0, workers={"celery@sp-1": WorkerSeen("celery@sp-1", 60)},
                        pinged=frozenset(["celery@sp-1"]))
        vs = [v for v in rules.judge(cfg, o, {}) if v.hostname == "celery@sp-1"]
        assert len(vs) == 1, [(v.group, v.status) for v in vs]

    def test_explicit_workers_and_target_hostnames_are_part_of_the_group(self):
        cfg = make_config([group_cfg("web", hostnames=["celery@web-*"], workers=["celery@extra-1"])])
        t = Target("web-9.service", "web", "celery@web-9", "exited")
        o = Observation(now=1, listening_since=0, targets={"web": (t,)})
        assert rules.group_hostnames(cfg, cfg.groups[0], o) == ["celery@extra-1", "celery@web-9"]


# ---------------------------------------------------------------- RuleBook
def F(rule="queue_backlog", subject="q", severity="warning", hold=0.0):
    return Finding(rule, subject, severity, f"{rule} {subject} {severity}", hold=hold)


class TestRuleBook:
    def test_pending_then_firing_after_hold(self):
        book = rules.RuleBook()
        assert book.advance([F(hold=60)], 0) == []
        assert book.states["queue_backlog:q"].state == "pending"
        assert book.advance([F(hold=60)], 59) == []
        [t] = book.advance([F(hold=60)], 60)
        assert (t.key, t.old, t.new) == ("queue_backlog:q", "pending", "firing")
        assert t.state.since == 0 and t.state.fired_at == 60
        assert book.advance([F(hold=60)], 65) == []  # once, not per tick

    def test_pending_that_clears_before_hold_never_notifies(self):
        book = rules.RuleBook()
        book.advance([F(hold=60)], 0)
        assert book.advance([], 30) == []  # no resolved for what was never announced
        assert book.states == {}
        assert book.advance([F(hold=60)], 40) == []  # the hold starts over
        assert book.advance([F(hold=60)], 99) == []
        assert [t.new for t in book.advance([F(hold=60)], 100)] == ["firing"]

    def test_resolved_once_for_what_fired(self):
        book = rules.RuleBook()
        book.advance([F()], 0)
        [t] = book.advance([], 10)
        assert (t.old, t.new, t.state.resolved_at) == ("firing", "resolved", 10)
        assert book.advance([], 20) == []

    def test_escalation_notifies_again_deescalation_does_not(self):
        book = rules.RuleBook()
        book.advance([F(severity="warning")], 0)
        [t] = book.advance([F(severity="critical")], 10)
        assert (t.old, t.new, t.state.severity) == ("firing", "firing", "critical")
        assert book.advance([F(severity="critical")], 20) == []
        assert book.advance([F(severity="warning")], 30) == []
        assert book.states["queue_backlog:q"].severity == "warning"

    def test_muted_is_announced_when_the_mute_lifts(self):
        book = rules.RuleBook()
        assert book.advance([F()], 0, muted={"queue_backlog:q"}) == []
        [t] = book.advance([F()], 10)
        assert t.new == "firing"

    def test_muted_that_clears_is_never_resolved(self):
        book = rules.RuleBook()
        book.advance([F()], 0, muted={"queue_backlog:q"})
        assert book.advance([], 10) == []

    def test_frozen_state_is_kept_not_resolved(self):
        book = rules.RuleBook()
        book.advance([F()], 0)
        assert book.advance([], 10, frozen=lambda st: True) == []
        assert "queue_backlog:q" in book.states
        assert book.advance([F()], 20) == []  # still the same alert: no new notification
        assert [t.new for t in book.advance([], 30)] == ["resolved"]

    def test_restored_book_does_not_refire(self):
        book = rules.RuleBook()
        book.advance([F()], 0)
        again = rules.RuleBook(book.states, book.notified)
        assert again.advance([F()], 100) == []
        assert [t.new for t in again.advance([], 110)] == ["resolved"]
