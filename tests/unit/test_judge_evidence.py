"""Workers judged by their last evidence of life (issue 14, findings 2, 5 and 6).

- Workers started with ``--without-heartbeat --without-gossip --without-mingle`` send no worker
  event at all; a reply to a ping is evidence of life with its own time, refreshed at a bounded rate.
- Busy is not broken: a worker whose process runs and that is silent for less than hung_timeout is
  "busy", counted as alive, and pages nobody; consumers are counted from what workers last said.
- Workers that stay down are re-checked at a bounded rate, not on every tick.

Recorded observations replayed through ``decide.Core`` with an injected clock.
"""

from __future__ import annotations

from supervisor import rules
from supervisor.decide import Core
from supervisor.model import Observation, QueueSeen, Target, WorkerQueues, WorkerSeen
from tests.unit.recorded import Fleet, fired, group_cfg, make_config, resolved, restart_cfg, restarts, status

W1, W2, W3 = "celery@web-1", "celery@web-2", "celery@web-3"


def heartbeatless(n=1, *, hung="60s", min_workers=0, queues=None, **restart) -> Fleet:
    """Explicit workers started with --without-heartbeat: never a heartbeat, they answer ping."""
    hosts = [f"celery@web-{i}" for i in range(1, n + 1)]
    g = group_cfg("web", workers=hosts, hung_timeout=hung, min_workers=min_workers, restart=restart_cfg(**restart))
    f = Fleet(make_config([g], queues=queues))
    for h in hosts:
        f.quiet(h)
        f.target(h, "running")
    return f


def pings_of(f: Fleet, hostname: str, last: int | None = None) -> int:
    return sum(hostname in p for p in (f.pinged if last is None else f.pinged[-last:]))


