"""The decision core as one sans-I/O object: feed it an Observation, get a Decision.

``Core`` composes the pure rules and policy and keeps their memory (rule states,
restart history, group modes, broker outages). It never does I/O and never reads a
clock: the shell (``loop.py``) observes, calls ``decide``, executes the plans and
reports back with ``record_restart``. Unit tests replay observations through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from supervisor import policy, rules
from supervisor.config import Config
from supervisor.model import Finding, Observation, RuleState, Transition, WorkerQueues, WorkerVerdict
from supervisor.stall import StallMemory, StallReport

WORKER_RULES = ("worker_lost", "worker_unresponsive", "worker_stalled", "restart_gave_up")
SETTLE_MIN, SETTLE_MAX = 10.0, 60.0
MEMORY_TTL = 3600.0  # what a worker said (pong, queues) is forgotten after this long without news


@dataclass
class Decision:
    now: float
    observable: bool  # the broker could be observed
    verdicts: list[WorkerVerdict]
    findings: list[Finding]
    transitions: list[Transition]
    plans: list[policy.RestartPlan]
    severity: str  # worst severity that holds now: ok | warning | critical
    states: dict[str, RuleState] = field(default_factory=dict)  # rule states after this tick, by key
    # the observation as judged: with the core's memory of pongs and queues merged in, and the
    # consumers of each queue counted from what the workers last said
    obs: Observation | None = None
    # stall evidence (supervisor/stall.py): per worker and queue, and the inquiries to make next
    stall: StallReport = field(default_factory=StallReport)

    @property
    def exit_code(self) -> int:
        """Nagios semantics: 0 ok, 1 warning, 2 critical, 3 could not observe (the broker, or the
        heartbeat stream without which no worker can be judged)."""
        if not self.observable:
            return 3
        return {"ok": 0, "info": 0, "warning": 1, "critical": 2}[self.severity]


class Core:
    def __init__(self, cfg: Config, state: policy.PolicyState | None = None, book: rules.RuleBook | None = None):
        self.cfg = cfg
        self.policy = state or policy.PolicyState()
        self.book = book or rules.RuleBook()
        self.outage_since: float | None = None  # broker or heartbeat stream lost since
        self.listening_since: float | None = None  # the stream's connection the last tick saw
        self.settle_until: float | None = None
        self.silenced: set[str] = set()  # finding keys an active silence covered in the last decide
        # evidence of life from remote control, on our clock (this run): the last pong, the last ping
        # that got no reply, the last active_queues reply, the last completed census
        self.pong_at: dict[str, float] = {}
        self.noreply_at: dict[str, float] = {}
        self.worker_queues: dict[str, WorkerQueues] = {}
        self.census_at: float | None = None
        # the same from an earlier run (state file): refines what is known of a worker, never makes
        # a hostname part of a group by itself (only this run's heartbeats and replies do)
        self.past_pong: dict[str, float] = {}
        self.past_queues: dict[str, WorkerQueues] = {}
        self.asked: dict[str, float] = {}  # hostname -> when a ping of it was last asked of the shell
        self.stall = StallMemory()  # processed / backlog history, stall confirmations (this run)

    # ---- durable memory (supervisor.state): what must survive a restart of the supervisor
    def to_json(self) -> dict:
        from dataclasses import asdict

        pong = {**self.past_pong}
        for h, t in self.pong_at.items():
            pong[h] = max(t, pong.get(h, t))
        queues = {**self.past_queues}
        for h, wq in self.worker_queues.items():
            if h not in queues or wq.at >= queues[h].at:
                queues[h] = wq
        return {
            "book": self.book.to_json(),
            "restarted": {h: list(v) for h, v in self.policy.restarted.items()},
            "groups": {n: asdict(m) for n, m in self.policy.groups.items()},
            "evidence": {"pong": pong, "queues": {h: [wq.at, sorted(wq.names)] for h, wq in queues.items()}},
            # open stalls: a supervisor restart must not RESOLVE a stall before its worker takes work
            "stalls": {h: list(v) for h, v in self.stall.open.items()},
        }

    def restore(self, d: dict) -> None:
        """Take back the memory of an earlier run (restart history comes from the state's table)."""
        if "book" in d:
            self.book = rules.RuleBook.from_json(d["book"])
        self.policy.restarted = {h: (float(v[0]), str(v[1])) for h, v in d.get("restarted", {}).items()}
        self.policy.groups = {n: policy.GroupMode(**m) for n, m in d.get("groups", {}).items()}
        ev = d.get("evidence") or {}
        self.past_pong = {str(h): float(t) for h, t in (ev.get("pong") or {}).items()}
        self.past_queues = {str(h): WorkerQueues(float(v[0]), frozenset(map(str, v[1])))
                            for h, v in (ev.get("queues") or {}).items()}
        self.stall.open = {str(h): (float(v[0]), str(v[1]), str(v[2])) for h, v in (d.get("stalls") or {}).items()}

    # ---- evidence of life from remote control: kept across ticks (and runs)
    def remember(self, obs: Observation) -> Observation:
        """Take in what the shell learned (replies with their own time) and return the observation
        with everything the core knows merged in: a pong from three ticks ago is still evidence."""
        now = obs.now
        for h, t in obs.pong_at.items():
            self.pong_at[h] = max(t, self.pong_at.get(h, t))
        for h in obs.pongs:
            self.pong_at[h] = max(now, self.pong_at.get(h, now))
        for h, t in obs.noreply_at.items():
            self.noreply_at[h] = max(t, self.noreply_at.get(h, t))
        for h in obs.pinged - obs.pongs:
            self.noreply_at[h] = max(now, self.noreply_at.get(h, now))
        for h, wq in obs.worker_queues.items():
            old = self.worker_queues.get(h)
            if old is None or wq.at >= old.at:
                self.worker_queues[h] = wq
        if obs.census_at is not None:
            self.census_at = max(obs.census_at, self.census_at or obs.census_at)
        self._forget(now)
        known = set(obs.workers) | set(self.pong_at) | set(self.noreply_at) | set(self.worker_queues)
        known |= {h for g in self.cfg.groups for h in g.workers}
        known |= {t.hostname for ts in obs.targets.values() for t in ts if t.hostname}
        pong = {h: self.past_pong[h] for h in known if h in self.past_pong}
        for h, t in self.pong_at.items():
            pong[h] = max(t, pong.get(h, t))
        queues = {h: self.past_queues[h] for h in known if h in self.past_queues}
        for h, wq in self.worker_queues.items():
            if h not in queues or wq.at >= queues[h].at:
                queues[h] = wq
        return replace(obs, pong_at=pong, noreply_at=dict(self.noreply_at), worker_queues=queues,
                       census_at=self.census_at)

    def _forget(self, now: float) -> None:
        explicit = {h for g in self.cfg.groups for h in g.workers}
        last: dict[str, float] = {}
        for d in (self.pong_at, self.noreply_at, self.asked):
            for h, t in d.items():
                last[h] = max(t, last.get(h, t))
        for h, wq in self.worker_queues.items():
            last[h] = max(wq.at, last.get(h, wq.at))
        for h in [h for h, t in last.items() if now - t > MEMORY_TTL and h not in explicit]:
            for d in (self.pong_at, self.noreply_at, self.asked, self.worker_queues):
                d.pop(h, None)
        for h in [h for h, t in self.past_pong.items() if now - t > MEMORY_TTL]:
            del self.past_pong[h]
        for h in [h for h, wq in self.past_queues.items() if now - wq.at > MEMORY_TTL]:
            del self.past_queues[h]

    # ---- broker outages: after one, give workers time to reconnect before judging their silence
    def _track_outage(self, obs: Observation) -> None:
        connected = obs.broker_ok and obs.listening_since is not None
        if not connected:
            if self.outage_since is None:
                self.outage_since = obs.now
            return
        if self.outage_since is not None:
            outage = max(obs.listening_since - self.outage_since, 0.0)
            self.settle_until = obs.listening_since + min(max(2 * outage, SETTLE_MIN), SETTLE_MAX)
            self.outage_since = None
        elif self.listening_since is not None and obs.listening_since != self.listening_since:
            # the stream reconnected between two ticks (a blip no tick saw): workers reconnect too
            self.settle_until = max(self.settle_until or 0.0, obs.listening_since + SETTLE_MIN)
        self.listening_since = obs.listening_since

    def suspects(self, obs: Observation) -> list[str]:
        """Hostnames to ping now: silent workers to confirm, workers that stay down to re-check at a
        bounded rate (about once per heartbeat_timeout), busy ones reaching hung_timeout, and workers
        without heartbeats whose last pong is getting old. The shell pings them (off the tick's
        path) and reports the replies, each with its own time, in a later observation."""
        self._track_outage(obs)
        obs = self.remember(obs)
        due = []
        for need in rules.ping_needs(self.cfg, obs, self.policy.restarted, self.settle_until):
            asked = self.asked.get(need.hostname)
            if asked is None or asked < need.after or obs.now - asked >= need.every:
                due.append(need.hostname)
                self.asked[need.hostname] = obs.now
        return due

    def decide(self, obs: Observation, target_ids: dict[str, str] | None = None,
               silenced: Callable[[Finding], bool] | None = None) -> Decision:
        """``silenced(finding)``: true for findings an active silence covers (not announced now;
        announced when the silence ends if they still fire)."""
        self._track_outage(obs)
        obs = self.remember(obs)
        cfg, now = self.cfg, obs.now
        restarted = self.policy.restarted
        verdicts = rules.judge(cfg, obs, restarted, self.settle_until)
        obs = replace(obs, queues=rules.count_consumers(cfg, obs, verdicts))
        ids = dict(target_ids or {})
        for v in verdicts:
            if v.target is not None:
                ids.setdefault(v.hostname, v.target.id)
        stall = self.stall.judge(cfg, obs, verdicts, restarted)
        plans, policy_findings = policy.plan(cfg, obs, verdicts, self.policy, ids, stall.stalled)
        findings = (
            rules.broker_findings(cfg, obs)
            + rules.worker_findings(cfg, obs, verdicts, restarted)
            + rules.queue_findings(cfg, obs)
            + stall.findings
            + policy_findings
        )
        # forget a restart once its worker is heard again after it (or its grace is over)
        for v in verdicts:
            if v.status == "alive" and v.hostname in restarted:
                at, _ = restarted[v.hostname]
                last = rules.last_evidence(obs, v.hostname)
                back = last is not None and last > at
                g = cfg.group(v.group)
                if back or g.restart is None or now - at >= g.restart.grace:
                    del restarted[v.hostname]
        muted = self._muted(findings, verdicts)
        if silenced is not None:
            self.silenced = {f.key for f in findings if silenced(f)}
            muted |= self.silenced
        transitions = self.book.advance(findings, now, muted, self._frozen(obs, verdicts))
        observable = obs.broker_ok and obs.listening_since is not None
        return Decision(now, observable, verdicts, findings, transitions, plans, rules.worst(findings),
                        dict(self.book.states), obs, stall)

    def _muted(self, findings: list[Finding], verdicts: list[WorkerVerdict]) -> set[str]:
        """Inhibition: a group in mass loss speaks with one voice (its group finding); a group below
        min_workers only because of workers that already have their own alert (lost, dead,
        unresponsive, being restarted) says nothing more -- it speaks when the count cannot be
        explained that way (workers retired, never seen)."""
        mass = {f.group for f in findings if f.rule == "group_mass_loss"}
        muted = {f.key for f in findings if f.group in mass and f.rule in WORKER_RULES + ("group_below_min",)}
        for f in findings:
            if f.rule != "group_below_min":
                continue
            g = self.cfg.group(f.group)
            vs = [v for v in verdicts if v.group == f.group]
            alive = sum(v.alive for v in vs)
            spoken = sum(v.status in ("lost", "dead", "unresponsive", "starting") for v in vs)
            if g is not None and alive + spoken >= g.min_workers:
                muted.add(f.key)
        return muted

    def _frozen(self, obs: Observation, verdicts: list[WorkerVerdict]):
        unknown_hosts = {v.hostname for v in verdicts if v.status == "unknown"}
        judged = {v.hostname for v in verdicts}
        unknown_groups = {v.group for v in verdicts if v.status == "unknown"}

        unreadable = {q.name for q in self.cfg.queues if obs.queues.get(q.name) is None
                      or obs.queues[q.name].length is None}
        uncounted = {q.name for q in self.cfg.queues if obs.queues.get(q.name) is None
                     or obs.queues[q.name].consumers is None}
        uncountable = {g.name for g in self.cfg.groups
                       if not rules.can_count(g, obs, [v for v in verdicts if v.group == g.name])}

        def frozen(st: RuleState) -> bool:
            if not obs.broker_ok:
                return st.rule not in ("broker_unreachable", "platform_error")
            if st.rule == "queue_backlog":
                return st.subject in unreadable
            if st.rule == "queue_consumers":
                return st.subject in unreadable or st.subject in uncounted
            if st.rule in WORKER_RULES:
                # not judged this tick (e.g. a glob-matched worker that died before this supervisor
                # restarted: never heard since): still lost, not resolved
                return st.hostname in unknown_hosts or (
                    st.hostname not in judged and self.cfg.group_of(st.hostname or "") is not None)
            if st.rule == "group_below_min":
                return st.group in unknown_groups or st.group in uncountable
            return False

        return frozen

    def record_restart(self, plan: policy.RestartPlan, at: float, ok: bool) -> None:
        policy.record(self.policy, plan, at, ok)

    def not_executed(self, plan: policy.RestartPlan) -> None:
        """The shell did not execute a plan (standby, platform error): a canary that was never
        restarted must not turn its group systemic; the next tick chooses again."""
        mode = self.policy.groups.get(plan.group)
        if plan.canary and mode is not None and mode.mode == "canary" and mode.canary == plan.hostname:
            mode.canary = None

    def remembered_hostnames(self, group: str) -> set[str]:
        """Hostnames of the group this core still holds alerts or a restart for (to be looked up on
        the platform even when not heard since a restart of the supervisor)."""
        out = {st.hostname for st in self.book.states.values()
               if st.group == group and st.rule in WORKER_RULES and st.hostname}
        out |= {h for h in self.policy.restarted if (g := self.cfg.group_of(h)) is not None and g.name == group}
        # workers known only from their replies (no heartbeat): looked up on the platform too
        out |= {h for h in (*self.pong_at, *self.noreply_at, *self.worker_queues)
                if (g := self.cfg.group_of(h)) is not None and g.name == group}
        return out

    def budget(self, group_name: str, target_id: str, now: float) -> policy.Budget | None:
        g = self.cfg.group(group_name)
        if g is None or g.restart is None:
            return None
        return policy.budget(self.policy, g, target_id, now)
