"""Benchmark: does a worker that is down (and stays down) slow the supervisor's tick, and what do
the supervisor's pings cost the broker?

Everything is real: a private redis-server on a free port (supervisor.embedded_redis), `--workers`
(12) real Celery workers (`celery -A supervisor.demo_app worker --pool solo --without-mingle
--without-gossip`, plus `--without-heartbeat` with `--no-heartbeat`) started through the `local`
adapter, and a real `supervisor run -c CONFIG --log-level DEBUG` subprocess watching them as one
alert-only group (no `restart:` section: a worker that dies stays down, and nothing tells the
supervisor it died but its silence and its missing pong).

Phases, each `--phase` (60 s) long, after a `--settle` (15 s) start:

  up    every worker runs;
  down  `--kill` (10) of them were SIGKILLed (the window starts once the supervisor's ticks say so).

Per phase: the tick durations the supervisor logs (its DEBUG "tick N: ..., 0.012s" line; p50, p95,
max, nearest rank), and the pings the broker carried, counted on Redis's pidbox fanout channel
(SUBSCRIBE /<db>.celery.pidbox, each control message decoded): pings per minute to each dead worker,
to each live one, and census broadcasts (`active_queues`) per minute.

Usage:  python bench/ticks.py [--workers 12] [--kill 10] [--phase 60s] [--ping-timeout 1s]
                              [--interval 1s] [--no-heartbeat] [--json] [--keep]
Exit code 0, 2 when the setup failed, 130 on Ctrl-C. Everything started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, however this file is run
from _common import (  # noqa: E402
    PERCENTILE_METHOD,
    Fleet,
    SetupError,
    fmt_s,
    log,
    read_pid,
    run_bench,
    summary,
    worker_restart,
)


class PidboxCounter:
    """Every remote-control message the broker carries, from Redis's pidbox fanout channel."""

    def __init__(self, url: str, db: int):
        import redis

        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(f"/{db}.celery.pidbox")
        self.lock = threading.Lock()
        self.pings: dict[str, int] = {}  # destination hostname -> pings
        self.broadcasts: dict[str, int] = {}  # method -> messages without a destination
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pidbox", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            m = self.pubsub.get_message(timeout=0.2)
            if not m or m["type"] != "message":
                continue
            try:
                body = json.loads(base64.b64decode(json.loads(m["data"])["body"]))
            except (ValueError, KeyError, TypeError):
                continue
            method, dest = body.get("method", "?"), body.get("destination")
            with self.lock:
                if dest:
                    if method == "ping":
                        for h in dest:
                            self.pings[h] = self.pings.get(h, 0) + 1
                else:
                    self.broadcasts[method] = self.broadcasts.get(method, 0) + 1

    def take(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            out = (self.pings, self.broadcasts)
            self.pings, self.broadcasts = {}, {}
            return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.pubsub.close()
        self.client.close()


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    ticks: dict = field(default_factory=dict)
    durations: list = field(default_factory=list)
    pings_per_min_dead: dict = field(default_factory=dict)  # p50/max over the dead workers
    pings_per_min_live: dict = field(default_factory=dict)
    broadcasts_per_min: dict = field(default_factory=dict)


@dataclass
class Bench:
    args: argparse.Namespace
    fleet: Fleet = field(default_factory=Fleet)
    counter: PidboxCounter | None = None

    def setup(self) -> None:
        import yaml

        a, f = self.args, self.fleet
        url = f.open("bench-ticks-")
        self.hosts = [f"celery@ticks-{i}" for i in range(1, a.workers + 1)]
        restart = worker_restart(url, max_restarts=0)
        if a.no_heartbeat:
            restart["target"] = restart["target"].replace("--without-gossip", "--without-gossip --without-heartbeat")
        doc = {
            "broker": {"url": url},
            "loop": {"interval": a.interval, "state_path": str(Path(f.tmp) / "state.db"),
                     "ping_timeout": a.ping_timeout},
            "platforms": {"local": {"run_dir": str(f.run_dir)}},
            "ha": {"lease": "off"},
            "groups": [{"name": "ticks", "hostnames": ["celery@ticks-*"], "heartbeat_timeout": a.heartbeat_timeout,
                        "restart": restart}],
        }
        took = f.start_workers(doc, self.hosts, 120)
        log(f"started {a.workers} workers in {took:.1f}s")
        # the supervisor watches them as an alert-only group: a dead worker stays dead
        del doc["groups"][0]["restart"]
        f.config_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        self.counter = PidboxCounter(url, 0)
        f.start_supervisor("DEBUG")

    def _phase(self, name: str, seconds: float, dead: list[str]) -> Phase:
        f = self.fleet
        first = f.suplog.tick_count()
        self.counter.take()
        t0 = time.monotonic()
        time.sleep(seconds)
        took = time.monotonic() - t0
        pings, broadcasts = self.counter.take()
        durations = f.suplog.tick_durations(first)
        per_min = 60.0 / took
        live = [h for h in self.hosts if h not in dead]

        def spread(hosts):
            vals = [pings.get(h, 0) * per_min for h in hosts]
            return {"p50": summary(vals)["p50"], "max": max(vals)} if vals else {}

        return Phase(name, round(took, 1), {k: v for k, v in summary(durations).items()}, durations,
                     spread(dead), spread(live), {k: round(v * per_min, 2) for k, v in broadcasts.items()})

    def run(self) -> dict:
        a, f = self.args, self.fleet
        time.sleep(a.settle)
        up = self._phase("up", a.phase, [])
        dead = self.hosts[-a.kill:] if a.kill else []
        for h in dead:
            rec = read_pid(f.pid_path(h))
            if rec is not None:
                os.kill(rec[0], signal.SIGKILL)
        log(f"killed {len(dead)} workers; waiting for the supervisor to judge them lost")
        alive_now = a.workers - len(dead)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with f.suplog.lock:
                last = f.suplog.ticks[-1] if f.suplog.ticks else None
            if last is not None and last[3] == alive_now:
                break
            time.sleep(0.2)
        time.sleep(2)
        down = self._phase("down", a.phase, dead)
        return {"setup": {"workers": a.workers, "killed": len(dead), "interval": a.interval,
                          "ping_timeout": a.ping_timeout, "heartbeat_timeout": a.heartbeat_timeout,
                          "heartbeats": not a.no_heartbeat, "percentiles": PERCENTILE_METHOD,
                          **f.environment(None)},
                "phases": [up.__dict__, down.__dict__]}

    def cleanup(self) -> list[str]:
        if self.counter is not None:
            self.counter.close()
        return self.fleet.stop(self.args.keep)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--kill", type=int, default=10)
    p.add_argument("--phase", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--settle", type=float, default=15.0)
    p.add_argument("--interval", default="1s")
    p.add_argument("--ping-timeout", default="1s")
    p.add_argument("--heartbeat-timeout", default="10s")
    p.add_argument("--no-heartbeat", action="store_true", help="workers started with --without-heartbeat")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    if not 0 <= a.kill <= a.workers:
        p.error("--kill must be between 0 and --workers")
    res, code = run_bench(Bench(a), lambda r: 0)
    if res is None:
        return code
    if a.json:
        print(json.dumps(res, indent=2, default=str))
        return code
    s = res["setup"]
    print(f"{s['workers']} workers ({'heartbeats' if s['heartbeats'] else '--without-heartbeat'}), interval "
          f"{s['interval']}, ping_timeout {s['ping_timeout']}, heartbeat_timeout {s['heartbeat_timeout']}")
    print(f"{'phase':<6} {'ticks':>5} {'p50':>8} {'p95':>8} {'max':>8}  pings/min per dead worker (p50/max), "
          f"per live worker (p50/max), broadcasts/min")
    for ph in res["phases"]:
        t = ph["ticks"]
        d, lv = ph["pings_per_min_dead"], ph["pings_per_min_live"]
        dead = f"{d['p50']:.1f}/{d['max']:.1f}" if d else "-"
        live = f"{lv['p50']:.1f}/{lv['max']:.1f}" if lv else "-"
        print(f"{ph['name']:<6} {t['n']:>5} {fmt_s(t['p50']):>8} {fmt_s(t['p95']):>8} {fmt_s(t['max']):>8}  "
              f"{dead:>9}  {live:>9}  {ph['broadcasts_per_min'] or '-'}")
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SetupError as e:
        log(f"setup failed: {e}")
        sys.exit(2)