# ---------------------------------------------------------------- finding 2: no heartbeats
class TestWithoutHeartbeats:
    def test_a_worker_that_only_answers_pings_stays_alive_for_ever(self):
        f = heartbeatless(1)
        ds = f.run(0, 600)
        # "not heard yet" for the first heartbeat_timeout (it could not be), then answering pings
        assert {status(d, W1) for d in ds[3:]} == {"alive"}
        assert fired(ds) == [] and restarts(ds) == []
        assert {d.exit_code for d in ds} == {0}

    def test_it_is_pinged_at_a_bounded_rate_to_refresh_its_evidence(self):
        f = heartbeatless(1)
        ds = f.run(0, 600, step=1.0)  # a tick every second
        # one ping every heartbeat_timeout / 2 (5 s), about 12 a minute: not one per tick
        n = pings_of(f, W1)
        assert 600 / 5 * 0.8 <= n <= 600 / 5 + 2, n
        assert all(v.reason.startswith("answered ping") for d in ds[15:] for v in d.verdicts)

    def test_silence_counts_from_the_last_pong_not_from_when_we_listen(self):
        # the old silence grew from listening_since for ever: 1000 s of listening, a pong 3 s ago
        cfg = make_config([group_cfg("web", workers=[W1])])
        o = Observation(now=1000, listening_since=0, pong_at={W1: 997.0},
                        targets={"web": (Target("w1", "web", W1, "running"),)})
        v = rules.judge(cfg, o, {})[0]
        assert v.status == "alive" and v.silent_for == 3
        assert rules.suspects(cfg, o, {}) == []

    def test_busy_for_longer_than_heartbeat_timeout_is_busy_not_restarted_at_the_first_missed_ping(self):
        f = heartbeatless(1, hung="60s", min_workers=1)
        f.run(0, 300)  # healthy, answering pings, for five minutes
        f.hang(W1)  # a solo pool starts a 40 s task: it answers nothing
        busy = f.run(305, 340)
        assert restarts(busy) == [] and fired(busy) == [] and resolved(busy) == []
        assert {d.exit_code for d in busy} == {0}  # busy is not broken
        assert "busy" in {status(d, W1) for d in busy}
        assert all(status(d, W1) in ("alive", "busy") for d in busy)
        assert all(d.verdicts[0].alive for d in busy)  # counted for min_workers
        f.quiet(W1)  # the task ended: it answers again
        after = f.run(345, 400)
        assert {status(d, W1) for d in after[2:]} == {"alive"}
        assert fired(after) == restarts(after) == []

    def test_busy_past_hung_timeout_is_restarted_once_confirmed_after_it(self):
        f = heartbeatless(1, hung="60s")
        f.run(0, 100)
        last_pong = max(f.core.pong_at.values())
        f.hang(W1)
        ds = f.run(105, 200)
        plans = [(d.now, p.hostname, p.rule) for d in ds for p in d.plans]
        assert len(plans) == 1, plans
        at, host, rule = plans[0]
        assert (host, rule) == (W1, "worker_unresponsive")
        assert at - last_pong >= 60  # never before hung_timeout of silence since its last pong
        assert at - last_pong <= 60 + 10  # ... and not long after
        d = next(d for d in ds if d.plans)
        assert status(d, W1) == "unresponsive" and fired(d) == [f"worker_unresponsive:{W1}"]
        assert f.core.noreply_at[W1] >= last_pong + 60  # the ping that confirmed it went out after

    def test_killed_without_platform_view_is_lost_after_heartbeat_timeout_since_its_pong(self):
        f = heartbeatless(2)
        f.target(W1, "unknown")
        f.run(0, 100)
        f.down(W1)
        ds = f.run(105, 130)
        lost_at = next(d.now for d in ds if status(d, W1) == "lost")
        assert 100 + 10 <= lost_at <= 100 + 10 + 10
        assert restarts(ds) == [W1]
        assert {status(d, W2) for d in ds} == {"alive"}

    def test_platform_death_after_the_last_pong_is_dead_at_once(self):
        cfg = make_config([group_cfg("web", workers=[W1])])
        t = Target("w1", "web", W1, "exited", "exit code -9", since=99.0)
        o = Observation(now=100, listening_since=0, pong_at={W1: 98.0}, targets={"web": (t,)})
        assert rules.judge(cfg, o, {})[0].status == "dead"
        assert rules.suspects(cfg, o, {}) == []  # the platform's word, no ping

    def test_a_pong_before_our_restart_is_not_back(self):
        cfg = make_config([group_cfg("web", workers=[W1], restart=restart_cfg(grace="60s"))])
        o = Observation(now=100, listening_since=0, pong_at={W1: 95.0})
        v = rules.judge(cfg, o, {W1: (96.0, "worker_lost")})[0]
        assert v.status == "starting"
        o2 = Observation(now=100, listening_since=0, pong_at={W1: 97.0})
        assert rules.judge(cfg, o2, {W1: (96.0, "worker_lost")})[0].status == "alive"

    def test_confirmation_needs_a_ping_sent_after_the_restart(self):
        f = heartbeatless(1, grace="20s")
        f.target(W1, "unknown")
        f.run(0, 50)
        f.down(W1)
        f.run(55, 70)
        assert restarts(f.log) == [W1]
        restarted_at = f.core.policy.restarted[W1][0]
        ds = f.run(75, 120)  # never came back: after grace, pinged again before a second restart
        second = next(d for d in ds if d.plans)
        assert second.now >= restarted_at + 20
        assert f.core.noreply_at[W1] >= restarted_at + 20

    def test_refresh_pings_go_on_while_settling_after_an_outage(self):
        f = heartbeatless(1)
        f.run(0, 60)
        f.broker_down()
        f.run(65, 70)
        f.broker_up(at=72)
        ds = f.run(75, 110)
        assert {status(d, W1) for d in ds} == {"alive"}  # never "unknown": its pongs never got old
        assert fired(ds) == [] and restarts(ds) == []

    def test_once_pings_a_worker_without_heartbeats_and_judges_it_alive(self):
        cfg = make_config([group_cfg("web", workers=[W1])])
        f = Fleet(cfg, start=0)
        f.one_shot = True
        f.quiet(W1)
        d = f.tick(3)
        assert f.pinged[-1] == {W1}  # `once` pings the expected workers it did not hear
        assert status(d, W1) == "alive" and d.exit_code == 0


