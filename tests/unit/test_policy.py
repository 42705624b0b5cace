"""policy.py: verdicts -> restart plans (budget, backoff, canary, broker-down inhibition)."""

from __future__ import annotations

import pytest

from supervisor import policy
from supervisor.model import Observation, WorkerVerdict
from tests.unit.recorded import group_cfg, make_config, restart_cfg


def cfg_with(n_restart=None, **g):
    r = restart_cfg(**(n_restart or {}))
    return make_config([group_cfg("web", restart=r, **g)])


def V(i, status, silent=None, group="web"):
    return WorkerVerdict(f"celery@web-{i}", group, status, f"because {status}", silent_for=silent)


def plan(cfg, verdicts, state=None, now=100.0, **obs):
    state = state if state is not None else policy.PolicyState()
    o = Observation(now=now, listening_since=0.0, **obs)
    plans, findings = policy.plan(cfg, o, verdicts, state, {})
    return plans, findings, state


class TestBudget:
    def test_doubling_backoff_capped_at_window(self):
        cfg = cfg_with({"max_restarts": 10, "backoff": "10s", "window": "60s"})
        g = cfg.groups[0]
        st = policy.PolicyState()
        assert policy.budget(st, g, "t", 0) == policy.Budget(0, 10, None)
        waits = []
        for n in range(1, 6):
            st.history["t"] = [float(i) for i in range(n)]  # n restarts at 0,1,..: all inside the window
            b = policy.budget(st, g, "t", n)
            waits.append(b.next_at - (n - 1))
        assert waits == [10, 20, 40, 60, 60]  # backoff, 2x, 4x, capped at the window

    def test_restarts_outside_the_window_do_not_count(self):
        cfg = cfg_with({"max_restarts": 2, "backoff": "10s", "window": "100s"})
        st = policy.PolicyState(history={"t": [0.0, 50.0]})
        assert policy.budget(st, cfg.groups[0], "t", 99).spent
        b = policy.budget(st, cfg.groups[0], "t", 100)
        assert (b.used, b.left, b.spent) == (1, 1, False)

    def test_record_counts_failed_attempts_too(self):
        st = policy.PolicyState()
        p = policy.RestartPlan("web", "celery@web-1", "web-1.service", "worker_lost", "r", 2)
        policy.record(st, p, 10, ok=False)
        assert st.history == {"web-1.service": [10]}
        assert st.restarted == {}  # no grace for a failed restart
        policy.record(st, p, 20, ok=True)
        assert st.history == {"web-1.service": [10, 20]}
        assert st.restarted == {"celery@web-1": (20, "worker_lost")}


class TestPlan:
    def test_lost_and_dead_are_restarted_with_budget_left(self):
        cfg = cfg_with()
        plans, findings, _ = plan(cfg, [V(1, "lost"), V(2, "dead"), V(3, "alive"), V(4, "alive"), V(5, "alive")])
        assert [(p.hostname, p.rule, p.budget_left, p.canary) for p in plans] == [
            ("celery@web-1", "worker_lost", 2, False), ("celery@web-2", "worker_lost", 2, False)]
        assert findings == []

    @pytest.mark.parametrize("status", ["alive", "busy", "starting", "stopping", "retired", "unknown"])
    def test_never_restarted(self, status):
        plans, _, _ = plan(cfg_with(), [V(1, status, silent=10_000)])
        assert plans == []

    def test_unresponsive_only_after_hung_timeout(self):
        cfg = cfg_with()  # hung_timeout 10m
        plans, _, st = plan(cfg, [V(1, "unresponsive", silent=599)])
        assert plans == [] and "hung_timeout" in st.notes["celery@web-1"]
        plans, _, _ = plan(cfg, [V(1, "unresponsive", silent=600)])
        assert [(p.hostname, p.rule) for p in plans] == [("celery@web-1", "worker_unresponsive")]

    def test_busy_workers_are_no_mass_loss_and_say_why_they_wait(self):
        # two of three busy (solo pools in long tasks, or once without a measured silence): no canary
        cfg = cfg_with()
        plans, findings, st = plan(cfg, [V(1, "busy", silent=40), V(2, "busy"), V(3, "alive")])
        assert plans == [] and findings == []
        assert st.groups["web"].mode == "normal"
        assert "hung_timeout" in st.notes["celery@web-1"] and "hung_timeout" in st.notes["celery@web-2"]

    def test_broker_down_restarts_nothing(self):
        plans, findings, _ = plan(cfg_with(), [V(1, "dead"), V(2, "lost")], broker_ok=False)
        assert plans == [] and findings == []

    def test_platform_error_restarts_nothing_in_that_group(self):
        plans, _, st = plan(cfg_with(), [V(1, "dead")], platform_errors={"web": "403 Forbidden"})
        # planned from the broker's view (dry-run shows it), blocked: the shell never executes it
        assert [(p.hostname, p.blocked) for p in plans] == [("celery@web-1", "platform local unreachable: 403 Forbidden")]
        assert "403 Forbidden" in st.notes["celery@web-1"]

    def test_max_restarts_zero_disables_restarts_without_giving_up(self):
        plans, findings, _ = plan(cfg_with({"max_restarts": 0}), [V(1, "dead")])
        assert plans == [] and findings == []

    def test_group_without_restart_section_only_watches(self):
        cfg = make_config([group_cfg("web", restart=None)])
        plans, findings, _ = plan(cfg, [V(1, "dead"), V(2, "dead"), V(3, "dead")])
        assert plans == [] and findings == []

    def test_backoff_then_gave_up(self):
        cfg = cfg_with({"max_restarts": 2, "backoff": "30s"})
        st = policy.PolicyState(history={"celery@web-1": [90.0]})
        plans, findings, _ = plan(cfg, [V(1, "lost")], st, now=100)
        assert plans == [] and findings == [] and "backing off" in st.notes["celery@web-1"]
        plans, _, _ = plan(cfg, [V(1, "lost")], st, now=120)
        assert [p.budget_left for p in plans] == [0]
        st.history["celery@web-1"].append(120.0)
        plans, findings, _ = plan(cfg, [V(1, "lost")], st, now=1000)
        assert plans == []
        assert [(f.rule, f.subject, f.severity) for f in findings] == [
            ("restart_gave_up", "celery@web-1", "critical")]
        assert "until the window clears" in findings[0].summary


