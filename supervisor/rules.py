"""Pure rules: (config, observation, what we restarted, now) -> verdicts and findings.

No I/O and no clock of its own: ``obs.now`` is the only time. Every decision here
can be replayed in a unit test from a recorded Observation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from supervisor.config import Config, GroupConfig
from supervisor.durations import format_duration as fd
from supervisor.model import (
    DEAD_STATES,
    SEVERITY_RANK,
    Finding,
    Observation,
    QueueSeen,
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
    """The group's explicit workers plus every hostname seen (heard, on the platform, or answering
    remote control) whose first matching group is this one."""
    names = dict.fromkeys(h for h in group.workers if cfg.group_of(h) is group)
    for t in obs.targets.get(group.name, ()):
        if t.hostname:
            names.setdefault(t.hostname, None)
    for h in (*obs.workers, *obs.pong_at, *obs.worker_queues, *obs.pongs):
        names.setdefault(h, None)
    return sorted(h for h in names if cfg.group_of(h) is group)


def target_of(obs: Observation, group: str, hostname: str) -> Target | None:
    for t in obs.targets.get(group, ()):
        if t.hostname == hostname:
            return t
    return None


def _latest(*ts: float | None) -> float | None:
    """The latest of the known times (None: none known). Called about ten times per worker per tick."""
    best = None
    for t in ts:
        if t is not None and (best is None or t > best):
            best = t
    return best


def pong_time(obs: Observation, hostname: str) -> float | None:
    """When the worker last answered remote control (this tick's ``pongs`` count as now)."""
    return _latest(obs.pong_at.get(hostname), obs.now if hostname in obs.pongs else None)


def noreply_time(obs: Observation, hostname: str) -> float | None:
    """When a ping to the worker last went unanswered (this tick's unanswered ``pinged``: now)."""
    this_tick = obs.now if hostname in obs.pinged and hostname not in obs.pongs else None
    return _latest(obs.noreply_at.get(hostname), this_tick)


def last_evidence(obs: Observation, hostname: str) -> float | None:
    """The last evidence of life: a heartbeat, or a reply to remote control, each with its own time."""
    ws = obs.workers.get(hostname)
    return _latest(ws.last_heartbeat if ws else None, pong_time(obs, hostname))


def _offline(ws: WorkerSeen | None, pong: float | None) -> bool:
    """Sent worker-offline after its last heartbeat (and answered nothing since)."""
    return ws is not None and ws.offline_at is not None and (pong is None or pong < ws.offline_at)


def _platform_contradicted(t: Target, last: float | None, offline: bool, group: GroupConfig, now: float) -> bool:
    """The platform says the target died, but the worker showed life recently and after the death
    the platform saw (or the platform did not witness when it died): a ping decides."""
    if last is None or offline or now - last > group.heartbeat_timeout:
        return False
    return t.since is None or last > t.since


def _silence(last: float | None, obs: Observation) -> float | None:
    """Seconds we have gone without evidence of life from the worker while able to hear it."""
    ref = _latest(last, obs.listening_since)
    return obs.now - ref if ref is not None else None


def _confirm_floor(last: float | None, obs: Observation, restarted_at: float | None) -> float | None:
    """A ping counts as confirming a silence only if it went out after the worker's last evidence of
    life, after the stream (re)connected and after our last restart of it."""
    return _latest(last, obs.listening_since, restarted_at)


def _confirmed(noreply: float | None, last: float | None, obs: Observation, restarted_at: float | None) -> bool:
    if noreply is None:
        return False
    if last is not None and noreply <= last:
        return False
    floor = _latest(obs.listening_since, restarted_at)
    return floor is None or noreply >= floor


@dataclass(frozen=True)
class PingNeed:
    """Why a worker should be pinged, and from when a ping counts (``decide.Core`` rate-limits)."""

    hostname: str
    kind: str  # confirm (new silence) | recheck (still down) | hung (hung_timeout reached) | refresh
    after: float  # a ping asked at or after this time serves this need
    every: float  # at most one ping per this many seconds for this need


def ping_needs(cfg: Config, obs: Observation, restarts: Restarts, settle_until: float | None = None) -> list[PingNeed]:
    """Workers whose judgement needs a ping: silent ones (first confirmation, then re-checks of those
    that stay down), busy ones reaching hung_timeout (a last confirmation before a restart), and
    workers that send no heartbeat, whose last pong is getting old (refreshed every
    heartbeat_timeout / 2, so that they never look silent)."""
    if not obs.broker_ok or obs.listening_since is None:
        return []
    # after a broker outage silence proves nothing for a while (workers reconnect): no confirmation
    # then, but workers that live on pongs are still asked, so that they are not silent when it ends
    settling = settle_until is not None and obs.now < settle_until
    out = []
    for g in cfg.groups:
        for h in group_hostnames(cfg, g, obs):
            need = _ping_need(g, h, obs, restarts)
            if need is not None and (not settling or need.kind == "refresh"):
                out.append(need)
    return out


def _ping_need(group: GroupConfig, hostname: str, obs: Observation, restarts: Restarts) -> PingNeed | None:
    now, ht = obs.now, group.heartbeat_timeout
    at = restarts.get(hostname, (None, ""))[0]
    if at is not None and group.restart is not None and now - at < group.restart.grace:
        return None
    t = target_of(obs, group.name, hostname)
    ws = obs.workers.get(hostname)
    pong = pong_time(obs, hostname)
    last = last_evidence(obs, hostname)
    offline = _offline(ws, pong)
    noreply = noreply_time(obs, hostname)
    floor = _confirm_floor(last, obs, at)
    floor = now if floor is None else floor
    if t is not None and t.state in DEAD_STATES:
        if _platform_contradicted(t, last, offline, group, now) and not _confirmed(noreply, last, obs, at):
            # while it answers, ask again every heartbeat_timeout / 2 (not on every tick) until it
            # does not, or the platform changes its mind
            since = _latest(obs.listening_since, at)
            return PingNeed(hostname, "confirm", now if since is None else since, ht / 2)
        return None  # the platform's word stands: no ping
    if offline and hostname not in group.workers:
        return None
    if obs.one_shot:
        silent = last is None or offline or now - last > ht
    else:
        s = _silence(last, obs)
        silent = s is not None and s > ht
    if not silent:
        # living on pongs (no heartbeat, or heartbeats stopped): ask again before the pong gets old
        hb = ws.last_heartbeat if ws else None
        if pong is not None and (hb is None or pong > hb) and now - pong >= ht / 2:
            return PingNeed(hostname, "refresh", pong + ht / 2, ht / 2)
        return None
    if not _confirmed(noreply, last, obs, at):
        return PingNeed(hostname, "confirm", floor, ht / 2)
    if obs.one_shot:
        return None  # confirmed in this pass: nothing to re-check
    running = t is not None and t.state in ("running", "stopping")
    s = _silence(last, obs) or 0.0
    if running and s >= group.hung_timeout:
        hung_at = now - s + group.hung_timeout
        if noreply is None or noreply < hung_at:
            return PingNeed(hostname, "hung", hung_at, ht / 2)
    # still down (or busy): re-checked at a bounded rate, once per heartbeat_timeout at most
    return PingNeed(hostname, "recheck", floor, ht)


def is_suspect(cfg: Config, group: GroupConfig, hostname: str, obs: Observation, restarts: Restarts) -> bool:
    """Silent for longer than heartbeat_timeout and not yet confirmed by a ping (not reported dead by
    its platform, not within the grace of a restart): the loop pings these before judging."""
    if not obs.broker_ok or obs.listening_since is None:
        return False
    need = _ping_need(group, hostname, obs, restarts)
    return need is not None and need.kind in ("confirm", "recheck", "hung")


def suspects(cfg: Config, obs: Observation, restarts: Restarts, settle_until: float | None = None) -> list[str]:
    """Silent workers that a ping must confirm or re-check (no rate limit: ``decide.Core`` applies it)."""
    return [n.hostname for n in ping_needs(cfg, obs, restarts, settle_until) if n.kind != "refresh"]


def judge_worker(
    cfg: Config, group: GroupConfig, hostname: str, obs: Observation, restarts: Restarts,
    settle_until: float | None = None,
) -> WorkerVerdict:
    now = obs.now
    ht = group.heartbeat_timeout
    explicit = hostname in group.workers
    ws = obs.workers.get(hostname)
    tgt = target_of(obs, group.name, hostname)
    pong = pong_time(obs, hostname)
    noreply = noreply_time(obs, hostname)
    last = last_evidence(obs, hostname)  # heartbeat or pong, whichever is later
    silent = _silence(last, obs)

    def verdict(status: str = "unknown", reason: str = "", silent_for: float | None = silent) -> WorkerVerdict:
        return WorkerVerdict(hostname, group.name, status, reason, explicit, silent_for, tgt)

    if not obs.broker_ok:
        return verdict(reason="broker unreachable: cannot judge")
    offline = _offline(ws, pong)
    fresh = last is not None and not offline and now - last <= ht
    restarted_at, _ = restarts.get(hostname, (None, ""))
    grace = group.restart.grace if group.restart else 0.0
    in_grace = restarted_at is not None and now - restarted_at < grace
    back_since_restart = restarted_at is not None and last is not None and last > restarted_at and not offline

    # a pong newer than any unanswered ping (and than the death the platform reports, and than our
    # restart of it) is evidence of life with its own time
    pong_fresh = (pong is not None and now - pong <= ht and (noreply is None or pong > noreply)
                  and (restarted_at is None or pong > restarted_at or not in_grace))
    if pong_fresh and not (tgt is not None and tgt.state in DEAD_STATES and tgt.since is not None
                           and tgt.since > pong):
        return verdict(status="alive", reason="answered ping" if pong >= now else f"answered ping {fd(now - pong)} ago")
    contradicted = (tgt is not None and tgt.state in DEAD_STATES
                    and _platform_contradicted(tgt, last, offline, group, now))
    if contradicted and not _confirmed(noreply, last, obs, restarted_at):
        # once pinged without a pong, the platform's word stands
        return verdict(reason=f"{tgt.id} {tgt.state} but heard from {fd(now - last)} ago: confirming by ping")
    if tgt is not None and tgt.state in DEAD_STATES:
        exited_before_restart = restarted_at is not None and (tgt.since is None or tgt.since <= restarted_at)
        if in_grace and exited_before_restart:
            return verdict(status="starting", reason=f"restarted {fd(now - restarted_at)} ago")
        if offline and not explicit:
            return verdict(status="retired", reason=f"left gracefully; its target {tgt.state}")
        what = f" ({tgt.detail})" if tgt.detail else ""
        return verdict(status="dead", reason=f"{group.restart.platform if group.restart else 'platform'} "
                       f"reports {tgt.id} {tgt.state}{what}")
    if fresh and (not in_grace or back_since_restart):
        return verdict(status="alive", reason=_heard(ws, pong, now))
    if in_grace:
        if back_since_restart:
            return verdict(status="alive", reason="back after restart")
        return verdict(status="starting", reason=f"restarted {fd(now - restarted_at)} ago, waiting for it")
    if tgt is not None and tgt.state == "missing" and not explicit:
        return verdict(status="retired", reason=f"its target {tgt.id} no longer exists on the platform")
    if offline:
        if tgt is not None and tgt.state in ("running", "stopping"):
            return verdict(status="stopping", reason="sent worker-offline; process still stopping (warm shutdown)")
        if not explicit:
            return verdict(status="retired", reason="left gracefully (worker-offline)")
        # an explicit worker that left must come back: judged like a silent one below
    if obs.listening_since is None:
        return verdict(reason="heartbeat stream not connected")
    if settle_until is not None and now < settle_until and not fresh:
        # after a broker outage workers reconnect with their own backoff: silence proves nothing yet
        return verdict(reason=f"broker came back; waiting {fd(settle_until - now)} for workers to reconnect")
    if tgt is not None and tgt.state in ("restarting",):
        return verdict(status="starting", reason=f"platform is restarting {tgt.id}")
    if obs.one_shot:
        silent_enough = last is None or offline or now - last > ht
    else:
        silent_enough = silent is not None and silent > ht
    if not silent_enough:
        if last is None:
            return verdict(reason=f"not heard yet (listening for {fd(silent)})")
        if now - last > ht:
            return verdict(reason=f"last heard from {fd(now - last)} ago; listening for only {fd(silent)}")
        return verdict(status="alive", reason=_heard(ws, pong, now))
    if not _confirmed(noreply, last, obs, restarted_at):
        return verdict(reason="silent, not yet confirmed by ping")
    heard = "never heard" if last is None else f"nothing heard for {fd(now - last)}"
    if offline:
        heard = "left (worker-offline)"
    if tgt is not None and tgt.state in ("running", "stopping"):
        running = f"{tgt.id} is {tgt.state}"
        if obs.one_shot:
            # one pass cannot measure a silence: busy or hung, it cannot tell (the daemon can)
            return verdict(status="busy", silent_for=None,
                           reason=f"{heard}, no reply to ping, but {running}: busy (a solo pool running a task "
                                  f"answers nothing) or hung; one pass cannot tell for how long")
        if silent < group.hung_timeout:
            return verdict(status="busy",
                           reason=f"busy (a solo pool running a task answers nothing) or hung: {heard}, no reply "
                                  f"to ping, {running}; restarted only after hung_timeout {fd(group.hung_timeout)}")
        hung_at = now - silent + group.hung_timeout  # a ping sent after this confirms it hung
        if noreply < hung_at:
            return verdict(status="busy", reason=f"{heard}, {running}: hung_timeout {fd(group.hung_timeout)} "
                                                    f"reached; confirming by ping before a restart")
        return verdict(status="unresponsive", reason=f"{heard}, no reply to ping for hung_timeout "
                                                        f"{fd(group.hung_timeout)}, but {running}")
    where = f", {tgt.id} {tgt.state}" if tgt is not None and tgt.state != "unknown" else ""
    return verdict(status="lost", reason=f"{heard}, no reply to ping{where}")


def _heard(ws: WorkerSeen | None, pong: float | None, now: float) -> str:
    hb = ws.last_heartbeat if ws else None
    if pong is not None and (hb is None or pong > hb):
        return "answered ping" if pong >= now else f"answered ping {fd(now - pong)} ago"
    return f"heartbeat {fd(now - hb)} ago"


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
        alive = sum(v.alive for v in vs)  # a worker busy within hung_timeout counts
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


UNGROUPED_FRESH = 10.0  # a worker outside every group counts as a consumer if heard from this recently


def count_consumers(cfg: Config, obs: Observation, verdicts: list[WorkerVerdict]) -> dict[str, QueueSeen]:
    """Consumers of each queue the broker does not count itself (Redis), from what each worker last
    said it consumes (``worker_queues``: kept while the worker lives, busy or not; a worker that
    died, left or is being restarted drops out). The count is a lower bound: when it is below the
    queue's ``min_consumers`` while a living worker's queues are unknown (a busy solo pool answers
    no ``active_queues``), the count is unknown (None), never a false 0."""
    out = dict(obs.queues)
    if obs.census_at is None:
        return out  # nobody was asked yet: nothing can be counted
    by_host = {v.hostname: v for v in verdicts}
    living: list[str] = []
    undecided: list[str] = []
    hosts = set(obs.worker_queues) | set(obs.workers) | set(obs.pong_at) | set(by_host)
    for h in sorted(hosts):
        v = by_host.get(h)
        if v is not None:
            if v.alive:
                living.append(h)
            elif v.status == "unknown":
                undecided.append(h)
            continue
        ws = obs.workers.get(h)
        if cfg.group_of(h) is not None:
            continue  # a grouped worker without a verdict (broker down): nothing to count
        last = last_evidence(obs, h)
        if last is not None and not _offline(ws, pong_time(obs, h)) and (
                obs.now - last <= UNGROUPED_FRESH or last >= obs.census_at):
            living.append(h)
    for name, q in obs.queues.items():
        if q.consumers is not None:
            continue  # the broker counted them (RabbitMQ) or the observation says
        count = sum(1 for h in living if h in obs.worker_queues and name in obs.worker_queues[h].names)
        unsure = [h for h in living if h not in obs.worker_queues]
        unsure += [h for h in undecided if h not in obs.worker_queues or name in obs.worker_queues[h].names]
        need = next((c.min_consumers for c in cfg.queues if c.name == name), 0)
        if unsure and (need == 0 or count < need):
            continue  # a lower bound below the minimum proves nothing
        out[name] = replace(q, consumers=count)
    return out


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