# ---------------------------------------------------------------- finding 5: busy is not broken
class TestBusyIsNotBroken:
    def two_solo(self, **kw) -> Fleet:
        cfg = make_config([group_cfg("web", workers=[W1, W2], min_workers=2, hung_timeout="60s")],
                          queues=[{"name": "q", "min_consumers": 1, **kw}])
        f = Fleet(cfg)
        f.up(W1, W2, at=0)
        for h in (W1, W2):
            f.target(h, "running")
            f.serve(h, "q")
        f.queue("q", 0)
        f.run(0, 30)
        return f

    def test_two_busy_solo_workers_page_nobody(self):
        f = self.two_solo()
        f.hang(W1, W2)  # both run a 50 s task: no heartbeat, no pong, no active_queues reply
        f.queue("q", 7)
        ds = f.run(35, 80)
        assert fired(ds) == [] and restarts(ds) == []
        assert {d.exit_code for d in ds} == {0}
        assert {status(d, W1) for d in ds[-5:]} == {"busy"}
        # they still consume q: counted from what they last said
        assert {d.obs.queues["q"].consumers for d in ds} == {2}
        assert all(not any(f_.rule == "group_below_min" for f_ in d.findings) for d in ds)

    def test_a_dead_consumer_drops_out_of_the_count(self):
        f = self.two_solo()
        f.hang(W1)
        f.down(W2)
        f.target(W2, "exited", since=31)
        d = f.tick(35)
        assert status(d, W2) == "dead" and d.obs.queues["q"].consumers == 1  # W1 busy still counts
        f.target(W1, "crashed", since=36)
        f.down(W1)
        d = f.tick(40)
        assert d.obs.queues["q"].consumers == 0
        assert "queue_consumers:q" in fired(d)

    def test_a_worker_that_stopped_consuming_the_queue_is_not_counted(self):
        f = self.two_solo()
        f.serve(W1, "other")
        f.serve(W2, "other")  # cancel_consumer: they still answer, without q
        d = f.tick(35)
        assert d.obs.queues["q"].consumers == 0 and fired(d) == ["queue_consumers:q"]

    def test_once_without_history_does_not_claim_zero_consumers(self):
        cfg = make_config([group_cfg("web", workers=[W1, W2], min_workers=2)],
                          queues=[{"name": "q", "min_consumers": 1}])
        f = Fleet(cfg, start=0)
        f.one_shot = True
        for h in (W1, W2):
            f.target(h, "running")
            f.hang(h)  # busy solo pools: no heartbeat in the window, no pong, no census reply
        f.census = True
        f.queue("q", 3)
        d = f.tick(3)
        assert {status(d, h) for h in (W1, W2)} == {"busy"}
        assert d.obs.queues["q"].consumers is None  # unknown, never a false 0
        assert d.findings == [] and d.exit_code == 0
        assert all(v.silent_for is None for v in d.verdicts)  # one pass cannot measure a silence

    def test_a_lower_bound_that_meets_the_minimum_is_enough(self):
        cfg = make_config([group_cfg("web", workers=[W1, W2])], queues=[{"name": "q", "min_consumers": 1}])
        o = Observation(now=10, listening_since=0, census_at=9.0,
                        workers={W1: WorkerSeen(W1, last_heartbeat=9), W2: WorkerSeen(W2, last_heartbeat=9)},
                        worker_queues={W1: WorkerQueues(9.0, frozenset({"q"}))},
                        queues={"q": QueueSeen("q", 0)})
        vs = rules.judge(cfg, o, {})
        assert rules.count_consumers(cfg, o, vs)["q"].consumers == 1  # W2's queues unknown: 1 is proven

    def test_nothing_is_counted_before_the_first_census(self):
        cfg = make_config([group_cfg("web", workers=[W1])], queues=[{"name": "q", "min_consumers": 1}])
        o = Observation(now=10, listening_since=0, queues={"q": QueueSeen("q", 0)})
        assert rules.count_consumers(cfg, o, rules.judge(cfg, o, {}))["q"].consumers is None

    def test_what_workers_consume_survives_a_restart_of_the_supervisor(self):
        f = self.two_solo()
        saved = f.core.to_json()
        core = Core(f.cfg)
        core.restore(saved)
        assert core.past_queues[W1].names == {"q"} and W1 in core.past_pong
        # a `once` after it (cron): both busy, no census reply; their queues are known from the state
        g = Fleet(f.cfg, start=100, core=core)
        g.one_shot = True
        for h in (W1, W2):
            g.target(h, "running")
            g.hang(h)
        g.census = True
        g.queue("q", 3)
        d = g.tick(103)
        assert d.obs.queues["q"].consumers == 2 and d.exit_code == 0

    def test_remembered_replies_never_make_a_hostname_part_of_a_group(self):
        cfg = make_config([group_cfg("web", hostnames=["celery@web-*"])])
        core = Core(cfg)
        core.restore({"evidence": {"pong": {W3: 5.0}, "queues": {W3: [5.0, ["q"]]}}})
        d = core.decide(Observation(now=10, listening_since=0))
        assert d.verdicts == []  # a glob worker of an earlier run is not resurrected from memory


