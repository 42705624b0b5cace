"""Pure rules: (config, observation, what we restarted, now) -> verdicts and findings.

No I/O and no clock of its own: ``obs.now`` is the only time. Every decision here
can be replayed in a unit test from a recorded Observation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from supervisor.config import Config, GroupConfig
from supervisor.durations import format_duration as fd
from supervisor.model import (
    DEAD_STATES,
    SEVERITY_RANK,
    Finding,
    Observation,
    RuleState,
    Target,
    Transition,
    WorkerSeen,
    WorkerVerdict,
)

TRANSIENT_HOLD = 10.0

# hostname -> (when we restarted it, the rule that made us do it)
Restarts = Mapping[str, tuple[float, str]]


def group_hostnames(cfg: Config, group: GroupConfig, obs: Observation) -> list[str]:
    """The group's explicit workers plus every hostname seen whose first matching group is this one."""
    names = dict.fromkeys(h for h in group.workers if cfg.group_of(h) is group)
    for h in obs.workers:
        if h not in names and cfg.group_of(h) is group:
            names[h] = None
    for t in obs.targets.get(group.name, ()):
        if t.hostname and t.hostname not in names and cfg.group_of(t.hostname) is group:
            names[t.hostname] = None
    return sorted(names)


def target_of(obs: Observation, group: str, hostname: str) -> Target | None:
    for t in obs.targets.get(group, ()):
        if t.hostname == hostname:
            return t
    return None


def _platform_contradicted(t: Target, ws: WorkerSeen | None, group: GroupConfig, now: float) -> bool:
    """The platform says the target died, but the worker heartbeated recently and after the death
    the platform saw (or the platform did not witness when it died): a ping decides."""
    last = ws.last_heartbeat if ws else None
    if last is None or ws.offline_at is not None or now - last > group.heartbeat_timeout:
        return False
    return t.since is None or last > t.since


def _silence(ws: WorkerSeen | None, obs: Observation) -> float | None:
    """Seconds we have gone without hearing from the worker while able to hear it."""
    refs = [t for t in ((ws.last_heartbeat if ws else None), obs.listening_since) if t is not None]
    return obs.now - max(refs) if refs else None


def is_suspect(cfg: Config, group: GroupConfig, hostname: str, obs: Observation, restarts: Restarts) -> bool:
    """Silent for longer than heartbeat_timeout (not reported dead by its platform, not within the
    grace of a restart): the loop pings these before judging."""
    if not obs.broker_ok or obs.listening_since is None:
        return False
    at = restarts.get(hostname, (None, ""))[0]
    if at is not None and group.restart is not None and obs.now - at < group.restart.grace:
        return False
    t = target_of(obs, group.name, hostname)
    ws = obs.workers.get(hostname)
    if t is not None and t.state in DEAD_STATES:
        return _platform_contradicted(t, ws, group, obs.now)  # only then is a ping needed
    if ws is not None and ws.offline_at is not None and hostname not in group.workers:
        return False
    if obs.one_shot:
        return ws is None or ws.last_heartbeat is None or obs.now - ws.last_heartbeat > group.heartbeat_timeout
    s = _silence(ws, obs)
    return s is not None and s > group.heartbeat_timeout


def suspects(cfg: Config, obs: Observation, restarts: Restarts, settle_until: float | None = None) -> list[str]:
    if settle_until is not None and obs.now < settle_until:
        return []
    out = []
    for g in cfg.groups:
        out += [h for h in group_hostnames(cfg, g, obs) if is_suspect(cfg, g, h, obs, restarts)]
    return out


