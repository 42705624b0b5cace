"""Benchmark: what `supervisor run` costs on a big fleet, against celery's own event receiver, same load, same run.

Load (`--load-procs` subprocesses): `--workers` (500) fake workers, each with celery's own
`EventDispatcher` (hostname celery@fleet-N) on a private redis-server (supervisor.embedded_redis, a free
port): one `worker-online`, then `worker-heartbeat` every 2 s with the fields celery's `Heart` sends
(staggered: N/2 heartbeats a second), plus `--task-rate` (5000) task events a second (task-received,
-started, -succeeded in turn) spread over the workers. Task events go through the dispatcher's group
buffer, as a prefork worker sends them (`buffer_group=['task']`, flushed as one `task.multi` message every
`--task-batch` (24, celery's buffer_limit) events; `--task-batch 1` publishes each one on its own, as a
solo or threads worker does). Neither follower may receive them.

Followers, running at the same time against that load:

  supervisor  a real `supervisor run -c CONFIG` subprocess: one alert-only group `celery@fleet-*` with
              min_workers N, loop.interval `--interval` (5 s, the default), its state file in a
              temporary folder, logging at INFO (nothing per tick on a healthy fleet)
  celery      celery's `EventReceiver` bound to `worker.#` feeding `celery.events.state.State`
              (what a monitor built on celery does; bench/heartbeats.py's `celery` follower)

After `--warmup` (20 s), `--rounds` windows of `--window` (30 s): CPU time (utime + stime from
/proc/PID/stat, every thread, children not) of both over the same wall-clock interval, as % of one core,
and the supervisor's RSS at the end of each window. /proc counts CPU in 10 ms ticks, so a 30 s window
resolves 0.03 % of a core. Printed: per window, then per follower median and range, the per-window ratio
supervisor / celery (median and range), the supervisor's RSS after each window (first, last, max,
growth), the event rates the load achieved, and how many workers `supervisor status --json` says are
alive (exit 1 unless all N, and unless the ratio's median is at most `--max-ratio` when given).

A 10-minute memory run:  python bench/fleet.py --window 60s --rounds 10
Usage:  python bench/fleet.py [--workers 500] [--task-rate 5000] [--task-batch 24] [--interval 5s]
                              [--warmup 20s] [--window 30s] [--rounds 4] [--max-ratio 0.2] [--json] [--keep]
Exit code 0; 1 when a check above failed; 2 when the setup failed; 130 on Ctrl-C.
Everything started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/_common.py, however this file is run
sys.path.insert(0, str(HERE.parent))  # the supervisor package from this tree
from _common import HZ, log, proc_cpu, proc_status_kb, stop_supervisor  # noqa: E402
from heartbeats import Child, parse_seconds, run_follower  # noqa: E402

REPORT_EVERY = 2.0
HEARTBEAT_EVERY = 2.0  # celery's worker_heartbeat default
TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


# ---------------------------------------------------------------- the load
def run_load(url: str, workers: range, task_rate: float, task_batch: int) -> None:
    """Workers ``workers`` of the fleet, each its own EventDispatcher on one shared connection."""
    import uuid

    from celery import Celery

    app = Celery("bench-fleet-load", broker=url, set_as_current=False)
    conn = app.connection_for_write()
    conn.ensure_connection(max_retries=3)
    buffered = ["task"] if task_batch > 1 else None
    dispatchers = [app.events.Dispatcher(conn, hostname=f"celery@fleet-{i}", buffer_group=buffered,
                                         buffer_limit=task_batch) for i in workers]
    sw = {"sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}
    for d in dispatchers:
        d.send("worker-online", freq=HEARTBEAT_EVERY, **sw)
    n = len(dispatchers)
    processed = [0] * n
    sent_hb = sent_task = 0
    start = last_report = time.monotonic()
    while True:
        now = time.monotonic() - start
        due = int(now / HEARTBEAT_EVERY * n) - sent_hb  # staggered: n/2 heartbeats a second
        for _ in range(max(0, due)):
            k = sent_hb % n
            dispatchers[k].send("worker-heartbeat", freq=HEARTBEAT_EVERY, active=1, processed=processed[k],
                                loadavg=[0.1, 0.1, 0.1], retry=True, **sw)
            sent_hb += 1
        due = int(now * task_rate) - sent_task
        for _ in range(max(0, due)):
            k = sent_task % n
            kind = TASK_EVENTS[(sent_task // n) % 3]
            fields = {"uuid": str(uuid.uuid4())}
            if kind == "task-succeeded":
                fields.update(result="'ok'", runtime=0.001)
                processed[k] += 1
            elif kind == "task-received":
                fields.update(name="bench.task", args="()", kwargs="{}", retries=0)
            dispatchers[k].send(kind, **fields)
            sent_task += 1
        t = time.monotonic()
        if t - last_report >= REPORT_EVERY:
            last_report = t
            print(json.dumps({"heartbeats": sent_hb, "task_events": sent_task, "at": t}), flush=True)
        time.sleep(max(0.0, 0.02 - (t - start - now)))


def load_rates(marks: list[tuple[dict, dict]]) -> dict:
    """Heartbeats and task events per second the load processes achieved between two readings each."""
    hb = task = 0.0
    for before, after in marks:
        dt = after.get("at", 0) - before.get("at", 0)
        if dt > 0:
            hb += (after["heartbeats"] - before["heartbeats"]) / dt
            task += (after["task_events"] - before["task_events"]) / dt
    return {"heartbeats_per_s": round(hb, 1), "task_events_per_s": round(task, 1)}


# ---------------------------------------------------------------- the supervisor
def write_config(tmp: Path, url: str, workers: int, interval: str) -> Path:
    import yaml

    doc = {
        "version": 1,
        "broker": {"url": url},
        "loop": {"interval": interval, "state_path": str(tmp / "state.db")},
        "groups": [{"name": "fleet", "hostnames": ["celery@fleet-*"], "min_workers": workers}],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (the supervisor names its own threads, supervisor/osthread.py; the
    rest show as the interpreter's name), summed over the threads of one name."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            data = (task / "stat").read_bytes()
        except OSError:
            continue
        f = data[data.rfind(b")") + 2:].split()
        out[comm] = out.get(comm, 0.0) + (int(f[11]) + int(f[12])) / HZ
    return out


def status_alive(config: Path) -> tuple[int | None, int | None, str]:
    """(alive, known) workers as `supervisor status --json` shows them, and what went wrong if anything."""
    p = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "-c", str(config)],
                       capture_output=True, text=True, timeout=60)
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        return None, None, f"status exited {p.returncode}: {(p.stderr or p.stdout)[-300:]}"
    workers = doc.get("workers") or []
    return sum(1 for w in workers if w.get("alive")), len(workers), ""


# ---------------------------------------------------------------- the run
def measure(a, tmp: Path) -> dict:
    from supervisor.embedded_redis import RedisServer

    server = RedisServer().start()
    url = f"{server.url}/0"
    me = [sys.executable, str(Path(__file__).resolve())]
    children: list[Child] = []
    sup = None
    sup_log = open(tmp / "supervisor.log", "w")  # noqa: SIM115 (closed in finally, after the supervisor)
    try:
        config = write_config(tmp, url, a.workers, a.interval)
        sup = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(config), "--log-level", "INFO"],
                               cwd=tmp, stdin=subprocess.DEVNULL, stdout=sup_log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        celery = Child("celery", [*me, "--follow-celery", url])
        children.append(celery)
        time.sleep(4)  # both subscribed before the workers come online
        if sup.poll() is not None:
            raise RuntimeError(f"supervisor run exited {sup.returncode}: see {tmp / 'supervisor.log'}")
        procs = max(1, a.load_procs)
        loads = [Child(f"load{k}", [*me, "--load", url, "--workers", str(a.workers), "--task-rate",
                                    str(a.task_rate), "--task-batch", str(a.task_batch), "--part", f"{k}/{procs}"])
                 for k in range(procs)]
        children += loads
        log(f"{a.workers} workers (celery EventDispatcher, heartbeat every 2 s) + {a.task_rate:g} task events/s "
            f"(batches of {a.task_batch}) on {url}; supervisor pid {sup.pid}, celery receiver pid "
            f"{celery.proc.pid}; warm-up {a.warmup}")
        time.sleep(parse_seconds(a.warmup))
        window = parse_seconds(a.window)
        pids = {"supervisor": sup.pid, "celery": celery.proc.pid}
        cpu: dict[str, list[float]] = {k: [] for k in pids}
        threads: dict[str, list[float]] = {}  # the supervisor's CPU per thread name, per window
        rss: list[float] = []
        marks0 = [dict(c.last) for c in loads]
        for n in range(a.rounds):
            t0, c0, th0 = time.monotonic(), {k: proc_cpu(p) for k, p in pids.items()}, thread_cpu(sup.pid)
            time.sleep(window)
            t1, c1, th1 = time.monotonic(), {k: proc_cpu(p) for k, p in pids.items()}, thread_cpu(sup.pid)
            for name, secs in th1.items():
                threads.setdefault(name, []).append(100.0 * (secs - th0.get(name, 0.0)) / (t1 - t0))
            for k in pids:
                if c0[k] is None or c1[k] is None:
                    raise RuntimeError(f"{k} (pid {pids[k]}) died; see {tmp}")
                cpu[k].append(100.0 * (c1[k] - c0[k]) / (t1 - t0))
            rss.append((proc_status_kb(sup.pid, "VmRSS") or 0) / 1024)
            ratio = cpu["supervisor"][-1] / cpu["celery"][-1] if cpu["celery"][-1] else float("nan")
            log(f"window {n + 1}/{a.rounds}: supervisor {cpu['supervisor'][-1]:.2f}%, celery "
                f"{cpu['celery'][-1]:.2f}% ({ratio:.2f}x); supervisor RSS {rss[-1]:.1f} MB")
        rates = load_rates(list(zip(marks0, [dict(c.last) for c in loads], strict=True)))
        alive, known, why = status_alive(config)
        ratios = [s / c for s, c in zip(cpu["supervisor"], cpu["celery"], strict=True) if c > 0]
        return {
            "workers": a.workers, "task_rate": a.task_rate, "task_batch": a.task_batch, "interval": a.interval,
            "window_s": window, "rounds": a.rounds, "load": rates,
            "cpu_pct": {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                            "max": round(max(v), 3), "windows": [round(x, 3) for x in v]} for k, v in cpu.items()},
            "ratio": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                      "max": round(max(ratios), 3)} if ratios else None,
            "supervisor_rss_mb": {"windows": [round(x, 1) for x in rss], "first": round(rss[0], 1),
                                  "last": round(rss[-1], 1), "max": round(max(rss), 1),
                                  "growth": round(rss[-1] - rss[0], 1),
                                  "hwm": round((proc_status_kb(sup.pid, "VmHWM") or 0) / 1024, 1)},
            "supervisor_threads_cpu_pct": {k: round(statistics.median(v), 3) for k, v in
                                           sorted(threads.items(), key=lambda kv: -statistics.median(kv[1]))},
            "celery_rss_mb": round((proc_status_kb(celery.proc.pid, "VmRSS") or 0) / 1024, 1),
            "celery_alive": celery.last.get("alive"),
            "supervisor_alive": alive, "supervisor_known": known, "status_problem": why,
        }
    finally:
        for c in reversed(children):
            c.stop()
        if sup is not None and sup.poll() is None:
            stop_supervisor(sup)
        sup_log.close()
        server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=500)
    p.add_argument("--task-rate", type=float, default=5000.0, help="task events per second, all workers together")
    p.add_argument("--task-batch", type=int, default=24, help="task events per message (celery's buffer_limit)")
    p.add_argument("--load-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--interval", default="5s", help="the supervisor's loop.interval")
    p.add_argument("--warmup", default="20s")
    p.add_argument("--window", default="30s")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-ratio", type=float, default=None, help="exit 1 when the median ratio is above it")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (config, log, state)")
    p.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--part", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--follow-celery", metavar="URL", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.load:
        k, of = (int(x) for x in a.part.split("/"))
        run_load(a.load, range(k, a.workers, of), a.task_rate / of, a.task_batch)
        return 0
    if a.follow_celery:
        run_follower("celery", a.follow_celery)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        r = measure(a, tmp)
    except Exception as exc:
        log(f"setup failed: {exc}")
        return 2
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        s, c, rs = r["cpu_pct"]["supervisor"], r["cpu_pct"]["celery"], r["supervisor_rss_mb"]
        print(f"{r['workers']} workers, heartbeats {r['load']['heartbeats_per_s']}/s, task events "
              f"{r['load']['task_events_per_s']}/s (batches of {r['task_batch']}); {r['rounds']} windows of "
              f"{r['window_s']:g}s; supervisor loop.interval {r['interval']}")
        print(f"{'follower':12} {'CPU % of one core (median [min-max])':38} {'RSS MB':>7} {'alive':>9}")
        print(f"{'supervisor':12} {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]{'':22} {rs['last']:7.1f} "
              f"{r['supervisor_alive']!s:>5}/{r['workers']}")
        print(f"{'celery':12} {c['median']:.2f} [{c['min']:.2f}-{c['max']:.2f}]{'':22} {r['celery_rss_mb']:7.1f} "
              f"{r['celery_alive']!s:>5}/{r['workers']}")
        if r["ratio"]:
            print(f"supervisor / celery CPU, per window: median {r['ratio']['median']:.2f}x "
                  f"[{r['ratio']['min']:.2f}-{r['ratio']['max']:.2f}]")
        print("supervisor CPU by thread (median of the windows, % of one core): " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["supervisor_threads_cpu_pct"].items() if v > 0))
        print(f"supervisor RSS per window (MB): {rs['windows']}; growth first->last {rs['growth']:+.1f} MB, "
              f"peak (VmHWM) {rs['hwm']} MB")
        if r["status_problem"]:
            print(f"supervisor status: {r['status_problem']}")
    ok = r["supervisor_alive"] == r["workers"] and r["celery_alive"] == r["workers"]
    if not ok:
        log("not every worker was alive for both followers")
    if a.max_ratio is not None and r["ratio"] and r["ratio"]["median"] > a.max_ratio:
        log(f"median ratio {r['ratio']['median']:.2f}x is above --max-ratio {a.max_ratio:g}")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
