"""Benchmark (issue 10): false stall findings under normal bursty load, and seconds from a real stall
to its restart. Not run in CI (about 13 minutes).

Everything is real: a private redis-server on a free port, `--workers` (4) prefork Celery workers
(`--concurrency 2`, tests/support/app) started through the `local` adapter, and `supervisor run` as
a subprocess (tests/support/fleet.py). Each worker consumes a shared queue and a queue of its own;
the group has `stall_timeout: --stall-timeout` (8 s: far stricter than the 2 m default, so that any
weakness of the rule shows).

Phase 1, `--normal` (10 min): bursty load on the shared queue (a burst of 5 to 120 tasks of 0 to
1.5 s every 2 to 30 s, now and then a few of 12 s that fill slots) and trickles on the own queues.
Counted: worker_stalled / queue_stalled findings (must be 0), restarts (must be 0), and the
saturation reports (info) seen.

Phase 2, `--stalls` (6) stalls: a worker's own queue consumer is cancelled for real
(`app.control.cancel_consumer(queue, destination=[worker])`) while that queue keeps getting tasks;
measured: seconds from the cancel to the restart (the restart row's time in the state file), p50 and
p95 (nearest rank), and whether its backlog drained after.

Usage:  python bench/stall.py [--workers 4] [--normal 600] [--stalls 6] [--stall-timeout 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.embedded_redis import RedisServer  # noqa: E402
from tests.support.fleet import Fleet, local_restart  # noqa: E402


def nearest_rank(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def state_doc(f: Fleet) -> dict:
    from supervisor.state import StateStore
    from supervisor.status import document_from_state

    store = StateStore(f.cfg.loop.state_path, readonly=True)
    try:
        return document_from_state(f.cfg, store)
    finally:
        store.close()


class Load:
    """Bursty normal load in the background."""

    def __init__(self, app, shared: str, own: list[str], seed: int = 7):
        self.app, self.shared, self.own = app, shared, own
        self.rng = random.Random(seed)
        self.sent = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        rng = self.rng
        with self.app.connection_for_write() as conn:
            while not self._stop.is_set():
                for _ in range(rng.randint(5, 120)):
                    self.app.send_task("tasks.sleep", args=[round(rng.uniform(0, 1.5), 2)], queue=self.shared,
                                       connection=conn)
                    self.sent += 1
                if rng.random() < 0.2:
                    for _ in range(rng.randint(1, 6)):
                        self.app.send_task("tasks.sleep", args=[12], queue=self.shared, connection=conn)
                        self.sent += 1
                for q in self.own:
                    if rng.random() < 0.5:
                        self.app.send_task("tasks.add", args=[1, 2], queue=q, connection=conn)
                        self.sent += 1
                self._stop.wait(rng.uniform(2, 30))

    def stop(self):
        self._stop.set()
        self._t.join(30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--normal", type=float, default=600.0)
    ap.add_argument("--stalls", type=int, default=6)
    ap.add_argument("--stall-timeout", type=float, default=8.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    server = RedisServer().start()
    url = f"{server.url}/1"
    hosts = [f"celery@bst-{i}" for i in range(1, a.workers + 1)]
    shared = "bst-shared"
    own = {h: h.split("@")[1] for h in hosts}  # each worker's own queue: its {node}, "bst-N"
    f = Fleet(tmp, {
        "broker": {"url": url},
        "loop": {"interval": f"{a.interval}s"},
        "groups": [{"name": "bench", "workers": hosts, "min_workers": a.workers, "heartbeat_timeout": "6s",
                    "hung_timeout": "60s", "queues": [shared, *own.values()],
                    "stall_timeout": f"{a.stall_timeout}s",
                    "restart": local_restart(url, pool="prefork", queues=f"{shared},{{node}}",
                                             extra=("--concurrency", "2"), max_restarts=5, backoff="1s",
                                             grace="20s")}],
    })
    result: dict = {"workers": a.workers, "stall_timeout": a.stall_timeout, "interval": a.interval}
    try:
        app = f.start_workers(*hosts)
        f.run()
        time.sleep(10)
        # ---- phase 1: normal bursty load
        log(f"normal load for {a.normal:.0f}s")
        load = Load(app, shared, list(own.values()))
        saturated = 0
        false_findings: set[str] = set()
        t_end = time.monotonic() + a.normal
        while time.monotonic() < t_end:
            time.sleep(5)
            try:
                doc = state_doc(f)
            except Exception as e:  # noqa: BLE001 (a read racing a write: next sample)
                log(f"status read: {e}")
                continue
            saturated += sum(1 for x in doc.get("findings", []) if x["rule"] == "queue_saturated")
            for x in doc.get("findings", []):
                if x["rule"] in ("worker_stalled", "queue_stalled"):
                    false_findings.add(f"{x['rule']}:{x['subject']}: {x['summary']}")
        load.stop()
        out = f.output()
        fired = [ln for ln in out.splitlines() if "FIRING worker_stalled" in ln or "FIRING queue_stalled" in ln]
        doc = state_doc(f)
        result["normal"] = {"seconds": a.normal, "tasks_sent": load.sent, "false_stall_findings": len(false_findings)
                            + len(fired), "findings": sorted(false_findings), "firing_lines": fired[:10],
                            "restarts": len(doc.get("recent_restarts", [])), "saturation_samples": saturated}
        log(json.dumps(result["normal"]))
        # let the shared queue drain before the stalls
        time.sleep(30)
        # ---- phase 2: real stalls
        took, drained = [], []
        for i in range(a.stalls):
            h = hosts[i % len(hosts)]
            q = own[h]
            before = len(state_doc(f).get("recent_restarts", []))
            app.control.cancel_consumer(q, destination=[h], reply=True, timeout=5)
            t0 = time.time()
            stop = threading.Event()

            def produce(q=q, stop=stop):
                with app.connection_for_write() as conn:
                    while not stop.is_set():
                        app.send_task("tasks.add", args=[1, 2], queue=q, connection=conn)
                        stop.wait(0.5)

            th = threading.Thread(target=produce, daemon=True)
            th.start()
            deadline = time.monotonic() + a.stall_timeout + 90
            row = None
            while time.monotonic() < deadline:
                rows = state_doc(f).get("recent_restarts", [])
                if len(rows) > before:
                    row = rows[0]
                    break
                time.sleep(0.25)
            stop.set()
            th.join(5)
            if row is None:
                log(f"stall {i + 1}: {h} NOT restarted within {a.stall_timeout + 90:.0f}s")
                took.append(float("inf"))
                continue
            took.append(row["at"] - t0)
            log(f"stall {i + 1}: {h} restarted {row['at'] - t0:.1f}s after the cancel: {row['reason']}")
            d_end = time.monotonic() + 90
            ok = False
            while time.monotonic() < d_end:
                qd = next((x for x in state_doc(f).get("queues", []) if x["name"] == q), {})
                if qd.get("length") == 0:
                    ok = True
                    break
                time.sleep(1)
            drained.append(ok)
            time.sleep(a.stall_timeout)  # the worker's RESOLVED, then the next stall
        finite = [x for x in took if x != float("inf")]
        result["stalls"] = {"n": len(took), "found": len(finite), "seconds": [round(x, 2) for x in took],
                            "p50": nearest_rank(finite, 50), "p95": nearest_rank(finite, 95),
                            "backlog_drained": drained}
        out = f.output()
        result["alerts_in_log"] = {
            "firing_worker_stalled": out.count("FIRING worker_stalled"),
            "resolved_worker_stalled": out.count("RESOLVED worker_stalled"),
        }
    finally:
        f.cleanup()
        server.close()
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        n, s = result.get("normal", {}), result.get("stalls", {})
        print(f"normal load {n.get('seconds')}s, {n.get('tasks_sent')} tasks: false stall findings "
              f"{n.get('false_stall_findings')}, restarts {n.get('restarts')}")
        print(f"stalls: {s.get('found')}/{s.get('n')} restarted; stall -> restart p50 {s.get('p50')}s, "
              f"p95 {s.get('p95')}s ({s.get('seconds')}); backlog drained {s.get('backlog_drained')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
