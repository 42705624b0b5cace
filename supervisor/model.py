"""Plain data the decision core works on.

Everything here is immutable data, built by the observing shell (``observe/``,
``platforms/``) and read by the pure core (``rules``, ``policy``). Times are
seconds on the supervisor's own clock (``time.time()``), never a worker's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"ok": 0, "info": 0, "warning": 1, "critical": 2}

# What a platform says of a target.
PlatformState = Literal["running", "exited", "crashed", "restarting", "stopping", "missing", "unknown"]
DEAD_STATES = frozenset({"exited", "crashed"})
# verdicts that count as a living worker (group counts, `alive` in JSON): a worker busy within
# hung_timeout is healthy
LIVING = frozenset({"alive", "busy"})


@dataclass(frozen=True)
class WorkerSeen:
    """What the heartbeat stream told us about one Celery hostname."""

    hostname: str
    last_heartbeat: float | None = None  # our clock, arrival of the last worker-heartbeat/online
    online_at: float | None = None  # last worker-online
    offline_at: float | None = None  # worker-offline after the last heartbeat (graceful exit started)
    active: int | None = None  # tasks running, from the last heartbeat
    processed: int | None = None
    pid: int | None = None
    freq: float | None = None  # heartbeat interval the worker announces


@dataclass(frozen=True)
class QueueSeen:
    name: str
    length: int | None  # ready (+ unacked where the broker tells); None: could not be read
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None  # None: not measured
    error: str | None = None


@dataclass(frozen=True)
class WorkerQueues:
    """What a worker last said it consumes (its reply to ``inspect active_queues``)."""

    at: float  # our clock: when the inquiry it answered was sent
    names: frozenset[str] = frozenset()


@dataclass(frozen=True)
class WorkerStats:
    """A worker's reply to a targeted ``inspect stats`` (supervisor/stall.py asks, at a bounded rate)."""

    at: float  # our clock: when the inquiry was sent
    concurrency: int | None = None  # pool max-concurrency
    processed: int | None = None  # sum of its per-task totals (evidence for workers without heartbeats)
    pid: int | None = None


@dataclass(frozen=True)
class StallCheck:
    """A suspect's replies to targeted ``active_queues``, ``reserved`` and ``active`` (stall confirmation)."""

    at: float  # our clock: when the inquiry was sent
    queues: frozenset[str] = frozenset()
    reserved: int = 0
    active: int = 0


@dataclass(frozen=True)
class Target:
    """One thing a platform runs for a group (a process, unit, container, pod, CF instance)."""

    id: str  # the platform's name for it: unit, container name, pod name, "app/2", a command key
    group: str
    hostname: str | None  # the Celery hostname it serves, where it can be known
    state: str = "unknown"  # a PlatformState
    detail: str = ""  # "exit code -9", "CRASHED", "CrashLoopBackOff" ...
    since: float | None = None  # when it entered that state, if known (our clock)


@dataclass(frozen=True)
class RestartResult:
    ok: bool
    message: str = ""
    in_progress: bool = False  # the platform was already restarting it: nothing was done


@dataclass(frozen=True)
class Observation:
    """One tick's view of the world. Built by the shell, judged by the core."""

    now: float
    broker_ok: bool = True
    broker_error: str | None = None
    # since when the heartbeat stream has been connected without a break (None: not connected)
    listening_since: float | None = None
    stream_error: str | None = None  # why the heartbeat stream is not connected
    workers: Mapping[str, WorkerSeen] = field(default_factory=dict)
    pinged: frozenset[str] = frozenset()  # hostnames we pinged this tick
    pongs: frozenset[str] = frozenset()  # of those, the ones that answered
    # Remote control replies with their own time (our clock, when the inquiry was sent), across
    # ticks: evidence of life for workers that send no heartbeat (--without-heartbeat). The shell
    # reports what it learned; ``decide.Core`` merges it with what it remembers.
    pong_at: Mapping[str, float] = field(default_factory=dict)  # last reply to a ping (or inspect)
    noreply_at: Mapping[str, float] = field(default_factory=dict)  # last ping that got no reply
    worker_queues: Mapping[str, WorkerQueues] = field(default_factory=dict)  # last active_queues reply
    census_at: float | None = None  # the last broadcast active_queues that completed (None: none yet)
    # stall evidence from targeted remote control (supervisor/stall.py), merged by ``decide.Core``
    worker_stats: Mapping[str, WorkerStats] = field(default_factory=dict)  # last inspect stats reply
    stall_checks: Mapping[str, StallCheck] = field(default_factory=dict)  # last confirmation replies
    queues: Mapping[str, QueueSeen] = field(default_factory=dict)
    targets: Mapping[str, tuple[Target, ...]] = field(default_factory=dict)  # group -> targets
    platform_errors: Mapping[str, str] = field(default_factory=dict)  # group -> error text
    # `once`: no heartbeat history; a worker not heard during the listening window counts as silent
    one_shot: bool = False