class TestMassLoss:
    def test_more_than_half_restarts_one_canary(self):
        cfg = cfg_with()
        plans, findings, st = plan(cfg, [V(1, "lost"), V(2, "dead"), V(3, "alive")])
        assert [(p.hostname, p.canary) for p in plans] == [("celery@web-1", True)]
        assert [f.rule for f in findings] == ["group_mass_loss"]
        assert st.groups["web"].mode == "canary" and st.groups["web"].canary == "celery@web-1"
        assert "waiting for canary" in st.notes["celery@web-2"]

    @pytest.mark.parametrize("verdicts", [
        [V(1, "lost")],  # a group of 1
        [V(1, "lost"), V(2, "alive")],  # 1 of 2 is not more than half
        [V(1, "lost"), V(2, "lost"), V(3, "alive"), V(4, "alive")],  # 2 of 4 is not more than half
        [V(1, "lost"), V(2, "retired"), V(3, "retired")],  # retired ones do not count: still one worker
    ])
    def test_not_a_mass_loss(self, verdicts):
        plans, findings, st = plan(cfg_with(), verdicts)
        assert all(not p.canary for p in plans)
        assert len(plans) == sum(v.status == "lost" for v in verdicts)
        assert findings == [] and st.groups["web"].mode == "normal"

    def test_canary_back_releases_the_others(self):
        cfg = cfg_with()
        _, _, st = plan(cfg, [V(1, "lost"), V(2, "lost"), V(3, "lost")], now=100)
        policy.record(st, policy.RestartPlan("web", "celery@web-1", "celery@web-1", "worker_lost", "r", 2, True),
                      100, ok=True)
        plans, _, _ = plan(cfg, [V(1, "starting"), V(2, "lost"), V(3, "lost")], st, now=120)
        assert plans == []
        plans, findings, _ = plan(cfg, [V(1, "alive"), V(2, "lost"), V(3, "lost")], st, now=140)
        assert [(p.hostname, p.canary) for p in plans] == [("celery@web-2", False), ("celery@web-3", False)]
        assert st.groups["web"].mode == "released"
        assert [f.rule for f in findings] == ["group_mass_loss"]
        plans, findings, _ = plan(cfg, [V(1, "alive"), V(2, "alive"), V(3, "alive")], st, now=200)
        assert plans == [] and findings == [] and st.groups["web"].mode == "normal"

    def test_canary_not_back_is_systemic(self):
        cfg = cfg_with()
        _, _, st = plan(cfg, [V(1, "lost"), V(2, "lost")], now=100)
        policy.record(st, policy.RestartPlan("web", "celery@web-1", "celery@web-1", "worker_lost", "r", 2, True),
                      100, ok=True)
        plans, findings, _ = plan(cfg, [V(1, "lost"), V(2, "lost")], st, now=200)
        assert plans == []
        assert sorted(f.rule for f in findings) == ["group_mass_loss", "group_systemic"]
        assert "systemic" in st.notes["celery@web-2"]

    def test_unjudgeable_group_keeps_its_mode(self):
        # after a broker outage every worker is "unknown" for the settle period: that is not "whole again"
        cfg = cfg_with()
        st = policy.PolicyState()
        st.groups["web"] = policy.GroupMode("systemic", "celery@web-1", 100, 3, 3)
        plans, findings, _ = plan(cfg, [V(1, "unknown"), V(2, "unknown"), V(3, "unknown")], st, now=300)
        assert st.groups["web"].mode == "systemic"
        assert sorted(f.rule for f in findings) == ["group_mass_loss", "group_systemic"]

    def test_unjudgeable_canary_is_waited_for(self):
        cfg = cfg_with()
        st = policy.PolicyState()
        st.groups["web"] = policy.GroupMode("canary", "celery@web-1", 100, 3, 3)
        plans, _, _ = plan(cfg, [V(1, "unknown"), V(2, "lost"), V(3, "lost")], st, now=300)
        assert plans == []
        assert st.groups["web"].mode == "canary"

    def test_canary_restart_that_failed_is_systemic(self):
        cfg = cfg_with()
        _, _, st = plan(cfg, [V(1, "lost"), V(2, "lost")], now=100)
        policy.record(st, policy.RestartPlan("web", "celery@web-1", "celery@web-1", "worker_lost", "r", 2, True),
                      100, ok=False)
        assert st.groups["web"].mode == "systemic"
