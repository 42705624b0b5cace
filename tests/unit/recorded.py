"""Helpers for replaying recorded observation streams through the pure core.

``Fleet`` is a tiny model of what the shell sees: workers that heartbeat (``up``),
stopped (``down``), or hung; platform targets with their state; queues; the broker.
Each ``tick(now)`` builds an ``Observation`` exactly as ``loop.py`` does: first asks
``Core.suspects`` whom to ping, pings them (the ``up`` workers answer), then calls
``Core.decide`` and reports every executable planned restart back with ``record_restart``.
No broker, no sleep, no clock: ``now`` is whatever the test says.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from supervisor.config import Config, parse_config
from supervisor.decide import Core, Decision
from supervisor.model import Observation, QueueSeen, Target, WorkerQueues, WorkerSeen

BROKER_PASSWORD = "brokerpass-9f2c"
BROKER_URL = f"redis://:{BROKER_PASSWORD}@localhost:6379/0"


def restart_cfg(**kw: Any) -> dict:
    r = {
        "platform": "local",
        "target": "celery-{node}.service",
        "max_restarts": 3,
        "window": "30m",
        "backoff": "30s",
        "grace": "60s",
    }
    r.update(kw)
    return r


def group_cfg(
    name: str = "web",
    *,
    hostnames: list[str] | None = None,
    workers: list[str] | None = None,
    restart: dict | None | bool = True,
    **kw: Any,
) -> dict:
    g: dict[str, Any] = {"name": name, "heartbeat_timeout": "10s", "hung_timeout": "10m"}
    if hostnames is None and workers is None:
        hostnames = [f"celery@{name}-*"]
    if hostnames is not None:
        g["hostnames"] = hostnames
    if workers is not None:
        g["workers"] = workers
    if restart is True:
        g["restart"] = restart_cfg()
    elif isinstance(restart, dict):
        g["restart"] = restart
    g.update(kw)
    return g


def make_config(groups: list[dict] | None = None, queues: list[dict] | None = None, **top: Any) -> Config:
    data: dict[str, Any] = {"broker": {"url": BROKER_URL}, "groups": groups or [], "queues": queues or []}
    data.update(top)
    return parse_config(data, env={})


class Fleet:
    """A recorded world, advanced by the test, replayed through one ``Core``."""

    def __init__(self, cfg: Config, start: float = 0.0, core: Core | None = None):
        self.cfg = cfg
        self.core = core or Core(cfg)
        self.broker_ok = True
        self.broker_error: str | None = None
        self.listening_since: float | None = start
        self.one_shot = False
        self.seen: dict[str, WorkerSeen] = {}
        self.status: dict[str, str] = {}  # hostname -> up | quiet | down | hung
        self.targets: dict[str, Target] = {}  # hostname -> target
        self.queues: dict[str, QueueSeen] = {}
        self.platform_errors: dict[str, str] = {}
        self.pinged: list[frozenset[str]] = []
        self.log: list[Decision] = []
        # the census (broadcast active_queues) on every tick: workers that answer ping say what they consume
        self.census = False
        self.consumes: dict[str, frozenset[str]] = {}

    # ---- the world
    def up(self, *hostnames: str, at: float) -> None:
        """Workers that heartbeat (on every tick from now on) and answer ping."""
        for h in hostnames:
            self.status[h] = "up"
            self.seen[h] = WorkerSeen(h, last_heartbeat=at, online_at=at)

    def quiet(self, *hostnames: str) -> None:
        """Workers that send no heartbeat (--without-heartbeat; or events broken) but answer ping."""
        for h in hostnames:
            self.status[h] = "quiet"

    def down(self, *hostnames: str) -> None:
        """Workers killed without a word: no more heartbeats, no pong."""
        for h in hostnames:
            self.status[h] = "down"

    def hang(self, *hostnames: str) -> None:
        """Process alive, but no heartbeat and no pong (hung, or a solo pool busy with a long task)."""
        for h in hostnames:
            self.status[h] = "hung"

    def offline(self, hostname: str, at: float) -> None:
        """worker-offline received: a warm shutdown has begun."""
        self.status[hostname] = "down"
        self.seen[hostname] = replace(self.seen[hostname], offline_at=at)

    def target(self, hostname: str, state: str, group: str | None = None, since: float | None = None,
               tid: str | None = None, detail: str = "") -> Target:
        g = group or self.cfg.group_of(hostname).name
        old = self.targets.get(hostname)
        t = Target(tid or (old.id if old else f"{hostname.split('@')[-1]}.service"), g, hostname, state, detail, since)
        self.targets[hostname] = t
        return t

    def serve(self, hostname: str, *queues: str) -> None:
        """What a worker consumes (it says so in its census replies; ``census = True``)."""
        self.census = True
        self.consumes[hostname] = frozenset(queues)

    def queue(self, name: str, length: int | None, consumers: int | None = None, error: str | None = None) -> None:
        self.queues[name] = QueueSeen(name, length, consumers=consumers, error=error)

    def broker_down(self, error: str = "Connection refused") -> None:
        self.broker_ok, self.broker_error, self.listening_since = False, error, None

    def broker_up(self, at: float) -> None:
        self.broker_ok, self.broker_error, self.listening_since = True, None, at

    # ---- one tick of the loop
    def observation(self, now: float) -> Observation:
        if self.broker_ok:
            for h, s in self.status.items():
                if s == "up":
                    self.seen[h] = replace(self.seen[h], last_heartbeat=now, offline_at=None)
        targets: dict[str, list[Target]] = {}
        for t in self.targets.values():
            targets.setdefault(t.group, []).append(t)
        census: dict = {}
        if self.census and self.broker_ok:  # a census's replies are evidence of life too
            answering = [h for h, s in self.status.items() if s in ("up", "quiet")]
            census = {"census_at": now, "pong_at": {h: now for h in answering},
                      "worker_queues": {h: WorkerQueues(now, self.consumes.get(h, frozenset())) for h in answering}}
        return Observation(
            now=now,
            broker_ok=self.broker_ok,
            broker_error=self.broker_error,
            listening_since=self.listening_since,
            workers=dict(self.seen),
            queues=dict(self.queues) if self.broker_ok else {},
            targets={g: tuple(ts) for g, ts in targets.items()},
            platform_errors=dict(self.platform_errors),
            one_shot=self.one_shot,
            **census,
        )

    def tick(self, now: float, ok: bool = True, execute: bool = True, silenced=None) -> Decision:
        obs = self.observation(now)
        suspects = frozenset(self.core.suspects(obs))
        answering = {h for h, s in self.status.items() if s in ("up", "quiet")}
        pongs = frozenset(suspects & answering) if self.broker_ok else frozenset()
        self.pinged.append(suspects)
        d = self.core.decide(replace(obs, pinged=suspects, pongs=pongs), silenced=silenced)
        if execute:
            for p in d.plans:
                if not p.blocked:  # the shell never executes a blocked plan
                    self.core.record_restart(p, now, ok)
        self.log.append(d)
        return d

    def run(self, start: float, stop: float, step: float = 5.0, **kw: Any) -> list[Decision]:
        """Ticks at start, start+step, ... up to and including stop."""
        out = []
        t = start
        while t <= stop + 1e-9:
            out.append(self.tick(t, **kw))
            t += step
        return out


# ---- reading decisions as an operator would
def fired(d: Decision | list[Decision]) -> list[str]:
    ds = d if isinstance(d, list) else [d]
    return [t.key for x in ds for t in x.transitions if t.new == "firing"]


def resolved(d: Decision | list[Decision]) -> list[str]:
    ds = d if isinstance(d, list) else [d]
    return [t.key for x in ds for t in x.transitions if t.new == "resolved"]


def restarts(d: Decision | list[Decision]) -> list[str]:
    ds = d if isinstance(d, list) else [d]
    return [p.hostname for x in ds for p in x.plans]


def status(d: Decision, hostname: str) -> str:
    return next(v.status for v in d.verdicts if v.hostname == hostname)


def finding_keys(d: Decision) -> set[str]:
    return {f.key for f in d.findings}