def judge_worker(
    cfg: Config, group: GroupConfig, hostname: str, obs: Observation, restarts: Restarts,
    settle_until: float | None = None,
) -> WorkerVerdict:
    now = obs.now
    explicit = hostname in group.workers
    ws = obs.workers.get(hostname)
    tgt = target_of(obs, group.name, hostname)
    silent = _silence(ws, obs)
    v = WorkerVerdict(hostname, group.name, "unknown", "", explicit, silent, tgt)

    if not obs.broker_ok:
        return replace(v, reason="broker unreachable: cannot judge")
    last = ws.last_heartbeat if ws else None
    offline = ws is not None and ws.offline_at is not None
    fresh = last is not None and not offline and now - last <= group.heartbeat_timeout
    restarted_at, _ = restarts.get(hostname, (None, ""))
    grace = group.restart.grace if group.restart else 0.0
    in_grace = restarted_at is not None and now - restarted_at < grace
    back_since_restart = restarted_at is not None and last is not None and last > restarted_at and not offline

    if hostname in obs.pongs:
        return replace(v, status="alive", reason="answered ping")
    contradicted = tgt is not None and tgt.state in DEAD_STATES and _platform_contradicted(tgt, ws, group, now)
    if contradicted and hostname not in obs.pinged:  # once pinged without a pong, the platform's word stands
        return replace(v, reason=f"{tgt.id} {tgt.state} but heartbeat {fd(now - last)} ago: confirming by ping")
    if tgt is not None and tgt.state in DEAD_STATES:
        exited_before_restart = restarted_at is not None and (tgt.since is None or tgt.since <= restarted_at)
        if in_grace and exited_before_restart:
            return replace(v, status="starting", reason=f"restarted {fd(now - restarted_at)} ago")
        if offline and not explicit:
            return replace(v, status="retired", reason=f"left gracefully; its target {tgt.state}")
        what = f" ({tgt.detail})" if tgt.detail else ""
        return replace(v, status="dead", reason=f"{group.restart.platform if group.restart else 'platform'} "
                       f"reports {tgt.id} {tgt.state}{what}")
    if fresh and (not in_grace or back_since_restart):
        return replace(v, status="alive", reason=f"heartbeat {fd(now - last)} ago")
    if in_grace:
        if back_since_restart:
            return replace(v, status="alive", reason="back after restart")
        return replace(v, status="starting", reason=f"restarted {fd(now - restarted_at)} ago, waiting for it")
    if tgt is not None and tgt.state == "missing" and not explicit:
        return replace(v, status="retired", reason=f"its target {tgt.id} no longer exists on the platform")
    if offline:
        if tgt is not None and tgt.state in ("running", "stopping"):
            return replace(v, status="stopping", reason="sent worker-offline; process still stopping (warm shutdown)")
        if not explicit:
            return replace(v, status="retired", reason="left gracefully (worker-offline)")
        # an explicit worker that left must come back: judged like a silent one below
    if obs.listening_since is None:
        return replace(v, reason="heartbeat stream not connected")
    if settle_until is not None and now < settle_until and not fresh:
        # after a broker outage workers reconnect with their own backoff: silence proves nothing yet
        return replace(v, reason=f"broker came back; waiting {fd(settle_until - now)} for workers to reconnect")
    if tgt is not None and tgt.state in ("restarting",):
        return replace(v, status="starting", reason=f"platform is restarting {tgt.id}")
    if obs.one_shot:
        silent_enough = last is None or offline or now - last > group.heartbeat_timeout
    else:
        silent_enough = silent is not None and silent > group.heartbeat_timeout
    if not silent_enough:
        if last is None:
            return replace(v, reason=f"not heard yet (listening for {fd(silent)})")
        if now - last > group.heartbeat_timeout:
            return replace(v, reason=f"last heartbeat {fd(now - last)} ago; listening for only {fd(silent)}")
        return replace(v, status="alive", reason=f"heartbeat {fd(now - last)} ago")
    if hostname not in obs.pinged:
        return replace(v, reason="silent, not yet confirmed by ping")
    heard = "never heard" if last is None else f"no heartbeat for {fd(now - last)}"
    if offline:
        heard = "left (worker-offline)"
    if tgt is not None and tgt.state in ("running", "stopping"):
        return replace(v, status="unresponsive", reason=f"{heard}, no reply to ping, but {tgt.id} is {tgt.state}")
    where = f", {tgt.id} {tgt.state}" if tgt is not None and tgt.state != "unknown" else ""
    return replace(v, status="lost", reason=f"{heard}, no reply to ping{where}")


def judge(cfg: Config, obs: Observation, restarts: Restarts, settle_until: float | None = None) -> list[WorkerVerdict]:
    out = []
    for g in cfg.groups:
        out += [judge_worker(cfg, g, h, obs, restarts, settle_until) for h in group_hostnames(cfg, g, obs)]
    return out


# ---------------------------------------------------------------- findings
def worker_findings(cfg: Config, obs: Observation, verdicts: list[WorkerVerdict], restarts: Restarts) -> list[Finding]:
    out: list[Finding] = []
    if not obs.broker_ok:
        return out
    for v in verdicts:
        if v.status in ("lost", "dead"):
            out.append(Finding("worker_lost", v.hostname, "critical", f"{v.hostname}: {v.reason}", v.group, v.hostname))
        elif v.status == "unresponsive":
            out.append(Finding("worker_unresponsive", v.hostname, "warning", f"{v.hostname}: {v.reason}",
                               v.group, v.hostname, value=v.silent_for))
        elif v.status == "starting":
            # keep the finding that made us restart it open until the worker is back
            rule = restarts.get(v.hostname, (0.0, "worker_lost"))[1]
            sev = "warning" if rule == "worker_unresponsive" else "critical"
            out.append(Finding(rule, v.hostname, sev, f"{v.hostname}: {v.reason}", v.group, v.hostname))
    for g in cfg.groups:
        if g.min_workers <= 0:
            continue
        vs = [v for v in verdicts if v.group == g.name]
        if not can_count(g, obs, vs):
            continue
        alive = sum(v.status == "alive" for v in vs)
        if alive < g.min_workers:
            out.append(Finding("group_below_min", g.name, "critical",
                               f"group {g.name}: {alive} worker(s) alive, needs at least {g.min_workers}",
                               g.name, value=alive))
    return out


