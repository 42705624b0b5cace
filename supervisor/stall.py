"""Pure stall judgement (issue 10): a worker alive but taking no work from a backlog that does not drain.

No I/O and no clock: ``obs.now`` is the only time. ``StallMemory`` keeps what must be remembered
across ticks (when each worker's ``processed`` last moved, since when each queue has a backlog and
when it last went down, open stalls); ``StallMemory.judge`` turns an observation into stall
verdicts, findings and the inquiries the shell should make (targeted ``inspect stats`` for the pool
size, targeted ``active_queues`` / ``reserved`` / ``active`` to confirm a suspect).

A worker is a suspect when one of its group's queues (that it consumes, as far as we know) has had
a backlog for ``stall_timeout``, the backlog did not go down in that time, and the worker's
``processed`` did not move in that time while it had free pool slots. A suspect is *stalled* only
once a confirmation it answered after the suspicion began shows it: the queue is missing from its
``active_queues`` (a cancelled consumer), or it holds reserved messages with nothing active
(prefetch stuck), or it consumes the queue and holds nothing at all. A full pool is busy, never
stalled; a queue whose every consumer is busy is saturated (``info``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from supervisor.config import Config, GroupConfig
from supervisor.durations import format_duration as fd
from supervisor.model import Finding, Observation, StallCheck, WorkerStats, WorkerVerdict

RATE_WINDOW = 60.0  # processed rate and drain rate are measured over about this long
STATS_EVERY = 600.0  # a worker's pool size is asked again this often (autoscale may change it)
STATS_EVIDENCE_EVERY = 15.0  # without heartbeats, processed comes from stats: at most this often, only on a backlog
MEMORY_TTL = 3600.0


@dataclass
class WorkerTrack:
    processed: int | None = None
    pid: int | None = None
    since: float = 0.0  # watched with this baseline (same process) since
    taken_at: float | None = None  # our clock: when processed last went up
    samples: deque = field(default_factory=lambda: deque(maxlen=64))  # (t, processed)
    consumed: set[str] = field(default_factory=set)  # queues it was seen consuming (this process)
    seen_at: float = 0.0


@dataclass
class QueueTrack:
    length: int | None = None
    backlog_since: float | None = None  # length > 0 at every reading since
    down_at: float | None = None  # the length last went down (or was 0)
    samples: deque = field(default_factory=lambda: deque(maxlen=64))  # (t, length)


@dataclass(frozen=True)
class WorkerEvidence:
    hostname: str
    processed: int | None
    processed_rate: float | None  # tasks taken per second over the last minute
    active: int | None
    concurrency: int | None
    last_task_age: float | None  # seconds since processed last went up (None: not seen to move)
    stall: str | None = None  # "suspect" | "stalled" | "busy" | None
    stall_reason: str | None = None


@dataclass(frozen=True)
class QueueEvidence:
    name: str
    drain_rate: float | None  # messages per second the length went down over the last minute (<0: grows)
    backlog_for: float | None  # seconds it has had messages at every reading


@dataclass
class StallReport:
    findings: list[Finding] = field(default_factory=list)
    stalled: dict[str, str] = field(default_factory=dict)  # hostname -> restart reason (confirmed stalls)
    confirm: list[str] = field(default_factory=list)  # hostnames to send a confirmation inquiry
    stats: list[str] = field(default_factory=list)  # hostnames to send a targeted inspect stats
    workers: dict[str, WorkerEvidence] = field(default_factory=dict)
    queues: dict[str, QueueEvidence] = field(default_factory=dict)
    # group queue -> how many living workers of its group(s) said they consume it (census), where
    # every living worker of the group has said what it consumes: 0 is probably a typo in `queues`
    consumed_by: dict[str, int] = field(default_factory=dict)


def _rate(samples, now: float) -> float | None:
    """Units per second between the oldest sample of the last RATE_WINDOW and the newest."""
    recent = [(t, v) for t, v in samples if now - t <= RATE_WINDOW]
    if len(recent) < 2 or recent[-1][0] - recent[0][0] <= 0:
        return None
    return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


def group_queues(cfg: Config) -> list[str]:
    """Queues whose length the stall rule needs (groups with stall detection on)."""
    return list(dict.fromkeys(q for g in cfg.groups if g.stall_timeout > 0 for q in g.queues))


class StallMemory:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerTrack] = {}
        self.queues: dict[str, QueueTrack] = {}
        self.stats: dict[str, WorkerStats] = {}
        self.checks: dict[str, StallCheck] = {}
        self.suspect_since: dict[str, float] = {}
        self.open: dict[str, tuple[float, str, str]] = {}  # hostname -> (confirmed at, group, summary)
        self.asked_confirm: dict[str, float] = {}
        self.asked_stats: dict[str, float] = {}

    # ---- taking in evidence
    def _merge(self, obs: Observation) -> None:
        for h, s in obs.worker_stats.items():
            if h not in self.stats or s.at >= self.stats[h].at:
                self.stats[h] = s
        for h, c in obs.stall_checks.items():
            if h not in self.checks or c.at >= self.checks[h].at:
                self.checks[h] = c

    def _processed(self, obs: Observation, g: GroupConfig, h: str) -> tuple[int | None, int | None]:
        """(processed, pid): from a recent heartbeat, else from the last stats reply."""
        ws = obs.workers.get(h)
        if ws is not None and ws.processed is not None and ws.last_heartbeat is not None \
                and obs.now - ws.last_heartbeat <= g.heartbeat_timeout:
            return ws.processed, ws.pid
        s = self.stats.get(h)
        if s is not None and s.processed is not None and obs.now - s.at <= max(4 * STATS_EVIDENCE_EVERY, g.stall_timeout):
            return s.processed, s.pid
        return None, None

    def _track_worker(self, obs: Observation, g: GroupConfig, h: str, restarted_at: float | None) -> WorkerTrack:
        now = obs.now
        wt = self.workers.get(h)
        if wt is None:
            wt = self.workers[h] = WorkerTrack(since=now)
        wt.seen_at = now
        if restarted_at is not None and restarted_at > wt.since:
            # we restarted it: a new process, watched afresh
            wt.since, wt.processed, wt.pid, wt.consumed = restarted_at, None, None, set()
            wt.samples.clear()
        p, pid = self._processed(obs, g, h)
        if p is not None:
            new_process = wt.pid is not None and pid is not None and pid != wt.pid
            if wt.processed is None or new_process or p < wt.processed:
                if wt.processed is not None or new_process:
                    wt.since = now  # another process (or a reset counter): a new baseline
                    wt.samples.clear()
                    wt.consumed = set()
                if p > 0 and (wt.processed is not None or new_process) and restarted_at is not None:
                    wt.taken_at = now  # the restarted worker already took work
            elif p > wt.processed:
                wt.taken_at = now
            wt.processed, wt.pid = p, pid if pid is not None else wt.pid
            wt.samples.append((now, p))
        wq = obs.worker_queues.get(h)
        if wq is not None and wq.at >= wt.since:
            wt.consumed |= set(wq.names)
        c = self.checks.get(h)
        if c is not None and c.at >= wt.since:
            wt.consumed |= set(c.queues)
        return wt

    def _track_queues(self, obs: Observation, names: list[str]) -> None:
        now = obs.now
        for name in names:
            q = obs.queues.get(name)
            if q is None or q.length is None:
                continue  # unreadable: keep what we knew
            qt = self.queues.setdefault(name, QueueTrack())
            n = q.length
            if n <= 0:
                qt.backlog_since, qt.down_at = None, now
            else:
                if qt.backlog_since is None:
                    qt.backlog_since = now
                if qt.length is not None and n < qt.length:
                    qt.down_at = now
            qt.length = n
            qt.samples.append((now, n))

    def _forget(self, now: float) -> None:
        for h in [h for h, wt in self.workers.items() if now - wt.seen_at > MEMORY_TTL]:
            for d in (self.workers, self.stats, self.checks, self.suspect_since, self.open, self.asked_confirm,
                      self.asked_stats):
                d.pop(h, None)

    # ---- judgement
    def judge(self, cfg: Config, obs: Observation, verdicts: list[WorkerVerdict],
              restarts: dict[str, tuple[float, str]]) -> StallReport:
        rep = StallReport()
        self._merge(obs)
        now = obs.now
        names = group_queues(cfg)
        self._track_queues(obs, names)
        for name in names:
            qt = self.queues.get(name)
            if qt is not None:
                rate = _rate(qt.samples, now)
                rep.queues[name] = QueueEvidence(
                    name, None if rate is None else round(-rate, 3),
                    None if qt.backlog_since is None else round(now - qt.backlog_since, 3))
        if not obs.broker_ok or obs.listening_since is None:
            return rep
        by_group: dict[str, list[WorkerVerdict]] = {}
        for v in verdicts:
            by_group.setdefault(v.group, []).append(v)
        busy_of: dict[str, list[str]] = {}  # queue -> its consumers with a full pool
        free_of: dict[str, list[str]] = {}  # queue -> its consumers with free slots
        stalled_of: dict[str, list[str]] = {}
        for g in cfg.groups:
            if g.stall_timeout <= 0 or not g.queues:
                continue
            for v in by_group.get(g.name, []):
                self._judge_worker(cfg, g, v, obs, restarts, rep, busy_of, free_of, stalled_of)
        self._queue_findings(cfg, obs, rep, busy_of, free_of, stalled_of)
        for g in cfg.groups:
            living = [v.hostname for v in by_group.get(g.name, []) if v.status == "alive"]
            if g.stall_timeout <= 0 or not living or any(h not in obs.worker_queues for h in living):
                continue
            for q in g.queues:
                n = sum(1 for h in living if q in obs.worker_queues[h].names)
                rep.consumed_by[q] = rep.consumed_by.get(q, 0) + n
        rep.findings = list({f.key: f for f in rep.findings}.values())  # a queue of two groups: once
        self._forget(now)
        return rep

    def _judge_worker(self, cfg, g: GroupConfig, v: WorkerVerdict, obs: Observation, restarts, rep: StallReport,
                      busy_of, free_of, stalled_of) -> None:
        now, h, T = obs.now, v.hostname, g.stall_timeout
        restarted_at = restarts.get(h, (None, ""))[0]
        if v.status not in ("alive", "busy"):
            self.suspect_since.pop(h, None)
            if v.status not in ("starting", "unknown"):
                self.open.pop(h, None)  # lost, dead, retired...: its own rule speaks now
            return
        wt = self._track_worker(obs, g, h, restarted_at)
        ws = obs.workers.get(h)
        active = ws.active if ws is not None and ws.last_heartbeat is not None \
            and now - ws.last_heartbeat <= g.heartbeat_timeout else None
        stats = self.stats.get(h)
        conc = stats.concurrency if stats is not None and stats.at >= wt.since - STATS_EVERY else None
        taken_age = None if wt.taken_at is None else now - wt.taken_at
        # the pool size, once per process and every STATS_EVERY; processed from stats, on a backlog,
        # for workers without heartbeats
        asked = self.asked_stats.get(h)
        backlog = any(self.queues.get(q) is not None and self.queues[q].backlog_since is not None for q in g.queues)
        if v.status == "alive" and (
                (stats is None or stats.at < wt.since or now - stats.at >= STATS_EVERY)
                and (asked is None or asked < wt.since or now - asked >= STATS_EVERY)
                or active is None and backlog and (asked is None or now - asked >= max(STATS_EVIDENCE_EVERY, T / 4))):
            rep.stats.append(h)
            self.asked_stats[h] = now
        consumed = wt.consumed & set(g.queues) or (set(g.queues) if not wt.consumed else set())
        full = active is not None and conc is not None and active >= conc
        ev = dict(processed=wt.processed, processed_rate=_round(_rate(wt.samples, now)), active=active,
                  concurrency=conc, last_task_age=None if taken_age is None else round(taken_age, 3))
        # which of its queues is stuck: backlog for T, never went down in T
        stuck = []
        for q in sorted(consumed):
            qt = self.queues.get(q)
            if qt is None or qt.backlog_since is None or now - qt.backlog_since < T:
                continue
            if qt.down_at is not None and now - qt.down_at < T:
                continue
            stuck.append((q, qt))
        idle_for = now - max(wt.since, wt.taken_at if wt.taken_at is not None else wt.since)
        state, reason = None, None
        if v.status == "busy":
            state = "busy"  # silent within hung_timeout: a solo pool running a task
        elif stuck and wt.processed is not None and idle_for >= T:
            if full:
                state = "busy"
            else:
                check = self.checks.get(h)
                since = self.suspect_since.setdefault(h, now)
                q, qt = stuck[0]
                head = f"stalled: queue {q} has {qt.length} messages, no task taken for {fd(idle_for)}"
                if check is not None and check.at >= since:
                    c_conc = conc if conc is not None else None
                    if c_conc is not None and check.active >= c_conc:
                        state = "busy"
                    elif check.active > 0:
                        state = "suspect"  # it runs something: working, if slowly; asked again later
                        reason = f"{check.active} task(s) active, none taken for {fd(idle_for)}"
                        if now - self.asked_confirm.get(h, 0.0) >= T / 2:
                            rep.confirm.append(h)
                            self.asked_confirm[h] = now
                    else:
                        missing = [x for x, _ in stuck if x not in check.queues]
                        if missing:
                            q = missing[0]
                            qt = self.queues[q]
                            head = f"stalled: queue {q} has {qt.length} messages, no task taken for {fd(idle_for)}"
                            why = f"consumer of {q} missing"
                        elif check.reserved > 0:
                            why = f"{check.reserved} message(s) reserved, none active: prefetch stuck"
                        else:
                            why = f"consumes {q} but holds no message"
                        state, reason = "stalled", f"{head}, {why}"
                else:
                    state, reason = "suspect", f"{head}; confirming"
                    asked_c = self.asked_confirm.get(h)
                    if asked_c is None or asked_c < since or now - asked_c >= max(T / 2, 5.0):
                        rep.confirm.append(h)
                        self.asked_confirm[h] = now
        if state != "suspect" and state != "stalled":
            self.suspect_since.pop(h, None)
        for q in consumed:
            if state == "busy" or full:
                busy_of.setdefault(q, []).append(h)
            elif state == "stalled":
                stalled_of.setdefault(q, []).append(h)
            else:
                free_of.setdefault(q, []).append(h)
        rep.workers[h] = WorkerEvidence(h, **ev, stall=state, stall_reason=reason)
        if state == "stalled":
            rep.stalled[h] = reason
            self.open[h] = (now, g.name, f"{h}: {reason}")
            rep.findings.append(Finding("worker_stalled", h, "critical", f"{h}: {reason}", g.name, h))
            return
        opened = self.open.get(h)
        if opened is None:
            return
        at, _, summary = opened
        gone = all(self.queues.get(q) is None or self.queues[q].backlog_since is None for q in g.queues)
        if (wt.taken_at is not None and wt.taken_at > at) or gone or state == "busy":
            del self.open[h]  # it takes work again (or there is none to take): resolved
            return
        if h in restarts:
            return  # being restarted: worker_findings keeps the finding open ("starting")
        rep.findings.append(Finding("worker_stalled", h, "critical",
                                    f"{summary}; waiting for it to take a task", g.name, h))

    def _queue_findings(self, cfg, obs, rep: StallReport, busy_of, free_of, stalled_of) -> None:
        now = obs.now
        for g in cfg.groups:
            if g.stall_timeout <= 0:
                continue
            for q in g.queues:
                qt = self.queues.get(q)
                if qt is None or qt.backlog_since is None or now - qt.backlog_since < g.stall_timeout:
                    continue
                if qt.down_at is not None and now - qt.down_at < g.stall_timeout:
                    continue
                busy, free, stalled = busy_of.get(q, []), free_of.get(q, []), stalled_of.get(q, [])
                age = fd(now - qt.backlog_since)
                if busy and not free and not stalled:
                    rep.findings.append(Finding(
                        "queue_saturated", q, "info",
                        f"queue {q}: {qt.length} messages, not draining for {age}; all {len(busy)} consumer(s) "
                        f"busy (full pools): needs more workers, not a restart", g.name, value=qt.length))
                elif len(stalled) >= 2 and not free and not busy:
                    rep.findings.append(Finding(
                        "queue_stalled", q, "critical",
                        f"queue {q}: {qt.length} messages, not draining for {age}; every consumer "
                        f"({', '.join(sorted(stalled))}) is stalled", g.name, value=qt.length))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
