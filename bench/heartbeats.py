"""Benchmark: what following worker heartbeats costs, three ways, against the same load in one run.

Load (a `--load` subprocess): `--workers` (500) fake workers each sending `worker-heartbeat` every
2 s (staggered: 250 events/s), plus `--task-rate` (1000) `task-succeeded` events/s, all published on
a private redis-server (supervisor.embedded_redis, a free port) exactly as kombu publishes celery's
events: PUBLISH of kombu's envelope (JSON, base64 body) to `/{db}.celeryev/<routing key>`.

Followers, each its own process, all running at the same time against that load:

  celery   celery's own `EventReceiver` bound to `worker.#` feeding `celery.events.state.State`
           (what a monitor built on celery does, Flower minus its `#` binding)
  kombu    the supervisor's `EventReceiverSource` (celery's receiver in a thread) as it was: one
           wake-up per message (`batch_interval=0`)
  kombu-batched  the same, sleeping 50 ms after each batch it reads (its default now on Redis;
           on Redis the supervisor uses `lean`, so this is the escape hatch's cost)
  lean     the supervisor's `RedisHeartbeatSource` (redis-py PSUBSCRIBE on kombu's pattern, RESP2,
           drain then sleep 200 ms), what `supervisor run` uses on Redis

After `--warmup` (15 s), `--rounds` (6) windows of `--window` (10 s): in each window the CPU time
(utime+stime from /proc, all threads) of every follower over the same wall-clock interval, as % of
one core. Printed per follower: median and range of the windows, RSS at the end, and how many of the
workers each follower holds alive (heard within 6 s); then the per-window ratios to `celery`
(median and range). The machine is shared: the ratios, measured in the same windows, mean more than
the absolute figures.

Usage:  python bench/heartbeats.py [--workers 500] [--task-rate 1000] [--warmup 15s] [--window 10s]
                                   [--rounds 6] [--json]
Exit code 0, 1 when a follower did not see every worker alive, 2 when the setup failed.
Everything started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/_common.py, however this file is run
sys.path.insert(0, str(HERE.parent))  # the supervisor package from this tree
from _common import log, proc_cpu, proc_status_kb  # noqa: E402

FOLLOWERS = ("celery", "kombu", "kombu-batched", "lean")
ALIVE_WITHIN = 6.0
REPORT_EVERY = 2.0


def parse_seconds(text: str) -> float:
    from supervisor.durations import parse_duration

    return float(parse_duration(text))


# ---------------------------------------------------------------- the load
def envelope(event: dict, routing_key: str) -> bytes:
    """What kombu's redis transport PUBLISHes for an event (checked against a capture of celery
    5.7 / kombu 5.7: same keys, base64 body, json content type)."""
    body = base64.b64encode(json.dumps(event).encode()).decode()
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"hostname": event["hostname"]},
        "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": routing_key},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }).encode()


def run_load(url: str, workers: int, task_rate: float) -> None:
    import redis

    r = redis.Redis.from_url(url)
    db = r.connection_pool.connection_kwargs.get("db", 0)
    hb_channel, task_channel = f"/{db}.celeryev/worker.heartbeat", f"/{db}.celeryev/task.succeeded"
    hosts = [f"celery@bench-{i}" for i in range(workers)]
    tick = 0.02
    start = time.monotonic()
    sent_hb = sent_task = 0
    clock = 0
    pid = os.getpid()
    for h in hosts:  # everyone comes online first
        clock += 1
        r.publish(f"/{db}.celeryev/worker.online", envelope(
            {"hostname": h, "utcoffset": 0, "pid": pid, "clock": clock, "freq": 2.0, "timestamp": time.time(),
             "type": "worker-online"}, "worker.online"))
    while True:
        now = time.monotonic() - start
        pipe = r.pipeline(transaction=False)
        due_hb = int(now / 2.0 * workers) - sent_hb  # staggered: workers/2 heartbeats a second
        for _ in range(max(0, due_hb)):
            h = hosts[sent_hb % workers]
            clock += 1
            pipe.publish(hb_channel, envelope(
                {"hostname": h, "utcoffset": 0, "pid": pid, "clock": clock, "freq": 2.0, "active": 1,
                 "processed": sent_hb, "loadavg": [0.1, 0.1, 0.1], "sw_ident": "py-celery", "sw_ver": "5.7.0",
                 "sw_sys": "Linux", "timestamp": time.time(), "type": "worker-heartbeat"}, "worker.heartbeat"))
            sent_hb += 1
        due_task = int(now * task_rate) - sent_task
        for _ in range(max(0, due_task)):
            clock += 1
            pipe.publish(task_channel, envelope(
                {"hostname": hosts[sent_task % workers], "utcoffset": 0, "pid": pid, "clock": clock,
                 "uuid": str(uuid.uuid4()), "result": "'ok'", "runtime": 0.001, "timestamp": time.time(),
                 "type": "task-succeeded"}, "task.succeeded"))
            sent_task += 1
        pipe.execute()
        time.sleep(max(0.0, tick - (time.monotonic() - start - now)))


# ---------------------------------------------------------------- the followers
def report(workers: int, alive: int, extra: dict | None = None) -> None:
    print(json.dumps({"workers": workers, "alive": alive, **(extra or {})}), flush=True)


def run_follower(kind: str, url: str) -> None:
    if kind == "celery":
        from celery import Celery
        from celery.events.state import State

        app = Celery("bench-follower", broker=url, set_as_current=False)
        state = State()

        def reporter() -> None:
            while True:
                time.sleep(REPORT_EVERY)
                ws = list(state.workers.values())
                report(len(ws), sum(1 for w in ws if w.alive))

        threading.Thread(target=reporter, daemon=True).start()
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": state.event}, routing_key="worker.#")
            recv.capture(limit=None, timeout=None, wakeup=False)
        return
    from supervisor.config import BrokerConfig
    from supervisor.observe.celeryapp import make_app
    from supervisor.observe.heartbeats import EventReceiverSource
    from supervisor.observe.redis_heartbeats import RedisHeartbeatSource

    broker = BrokerConfig(url=url)
    app = make_app(broker)
    # as `supervisor run` builds them (the lean one is what make_source picks on Redis)
    if kind == "kombu":
        src = EventReceiverSource(app, batch_interval=0)
    elif kind == "kombu-batched":
        src = EventReceiverSource(app)
    else:
        src = RedisHeartbeatSource(broker, app=app)
    src.start()
    while True:
        time.sleep(REPORT_EVERY)
        snap = src.snapshot()
        now = time.time()
        report(len(snap.workers), sum(1 for w in snap.workers.values()
                                      if w.last_heartbeat and now - w.last_heartbeat < ALIVE_WITHIN),
               {"other_events": src.other_events, "bad": src.bad_messages})


class Child:
    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.last: dict = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.last = json.loads(line)
            except ValueError:
                pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


# ---------------------------------------------------------------- the run
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=500)
    p.add_argument("--task-rate", type=float, default=1000.0)
    p.add_argument("--warmup", default="15s")
    p.add_argument("--window", default="10s")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", action="store_true")
    p.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--follow", nargs=2, metavar=("KIND", "URL"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.load:
        run_load(a.load, a.workers, a.task_rate)
        return 0
    if a.follow:
        run_follower(*a.follow)
        return 0

    from supervisor.embedded_redis import RedisServer

    server = RedisServer().start()
    url = f"{server.url}/0"
    me = [sys.executable, str(Path(__file__).resolve())]
    children: list[Child] = []
    try:
        followers = {k: Child(k, [*me, "--follow", k, url]) for k in FOLLOWERS}
        children += followers.values()
        time.sleep(3)  # subscribed before the workers come online
        children.append(Child("load", [*me, "--load", url, "--workers", str(a.workers),
                                       "--task-rate", str(a.task_rate)]))
        log(f"{a.workers} workers heartbeating every 2s + {a.task_rate:g} task events/s on {url}; "
            f"warm-up {a.warmup}")
        time.sleep(parse_seconds(a.warmup))
        window = parse_seconds(a.window)
        cpu: dict[str, list[float]] = {k: [] for k in FOLLOWERS}
        load_cpu: list[float] = []
        for n in range(a.rounds):
            pids = {k: c.proc.pid for k, c in followers.items()}
            t0, c0 = time.monotonic(), {k: proc_cpu(pid) for k, pid in pids.items()}
            l0 = proc_cpu(children[-1].proc.pid)
            time.sleep(window)
            t1, c1 = time.monotonic(), {k: proc_cpu(pid) for k, pid in pids.items()}
            l1 = proc_cpu(children[-1].proc.pid)
            for k in FOLLOWERS:
                if c0[k] is None or c1[k] is None:
                    raise RuntimeError(f"follower {k} died (exit {followers[k].proc.poll()})")
                cpu[k].append(100.0 * (c1[k] - c0[k]) / (t1 - t0))
            if l0 is not None and l1 is not None:
                load_cpu.append(100.0 * (l1 - l0) / (t1 - t0))
            log(f"window {n + 1}/{a.rounds}: " + ", ".join(f"{k} {cpu[k][-1]:.2f}%" for k in FOLLOWERS))
        result = {"workers": a.workers, "task_rate": a.task_rate, "window_s": window, "rounds": a.rounds,
                  "load_cpu_pct": round(statistics.median(load_cpu), 2) if load_cpu else None,
                  "followers": {}, "ratios_to_celery": {}}
        for k, c in followers.items():
            result["followers"][k] = {
                "cpu_pct_median": round(statistics.median(cpu[k]), 3),
                "cpu_pct_min": round(min(cpu[k]), 3), "cpu_pct_max": round(max(cpu[k]), 3),
                "rss_mb": round((proc_status_kb(c.proc.pid, "VmRSS") or 0) / 1024, 1),
                "hwm_mb": round((proc_status_kb(c.proc.pid, "VmHWM") or 0) / 1024, 1),
                "workers_alive": c.last.get("alive"), "workers_known": c.last.get("workers"),
                "other_events": c.last.get("other_events"),
            }
        for k in FOLLOWERS[1:]:
            ratios = [x / y for x, y in zip(cpu[k], cpu["celery"], strict=True) if y > 0]
            result["ratios_to_celery"][k] = {"median": round(statistics.median(ratios), 3),
                                             "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    finally:
        for c in reversed(children):
            c.stop()
        server.close()

    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{a.workers} workers (heartbeat every 2 s) + {a.task_rate:g} task events/s on Redis; "
              f"{a.rounds} windows of {window:g}s, all followers at once (load generator "
              f"{result['load_cpu_pct']}% of a core)")
        print(f"{'follower':14} {'CPU % of one core (median [min-max])':38} {'RSS MB':>7} {'alive':>9}")
        for k, f in result["followers"].items():
            rng = f"{f['cpu_pct_median']:.2f} [{f['cpu_pct_min']:.2f}-{f['cpu_pct_max']:.2f}]"
            print(f"{k:14} {rng:38} {f['rss_mb']:7.1f} {f['workers_alive']!s:>5}/{a.workers}")
        for k, r in result["ratios_to_celery"].items():
            print(f"{k} / celery CPU, per window: median {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]")
    ok = all(f["workers_alive"] == a.workers for f in result["followers"].values())
    if not ok:
        log("not every follower held every worker alive")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