def can_count(g: GroupConfig, obs: Observation, verdicts: list[WorkerVerdict]) -> bool:
    """Whether the group's alive workers can be counted now: none is undecided and, for a group with
    globs, the stream has listened long enough to have heard them all (a `once` window suffices)."""
    if obs.listening_since is None or any(v.status == "unknown" for v in verdicts):
        return False
    # explicit workers are all judged (none unknown); a glob's may simply not have been heard yet
    return obs.one_shot or not g.hostnames or obs.now - obs.listening_since >= g.heartbeat_timeout


def queue_findings(cfg: Config, obs: Observation) -> list[Finding]:
    out: list[Finding] = []
    if not obs.broker_ok:
        return out
    for q in cfg.queues:
        seen = obs.queues.get(q.name)
        if seen is None:
            continue
        if seen.error and seen.length is None:
            out.append(Finding("queue_unreadable", q.name, "warning", f"queue {q.name}: {seen.error}",
                               hold=transient_hold(cfg)))
            continue
        n = seen.length or 0
        sev = None
        if q.critical is not None and n >= q.critical:
            sev, limit = "critical", q.critical
        elif q.warning is not None and n >= q.warning:
            sev, limit = "warning", q.warning
        if sev:
            out.append(Finding("queue_backlog", q.name, sev, f"queue {q.name}: {n} messages waiting (>= {limit})",
                               hold=q.for_, value=n))
        if q.min_consumers and seen.consumers is not None and seen.consumers < q.min_consumers:
            out.append(Finding("queue_consumers", q.name, "critical",
                               f"queue {q.name}: {seen.consumers} consumer(s), needs at least {q.min_consumers}",
                               hold=q.for_, value=seen.consumers))
    return out


def transient_hold(cfg: Config) -> float:
    """How long an observation failure must last before it pages: one failed tick is not an outage
    (the exit code of `once`/`nagios` reports it at once all the same)."""
    return max(TRANSIENT_HOLD, 2 * cfg.loop.interval)


def broker_findings(cfg: Config, obs: Observation) -> list[Finding]:
    out = []
    hold = transient_hold(cfg)
    if not obs.broker_ok:
        out.append(Finding("broker_unreachable", "broker", "critical",
                           f"broker {cfg.broker.display_url} unreachable: {obs.broker_error or 'no answer'}; "
                           "no worker is restarted while it is", hold=hold))
    elif obs.listening_since is None:
        out.append(Finding("heartbeats_unavailable", "broker", "critical",
                           f"cannot follow worker heartbeats on {cfg.broker.display_url}: "
                           f"{obs.stream_error or 'event stream not connected'}; workers cannot be judged",
                           hold=hold))
    for group, err in sorted(obs.platform_errors.items()):
        out.append(Finding("platform_error", group, "warning", f"group {group}: platform error: {err}", group,
                           hold=hold))
    return out


def worst(findings: list[Finding]) -> str:
    """The worst severity among findings that hold now ("ok" when none)."""
    best = "ok"
    for f in findings:
        if SEVERITY_RANK[f.severity] > SEVERITY_RANK[best]:
            best = f.severity
    return best


# ---------------------------------------------------------------- pending -> firing -> resolved
FLAP_WINDOW = 1800.0  # a finding announced FLAP_COUNT times within this window is flapping
FLAP_COUNT = 3


