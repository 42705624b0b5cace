"""Pure policy: verdicts -> restart plans, with budgets, backoff, grace, mass-loss canary and
broker-down inhibition. No I/O; ``now`` comes in with the observation.

The state it keeps (restart history, groups in canary/systemic mode) is plain data,
updated only by ``plan`` (group modes) and ``record`` (what the shell did).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.config import Config, GroupConfig
from supervisor.durations import format_duration as fd
from supervisor.model import Finding, Observation, WorkerVerdict

RESTARTABLE = ("dead", "lost")


@dataclass
class RestartPlan:
    group: str
    hostname: str
    target_id: str
    rule: str  # the finding behind it: worker_lost | worker_unresponsive | worker_stalled
    reason: str
    budget_left: int  # restarts left in the window after this one
    canary: bool = False
    blocked: str | None = None  # why it cannot be executed now (platform unreachable): shown, not done


@dataclass
class GroupMode:
    mode: str = "normal"  # normal | canary | released | systemic
    canary: str | None = None
    since: float = 0.0
    lost: int = 0  # workers lost when the mass loss began
    size: int = 0


@dataclass
class PolicyState:
    history: dict[str, list[float]] = field(default_factory=dict)  # target id -> restart attempts
    restarted: dict[str, tuple[float, str]] = field(default_factory=dict)  # hostname -> (at, rule)
    groups: dict[str, GroupMode] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # hostname -> why no restart now (for dry-run/status)


@dataclass
class Budget:
    used: int
    max: int
    next_at: float | None  # earliest time backoff allows another restart

    @property
    def spent(self) -> bool:
        return self.used >= self.max

    @property
    def left(self) -> int:
        return max(self.max - self.used, 0)


def budget(state: PolicyState, group: GroupConfig, target_id: str, now: float) -> Budget:
    r = group.restart
    recent = [t for t in state.history.get(target_id, []) if now - t < r.window]
    next_at = None
    if recent:
        wait = min(r.backoff * 2 ** (len(recent) - 1), r.window)
        next_at = recent[-1] + wait
    return Budget(len(recent), r.max_restarts, next_at)


def wants_restart(v: WorkerVerdict, group: GroupConfig) -> str | None:
    """The rule a verdict would be restarted for, or None."""
    if v.status in RESTARTABLE:
        return "worker_lost"
    # judged unresponsive only after hung_timeout of silence, confirmed by a ping sent after it
    if v.status == "unresponsive" and v.silent_for is not None and v.silent_for >= group.hung_timeout:
        return "worker_unresponsive"
    return None


def plan(
    cfg: Config, obs: Observation, verdicts: list[WorkerVerdict], state: PolicyState, target_ids: dict[str, str],
    stalled: dict[str, str] | None = None,
) -> tuple[list[RestartPlan], list[Finding]]:
    """What to restart now, and the findings the policy itself raises (gave up, mass loss, systemic).

    ``target_ids``: hostname -> the platform target id that serves it. ``stalled``: hostname -> reason,
    the confirmed stalls (supervisor/stall.py): restarted like lost workers, within the same budget,
    and counted with them for the canary rule.
    """
    stalled = stalled or {}

    def wants(v: WorkerVerdict, g: GroupConfig) -> str | None:
        return wants_restart(v, g) or ("worker_stalled" if v.hostname in stalled and v.status == "alive" else None)

    now = obs.now
    plans: list[RestartPlan] = []
    findings: list[Finding] = []
    state.notes = {}
    if not obs.broker_ok:
        return plans, findings  # never restart while the broker is unreachable
    for g in cfg.groups:
        vs = [v for v in verdicts if v.group == g.name]
        mode = state.groups.setdefault(g.name, GroupMode())
        down = [v for v in vs if wants(v, g)]  # lost, dead, hung past hung_timeout, or stalled
        counted = [v for v in vs if v.status not in ("retired",)]
        # ---- mass loss: restart one canary, go on only when it is back
        if mode.mode == "normal" and len(down) >= 2 and 2 * len(down) > len(counted) and g.restart is not None:
            mode.mode, mode.since, mode.lost, mode.size, mode.canary = "canary", now, len(down), len(counted), None
        if mode.mode != "normal" and not down and not any(v.status in ("starting", "unknown") for v in vs):
            state.groups[g.name] = mode = GroupMode()  # the group is whole again
        if mode.mode == "canary" and mode.canary is not None:
            cv = next((v for v in vs if v.hostname == mode.canary), None)
            if cv is not None and cv.alive:
                mode.mode = "released"
            elif cv is None or cv.status not in ("starting", "unknown"):
                mode.mode, mode.since = "systemic", now
        if g.restart is None:
            continue
        perr = obs.platform_errors.get(g.name)
        blocked = f"platform {g.restart.platform} unreachable: {perr}" if perr else None
        for v in vs:
            rule = wants(v, g)
            if rule is None:
                if v.status in ("busy", "unresponsive"):
                    silent = "silent" if v.silent_for is None else f"silent {fd(v.silent_for)}"
                    state.notes[v.hostname] = (f"{silent}, its process runs: busy or hung; restarted only after "
                                               f"hung_timeout {fd(g.hung_timeout)} of silence")
                continue
            if mode.mode == "systemic":
                state.notes[v.hostname] = "group failure looks systemic: restarts stopped"
                continue
            if mode.mode == "canary" and (mode.canary is not None or plans and plans[-1].group == g.name):
                state.notes[v.hostname] = f"waiting for canary {mode.canary} to come back"
                continue
            tid = target_ids.get(v.hostname, v.hostname)
            if g.restart.max_restarts == 0:
                state.notes[v.hostname] = "restarts disabled (max_restarts: 0)"
                continue
            b = budget(state, g, tid, now)
            if b.spent:
                state.notes[v.hostname] = f"restart budget spent ({b.used}/{b.max} in {fd(g.restart.window)})"
                findings.append(Finding(
                    "restart_gave_up", v.hostname, "critical",
                    f"{v.hostname}: gave up after {b.used} restarts in {fd(g.restart.window)}; still {v.status} "
                    f"({v.reason}); no more restarts of {tid} until the window clears",
                    g.name, v.hostname))
                continue
            if b.next_at is not None and now < b.next_at:
                state.notes[v.hostname] = f"backing off: next restart in {fd(b.next_at - now)}"
                continue
            if blocked:
                # planned from the broker's view, shown beside the platform's error, never executed
                state.notes[v.hostname] = blocked
                reason = stalled[v.hostname] if rule == "worker_stalled" else v.reason
                plans.append(RestartPlan(g.name, v.hostname, tid, rule, reason, b.left - 1, blocked=blocked))
                continue
            canary = mode.mode == "canary"
            if canary:
                mode.canary = v.hostname
            reason = stalled[v.hostname] if rule == "worker_stalled" else v.reason
            plans.append(RestartPlan(g.name, v.hostname, tid, rule, reason, b.left - 1, canary))
    for g in cfg.groups:
        findings += _mode_findings(g, state.groups[g.name])
    return plans, findings


def _mode_findings(g: GroupConfig, mode: GroupMode) -> list[Finding]:
    """One voice for a group in mass loss (its workers' own alerts are muted meanwhile)."""
    if mode.mode == "normal":
        return []
    canary = mode.canary or "none yet: every lost worker is waiting on its budget"
    what = {
        "canary": f"restarting {canary} as a canary before the others",
        "released": f"canary {mode.canary} came back; restarting the others",
        "systemic": f"canary {mode.canary} did not come back",
    }[mode.mode]
    findings = [Finding("group_mass_loss", g.name, "critical",
                        f"group {g.name}: {mode.lost} of {mode.size} workers lost (or stalled) at once; {what}", g.name)]
    if mode.mode == "systemic":
        findings.append(Finding(
            "group_systemic", g.name, "critical",
            f"group {g.name}: canary {mode.canary} did not come back after its restart; the failure looks "
            f"systemic (broker, code, platform?): no more restarts in this group until its workers are "
            f"back", g.name))
    return findings


def record(state: PolicyState, plan_: RestartPlan, at: float, ok: bool) -> None:
    """The shell restarted (or tried to): count it against the budget; a success starts the grace."""
    hist = state.history.setdefault(plan_.target_id, [])
    hist.append(at)
    del hist[:-50]
    if ok:
        state.restarted[plan_.hostname] = (at, plan_.rule)
    elif plan_.canary:
        mode = state.groups.get(plan_.group)
        if mode is not None:
            mode.mode, mode.since = "systemic", at