# ---------------------------------------------------------------- finding 6: bounded re-checks
class TestBoundedRechecks:
    def test_workers_that_stay_down_are_rechecked_about_once_per_heartbeat_timeout(self):
        hosts = [f"celery@web-{i}" for i in range(1, 13)]
        cfg = make_config([group_cfg("web", hostnames=["celery@web-*"], restart=None)])  # alert only
        f = Fleet(cfg)
        f.up(*hosts, at=0)
        f.run(0, 30)
        f.down(*hosts[2:])  # 10 of 12 stay down
        ds = f.run(35, 335)
        assert all(status(ds[-1], h) == "lost" for h in hosts[2:])
        for h in hosts[2:]:
            # 60 ticks: one first confirmation, then one re-check per heartbeat_timeout (10 s)
            assert pings_of(f, h, len(ds)) <= 300 / 10 + 2, pings_of(f, h, len(ds))
        assert all(pings_of(f, h) == 0 for h in hosts[:2])  # the healthy ones are never pinged
        # the old loop pinged every down worker on every tick
        assert sum(len(p) for p in f.pinged[-len(ds):]) <= 10 * (300 / 10 + 2)

    def test_a_worker_that_comes_back_is_seen_at_the_next_recheck(self):
        cfg = make_config([group_cfg("web", workers=[W1], restart=None)])
        f = Fleet(cfg)
        f.quiet(W1)
        f.run(0, 60)
        f.down(W1)
        f.run(65, 200)
        f.quiet(W1)  # back, without heartbeats: only a ping can tell
        ds = f.run(205, 230)
        back = next(d.now for d in ds if status(d, W1) == "alive")
        assert back <= 205 + 10 + 5
        assert resolved(ds) == [f"worker_lost:{W1}"]

    def test_a_request_in_flight_is_not_repeated_on_every_tick(self):
        # the shell pings in the background: results of a ping asked now land in a later tick
        cfg = make_config([group_cfg("web", workers=[W1])])
        core = Core(cfg)
        seen = {W1: WorkerSeen(W1, last_heartbeat=0.0)}
        asked = [t for t in range(20, 25) if core.suspects(Observation(now=t, listening_since=0, workers=seen))]
        assert asked == [20]  # asked once; asked again only heartbeat_timeout / 2 later if nothing came

    def test_a_stale_death_report_of_a_worker_that_answers_is_not_pinged_on_every_tick(self):
        # a pid file left behind (the platform did not witness the death) while the worker answers:
        # its pong, stamped when the ping went out (after it was asked), must not ask for another
        cfg = make_config([group_cfg("web", workers=[W1])])
        core = Core(cfg)
        stale = {"web": (Target("w1", "web", W1, "exited", since=None),)}

        def due(now, pong):
            return core.suspects(Observation(now=now, listening_since=0, targets=stale, pong_at={W1: pong}))

        assert due(100, 99.5) == [W1]  # asked at 100 ...
        asked = [t for t in range(101, 110) if due(t, 100.2)]  # ... answered; replies stamped 100.2
        assert asked == [105]  # again after heartbeat_timeout / 2, not on every tick
        d = core.decide(Observation(now=105.5, listening_since=0, targets=stale, pong_at={W1: 105.1}))
        assert d.verdicts[0].status == "alive" and d.plans == []