class RuleBook:
    """Alertmanager-like state per finding key. ``advance`` is fed the findings that hold now and
    returns what people must be told: firing (after `hold`), escalation, resolved.

    Stages it owns: dedup (``notified``: a firing is announced once per severity), flap damping (a
    finding announced FLAP_COUNT times within FLAP_WINDOW is announced once more as flapping, then
    not again until it has been stable for FLAP_WINDOW; if it is clear by then, one RESOLVED), and
    the repeat ledger (``last_sent``, for ``notify.repeat_every``). Inhibition and silences come in
    as ``muted``."""

    def __init__(self, states: dict[str, RuleState] | None = None, notified: dict[str, str] | None = None):
        self.states: dict[str, RuleState] = dict(states or {})
        # key -> the highest severity announced as firing (a resolve goes where the firing went)
        self.notified: dict[str, str] = dict(notified or {})
        self.last_sent: dict[str, float] = {}  # key -> when its firing was last told (repeat_every)
        self.fired: dict[str, list[float]] = {}  # key -> when it was announced firing (flap window)
        self.flapping: dict[str, float] = {}  # key -> since when it is flapping (told no more)
        self.flap_last: dict[str, RuleState] = {}  # key -> its state when it last cleared while flapping

    def advance(
        self, findings: list[Finding], now: float, muted: set[str] = frozenset(), frozen=lambda st: False
    ) -> list[Transition]:
        """``muted``: keys not to announce now (inhibited, silenced); announced once the mute lifts if
        still firing. ``frozen(state)``: true for a state whose condition cannot be evaluated now
        (broker down, a worker not judgeable): it is kept as it is instead of being resolved."""
        out: list[Transition] = []
        current = {f.key: f for f in findings}
        for key, f in current.items():
            st = self.states.get(key)
            if st is None:
                st = RuleState(key, f.rule, f.subject, "pending", f.severity, f.summary, now, f.group, f.hostname)
            st = replace(st, severity=f.severity, summary=f.summary)
            if st.state == "pending" and now - st.since >= f.hold:
                st = replace(st, state="firing", fired_at=now)
            self.states[key] = st
            self.flap_last.pop(key, None)
            announced = self.notified.get(key)
            # only a severity above what was already announced pages again (a value hovering
            # around a threshold does not page on every crossing)
            escalated = announced is not None and SEVERITY_RANK[f.severity] > SEVERITY_RANK[announced]
            if st.state == "firing" and key not in muted and (announced is None or escalated):
                self.notified[key] = f.severity
                if announced is None:
                    recent = [t for t in self.fired.get(key, []) if now - t < FLAP_WINDOW] + [now]
                    self.fired[key] = recent
                    if key in self.flapping:
                        continue  # flapping: told once already
                    if len(recent) >= FLAP_COUNT:
                        self.flapping[key] = now
                        self.last_sent[key] = now
                        out.append(Transition(key, "pending", "firing", st, flapping=True))
                        continue
                self.last_sent[key] = now
                out.append(Transition(key, "pending" if announced is None else "firing", "firing", st))
        for key in [k for k in self.states if k not in current]:
            if frozen(self.states[key]):
                continue
            st = self.states.pop(key)
            if key in self.flapping and key in self.notified:
                self.flap_last[key] = replace(st, state="resolved", resolved_at=now, severity=self.notified[key])
                continue  # said once it flaps: the RESOLVED waits until it is stable
            announced = self.notified.pop(key, None)
            self.last_sent.pop(key, None)
            if announced is not None:
                out.append(Transition(key, "firing", "resolved",
                                      replace(st, state="resolved", resolved_at=now, severity=announced)))
        for key, since in list(self.flapping.items()):
            last = max(self.fired.get(key, [since]))
            if now - last < FLAP_WINDOW:
                continue
            del self.flapping[key]  # stable for a whole window
            if key not in self.states:
                last_st = self.flap_last.pop(key, None)
                announced = self.notified.pop(key, None)
                self.last_sent.pop(key, None)
                if announced is not None and last_st is not None:
                    out.append(Transition(key, "firing", "resolved", last_st))
        for key in [k for k, ts in self.fired.items() if now - ts[-1] >= FLAP_WINDOW and k not in self.flapping]:
            del self.fired[key]
        return out

    def due_repeats(self, now: float, every: float, muted: set[str] = frozenset()) -> list[Transition]:
        """Firing findings announced ``every`` seconds ago or more and still firing: remind people
        (``notify.repeat_every``; 0 = never). Marks them as sent now."""
        if every <= 0:
            return []
        out = []
        for key in list(self.notified):
            st = self.states.get(key)
            if st is None or st.state != "firing" or key in muted or key in self.flapping:
                continue
            if now - self.last_sent.get(key, now) >= every:
                self.last_sent[key] = now
                out.append(Transition(key, "firing", "firing", st))
        return out

    # ---- durable form (supervisor.state keeps it between runs)
    def to_json(self) -> dict:
        from dataclasses import asdict

        return {
            "states": {k: asdict(v) for k, v in self.states.items()},
            "notified": self.notified,
            "last_sent": self.last_sent,
            "fired": self.fired,
            "flapping": self.flapping,
            "flap_last": {k: asdict(v) for k, v in self.flap_last.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> RuleBook:
        book = cls({k: RuleState(**v) for k, v in d.get("states", {}).items()}, d.get("notified", {}))
        book.last_sent = {k: float(v) for k, v in d.get("last_sent", {}).items()}
        book.fired = {k: [float(t) for t in v] for k, v in d.get("fired", {}).items()}
        book.flapping = {k: float(v) for k, v in d.get("flapping", {}).items()}
        book.flap_last = {k: RuleState(**v) for k, v in d.get("flap_last", {}).items()}
        return book