WorkerStatus = Literal[
    "alive",  # heartbeating or answering ping
    "busy",  # silent and no pong, the platform says it runs, silent for less than hung_timeout (a solo
    #          pool running a task sends no heartbeat and answers no ping): healthy, counted as alive
    "starting",  # restarted by us, within grace
    "lost",  # silent past heartbeat_timeout, no pong, platform does not say it runs
    "dead",  # the platform reports the target exited / crashed
    "unresponsive",  # platform says it runs, but silent and no pong for hung_timeout: hung, restarted
    "stopping",  # sent worker-offline, process still running (warm shutdown)
    "retired",  # left gracefully (or its target is gone) and matched only by a glob: not expected back
    "unknown",  # cannot be judged now (broker down, stream just (re)connected)
]


@dataclass(frozen=True)
class WorkerVerdict:
    hostname: str
    group: str
    status: str  # a WorkerStatus
    reason: str
    explicit: bool = False  # named in the group's `workers`
    silent_for: float | None = None  # seconds since the last heartbeat or pong (or since we listen)
    target: Target | None = None

    @property
    def alive(self) -> bool:
        """A living worker: alive, or busy within hung_timeout."""
        return self.status in LIVING


@dataclass(frozen=True)
class Finding:
    """A condition that holds now. The rule state machine turns it into pending/firing."""

    rule: str  # worker_lost, worker_unresponsive, group_below_min, queue_backlog, ...
    subject: str  # hostname, group, queue name, target, or "broker"
    severity: str  # a Severity
    summary: str  # one line for people
    group: str | None = None
    hostname: str | None = None
    hold: float = 0.0  # seconds the condition must hold before it fires (`for:`)
    value: float | None = None

    @property
    def key(self) -> str:
        return f"{self.rule}:{self.subject}"


@dataclass(frozen=True)
class RuleState:
    """Where one finding stands: pending -> firing -> resolved (Alertmanager's `for:`)."""

    key: str
    rule: str
    subject: str
    state: str  # pending | firing | resolved
    severity: str
    summary: str
    since: float  # condition true since
    group: str | None = None
    hostname: str | None = None
    fired_at: float | None = None
    resolved_at: float | None = None


@dataclass(frozen=True)
class Transition:
    """A rule state change that people are told about."""

    key: str
    old: str | None  # None, pending, firing
    new: str  # firing | resolved
    state: RuleState
    flapping: bool = False  # fired again and again: this is the last page until it is stable


@dataclass(frozen=True)
class Action:
    kind: str  # "restart" | "alert"
    group: str | None
    target: str | None  # restart: the platform target id; alert: the channel name
    reason: str
    hostname: str | None = None
    executed: bool = False
    severity: str | None = None
    budget_left: int | None = None  # restarts left in the window after this one
    command: str | None = None  # describe(): how a person would do it by hand
    result: str | None = None  # what happened when executed (or why not)
    canary: bool = False

    def to_json(self) -> dict:
        d = {
            "kind": self.kind,
            "group": self.group,
            "target": self.target,
            "hostname": self.hostname,
            "reason": self.reason,
            "executed": self.executed,
        }
        for k in ("severity", "budget_left", "command", "result"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.canary:
            d["canary"] = True
        return d
