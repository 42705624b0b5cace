"""Soak benchmark: what does a long unattended `supervisor run` cost, and does anything grow?

Everything is real, as in bench/detect.py: a private redis-server on a free port
(supervisor.embedded_redis), --workers real Celery workers (`celery -A supervisor.demo_app worker
-n celery@soak-<i> --pool solo --without-mingle --without-gossip`) started through the `local`
platform adapter in one group with explicit `workers` (min_workers = --workers), a queue entry
for the default `celery` queue with min_consumers 1 (on Redis the supervisor then broadcasts
`active_queues` to the live workers every tick), one json:// notify channel (every severity) to a
local HTTP catcher that counts deliveries, and a real `supervisor run -c CONFIG --log-level DEBUG`
subprocess at loop.interval --interval, for --duration.

The window starts once every worker answers ping and the supervisor's ticks have said "N/N
workers alive" for --settle seconds. In the window:

  every 10 s     the supervisor's VmRSS, CPU (utime + stime, /proc/PID/stat, threads included),
                 Threads (/proc/PID/status) and open fds (/proc/PID/fd), plus the machine's busy CPU
                 (/proc/stat) and how many workers run (their pid files name a live process);
  every --kill-every (default 60s; 0 turns it off)
                 SIGKILL of a random running worker (at a random phase of the supervisor's tick: up to
                 one loop.interval later); none in the last min(30 s, kill-every / 2), so that the
                 last one can be restarted inside the window;
  every tick     its DEBUG line "tick N: A/B workers alive, F findings, X actions, D.DDDs" gives the
                 tick durations and count; WARNING "restart ..." lines the restarts issued; ERROR
                 and CRITICAL lines are collected.

Printed: the setup, one row per minute (RSS, threads, fds, CPU % of one core over that minute,
ticks and the longest tick in it, the machine's CPU use and load), then a summary: CPU seconds and
% of one core over the window, RSS at minute 1 / at the end / max with the growth per hour from the
minute-1 -> end slope (and a least-squares slope over the samples from minute 1 on), threads and
fds at the start vs the end, tick durations p50/p95/max (nearest rank), ticks vs duration/interval,
restarts issued vs kills, alerts delivered, and the supervisor's ERROR lines (count, first 5).

Usage:  python bench/soak.py [--duration 10m] [--workers 20] [--interval 1s] [--kill-every 60s]
                             [--json] [--keep] [--seed N]
Exit code: 0 when the run completed, the supervisor stayed up and every kill got a restart;
1 otherwise; 2 when the setup failed; 130 on Ctrl-C or SIGTERM (the summary of what was measured
so far is still printed). Everything started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, however this file is run
from _common import (  # noqa: E402
    PERCENTILE_METHOD,
    Fleet,
    SetupError,
    fmt_s,
    log,
    nearest_rank,
    proc_cpu,
    proc_fds,
    proc_status_kb,
    run_bench,
    running_pid,
    summary,
    wait_all_ping,
    worker_restart,
)

SAMPLE_EVERY = 10.0  # seconds between two samples of the supervisor process
MINUTE = 60.0


# ---------------------------------------------------------------- the alert catcher
class Catcher:
    """A local HTTP endpoint for the json:// channel: answers 200 and records (monotonic, title, type)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.deliveries: list[tuple[float, str, str]] = []
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    data = json.loads(body) if body else {}
                except ValueError:
                    data = {}
                if not isinstance(data, dict):
                    data = {}
                with catcher.lock:
                    catcher.deliveries.append((time.monotonic(), str(data.get("title", "")), str(data.get("type", ""))))
                payload = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="catcher", daemon=True)
        self.thread.start()

    def since(self, t: float) -> list[tuple[float, str, str]]:
        with self.lock:
            return [d for d in self.deliveries if d[0] >= t]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- samples
def box_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from the first line of /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(f[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - f[3] - f[4], total


@dataclass
class Sample:
    elapsed: float  # seconds since the window started
    rss_kb: int | None
    cpu_s: float | None  # the supervisor's utime + stime since it started
    threads: int | None
    fds: int | None
    ticks: int  # tick lines seen since the window started
    workers_running: int
    box_busy: int | None = None  # machine-wide jiffies (not in the JSON)
    box_total: int | None = None
    load1: float = 0.0


@dataclass
class Kill:
    elapsed: float
    hostname: str
    pid: int
    wall: float  # time.time() at the kill
    restart_logged_s: float | None = None  # kill -> the supervisor's restart line for it (its own log stamp)
    sees_all_alive_s: float | None = None  # kill -> its first tick after that with every worker alive


@dataclass
class Soak:
    args: argparse.Namespace
    fleet: Fleet = field(default_factory=Fleet)
    catcher: Catcher | None = None
    samples: list[Sample] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    interrupted: bool = False
    sup_died: str | None = None

    # ---- setup
    def setup(self) -> None:
        from supervisor.durations import parse_duration

        a, f = self.args, self.fleet
        self.duration_s = parse_duration(a.duration)
        self.interval_s = parse_duration(a.interval)
        self.kill_every_s = parse_duration(a.kill_every)
        self.rng = random.Random(a.seed)
        # kills at kill_every, 2*kill_every, ... but none in the last stretch: the last one must be
        # restarted inside the window for "restarts issued vs kills" to compare like with like
        self.kill_tail_s = min(30.0, self.kill_every_s / 2)
        self.kill_plan = (int((self.duration_s - self.kill_tail_s) // self.kill_every_s)
                          if self.kill_every_s > 0 and self.duration_s > self.kill_tail_s else 0)
        url = f.open("bench-soak-")
        self.catcher = Catcher()
        self.hosts = [f"celery@soak-{i}" for i in range(1, a.workers + 1)]
        doc = {
            "broker": {"url": url},
            "loop": {"interval": a.interval, "state_path": str(Path(f.tmp) / "state.db"),
                     "ping_timeout": a.ping_timeout},
            "notify": {
                "channels": [{"name": "catcher", "url": f"json://127.0.0.1:{self.catcher.port}/hook",
                              "severities": ["info", "warning", "critical"], "timeout": "5s"}],
                "send_resolved": True,
                "retry": ["1s", "5s"],
            },
            "platforms": {"local": {"run_dir": str(f.run_dir)}},
            "groups": [{
                "name": "soak",
                "workers": self.hosts,
                "min_workers": a.workers,
                "queues": ["celery"],
                "heartbeat_timeout": a.heartbeat_timeout,
                # never the budget's limit: a random victim may be the same worker every time
                "restart": worker_restart(url, max_restarts=self.kill_plan + 5),
            }],
            "queues": [{"name": "celery", "min_consumers": 1}],
            "ha": {"lease": "off"},  # single replica; keeps the "no lease yet" warning out of the log
        }
        self.workers_start_s = round(f.start_workers(doc, self.hosts, 180), 1)
        log(f"started {a.workers} workers in {self.workers_start_s}s; starting `supervisor run`")
        f.start_supervisor("DEBUG")

    def running(self) -> dict[str, int]:
        out = {}
        for h in self.hosts:
            pid = running_pid(self.fleet.pid_path(h))
            if pid is not None:
                out[h] = pid
        return out

    def wait_steady(self, timeout: float) -> None:
        """Every worker answers ping and the supervisor's ticks have said N/N alive for --settle seconds."""
        f = self.fleet
        n = len(self.hosts)
        deadline = time.monotonic() + timeout
        missing = wait_all_ping(f.app, self.hosts, timeout)
        if missing:
            raise SetupError(f"not answering ping: {', '.join(missing)}; see {f.tmp}")
        while time.monotonic() < deadline:
            if f.sup.poll() is not None:
                raise SetupError(f"`supervisor run` exited with {f.sup.returncode}; see {f.tmp}/supervisor.log")
            since = f.suplog.all_alive_since(n)
            if since is not None and time.monotonic() - since >= self.args.settle:
                return
            time.sleep(0.1)
        raise SetupError(f"the supervisor's ticks did not say {n}/{n} alive for {self.args.settle}s "
                         f"within {timeout:g}s; see {f.tmp}/supervisor.log")

    # ---- the window
    def sample(self, elapsed: float) -> Sample:
        pid = self.fleet.sup.pid
        box = box_cpu()
        s = Sample(
            elapsed=round(elapsed, 2),
            rss_kb=proc_status_kb(pid, "VmRSS"),
            cpu_s=proc_cpu(pid),
            threads=proc_status_kb(pid, "Threads"),
            fds=proc_fds(pid),
            ticks=self.fleet.suplog.tick_count() - self.ticks0,
            workers_running=len(self.running()),
            box_busy=box[0] if box else None,
            box_total=box[1] if box else None,
            load1=round(os.getloadavg()[0], 2),
        )
        self.samples.append(s)
        return s

    def kill_one(self, elapsed: float) -> None:
        running = self.running()
        if not running:
            log(f"  {elapsed:7.1f}s: no worker runs: nothing to kill")
            return
        host = self.rng.choice(sorted(running))
        pid = running[host]
        wall = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as e:
            log(f"  {elapsed:7.1f}s: SIGKILL {host} (pid {pid}) failed: {e}")
            return
        self.kills.append(Kill(round(elapsed, 2), host, pid, wall))
        log(f"  {elapsed:7.1f}s: SIGKILL {host} (pid {pid})")

    def run(self) -> dict:
        a = self.args
        self.wait_steady(180)
        self.steady_after_s = round(time.monotonic() - self.fleet.sup_started, 1)
        self.startup_cpu = proc_cpu(self.fleet.sup.pid)
        self.load_start = [round(x, 2) for x in os.getloadavg()]
        self.ticks0 = self.fleet.suplog.tick_count()
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.sample(0.0)
        log(f"supervisor steady after {self.steady_after_s}s; soaking for {a.duration} "
            f"({self.kill_plan} SIGKILLs planned)")
        log(minute_header())
        next_sample = SAMPLE_EVERY
        # the window starts right after a tick line: without a random phase every kill would land just
        # after a tick, and kill -> restart would always be the worst case
        kill_times = [k * self.kill_every_s + self.rng.uniform(0, min(self.interval_s, self.kill_tail_s))
                      for k in range(1, self.kill_plan + 1)]
        end = self.duration_s
        try:
            while True:
                elapsed = time.monotonic() - self.t0
                self.fleet.adapter._reap()  # workers the bench started are its children: no zombies
                if self.fleet.sup.poll() is not None:
                    self.sup_died = f"`supervisor run` exited with {self.fleet.sup.returncode} at {elapsed:.0f}s"
                    log(self.sup_died)
                    break
                if kill_times and elapsed >= kill_times[0]:
                    kill_times.pop(0)
                    self.kill_one(elapsed)
                    continue
                if elapsed >= min(next_sample, end):
                    s = self.sample(elapsed if elapsed < end else end)
                    if round(s.elapsed) % MINUTE == 0 or elapsed >= end:
                        log(minute_row(self.minute_rows()[-1]))
                    if elapsed >= end:
                        break
                    next_sample += SAMPLE_EVERY
                    continue
                nxt = min(next_sample, end, kill_times[0] if kill_times else end)
                time.sleep(max(0.0, min(0.5, nxt - (time.monotonic() - self.t0))))
        except KeyboardInterrupt:
            self.interrupted = True
            log("interrupted: summarising what was measured so far")
            if self.fleet.sup.poll() is None:
                self.sample(time.monotonic() - self.t0)
        return self.results()

    # ---- results
    def minute_rows(self) -> list[dict]:
        """One row per whole minute of samples (and one for the last sample when it is not on a minute)."""
        rows = []
        picks = [i for i, s in enumerate(self.samples) if i and round(s.elapsed) % MINUTE == 0]
        if len(self.samples) > 1 and (not picks or picks[-1] != len(self.samples) - 1):
            picks.append(len(self.samples) - 1)
        prev = 0
        with self.fleet.suplog.lock:
            tick_lines = self.fleet.suplog.ticks[self.ticks0:]
        for i in picks:
            s, p = self.samples[i], self.samples[prev]
            wall = s.elapsed - p.elapsed
            cpu = (100 * (s.cpu_s - p.cpu_s) / wall) if s.cpu_s is not None and p.cpu_s is not None and wall > 0 else None
            box = (100 * (s.box_busy - p.box_busy) / (s.box_total - p.box_total)
                   if s.box_busy is not None and p.box_busy is not None and s.box_total > p.box_total else None)
            durations = [t[5] for t in tick_lines[p.ticks:s.ticks]]
            rows.append({
                "elapsed_s": s.elapsed,
                "rss_mb": round(s.rss_kb / 1024, 1) if s.rss_kb else None,
                "threads": s.threads,
                "fds": s.fds,
                "cpu_pct_of_one_core": round(cpu, 2) if cpu is not None else None,
                "ticks": s.ticks - p.ticks,
                "tick_max_s": max(durations) if durations else None,
                "workers_running": s.workers_running,
                "box_cpu_pct": round(box, 1) if box is not None else None,
                "load1": s.load1,
            })
            prev = i
        return rows

    def results(self) -> dict:
        n = len(self.hosts)
        samples = [s for s in self.samples if s.rss_kb is not None]
        first, last = self.samples[0], self.samples[-1]
        wall = last.elapsed - first.elapsed
        cpu = (last.cpu_s - first.cpu_s) if last.cpu_s is not None and first.cpu_s is not None else None
        # RSS: minute 1 -> the end, extrapolated per hour; plus a least-squares slope over the same samples
        m1 = next((s for s in samples if s.elapsed >= MINUTE - 0.5), None)
        rss_end = samples[-1] if samples else None
        growth = lsq = None
        if m1 is not None and rss_end is not None and rss_end.elapsed - m1.elapsed >= SAMPLE_EVERY:
            growth = (rss_end.rss_kb - m1.rss_kb) / 1024 / (rss_end.elapsed - m1.elapsed) * 3600
            pts = [(s.elapsed, s.rss_kb / 1024) for s in samples if s.elapsed >= m1.elapsed]
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            den = sum((x - mx) ** 2 for x, _ in pts)
            lsq = sum((x - mx) * (y - my) for x, y in pts) / den * 3600 if den else None
        with self.fleet.suplog.lock:
            tick_lines = list(self.fleet.suplog.ticks[self.ticks0:self.ticks0 + last.ticks])
            restarts = [r for r in self.fleet.suplog.restarts if r[0] is not None and r[0] >= self.wall0 - 0.002]
            errors = list(self.fleet.suplog.errors)
            slow = self.fleet.suplog.slow_ticks
        durations = [t[5] for t in tick_lines]
        restarts_ok = sum(r[2].rsplit(" -> ", 1)[-1].startswith("ok") for r in restarts)
        for k in self.kills:
            r, back = self.fleet.suplog.supervisor_view(k.hostname, k.wall, n)
            k.restart_logged_s = round(r, 3) if r is not None else None
            k.sees_all_alive_s = round(back, 3) if back is not None else None
        end_mono = self.t0 + last.elapsed
        deliveries = [d for d in self.catcher.since(self.t0) if d[0] <= end_mono + 0.5]
        before = len(self.catcher.since(0)) - len(self.catcher.since(self.t0))
        by_title: dict[str, int] = {}
        for _, title, typ in deliveries:
            key = f"[{typ}] {title}"
            by_title[key] = by_title.get(key, 0) + 1
        hwm = proc_status_kb(self.fleet.sup.pid, "VmHWM")
        rss_vals = [s.rss_kb for s in samples]
        return {
            "setup": self.setup_info(),
            "completed": not self.interrupted and self.sup_died is None,
            "interrupted": self.interrupted,
            "supervisor_died": self.sup_died,
            "minutes": self.minute_rows(),
            "samples": [{k: v for k, v in asdict(s).items() if not k.startswith("box_")} for s in self.samples],
            "summary": {
                "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 2) if cpu is not None else None,
                "cpu_pct_of_one_core": round(100 * cpu / wall, 2) if cpu is not None and wall > 0 else None,
                "cpu_s_startup": round(self.startup_cpu, 2) if self.startup_cpu is not None else None,
                "cpu_ms_per_tick": round(1000 * cpu / len(durations), 2) if cpu is not None and durations else None,
                "rss_mb_at_1min": round(m1.rss_kb / 1024, 1) if m1 else None,
                "rss_mb_at_end": round(rss_end.rss_kb / 1024, 1) if rss_end else None,
                "rss_mb_max_sampled": round(max(rss_vals) / 1024, 1) if rss_vals else None,
                "rss_mb_vmhwm": round(hwm / 1024, 1) if hwm else None,
                "rss_growth_mb_per_hour": round(growth, 2) if growth is not None else None,
                "rss_growth_mb_per_hour_lsq": round(lsq, 2) if lsq is not None else None,
                "threads_start": first.threads, "threads_end": last.threads,
                "threads_max": max((s.threads for s in self.samples if s.threads is not None), default=None),
                "fds_start": first.fds, "fds_end": last.fds,
                "fds_max": max((s.fds for s in self.samples if s.fds is not None), default=None),
                "ticks": len(durations),
                "ticks_expected": int(wall // self.interval_s),
                "ticks_longer_than_interval": slow,
                "tick_duration_s": {
                    "p50": nearest_rank(durations, 50), "p95": nearest_rank(durations, 95),
                    "max": max(durations) if durations else None, "n": len(durations),
                    "mean": round(sum(durations) / len(durations), 4) if durations else None,
                },
                "last_tick_alive": f"{tick_lines[-1][3]}/{tick_lines[-1][4]}" if tick_lines else None,
                "kills": len(self.kills),
                "kills_planned": self.kill_plan,
                "restarts_issued": len(restarts),
                "restarts_ok": restarts_ok,
                "kills_with_restart": sum(k.restart_logged_s is not None for k in self.kills),
                "kill_to_restart_logged_s": summary([k.restart_logged_s for k in self.kills
                                                     if k.restart_logged_s is not None]),
                "kill_to_all_alive_s": summary([k.sees_all_alive_s for k in self.kills
                                                if k.sees_all_alive_s is not None]),
                "alerts_delivered": len(deliveries),
                "alerts_before_window": before,
                "alerts_by_title": by_title,
                "error_lines": len(errors),
                "first_errors": errors[:5],
                "percentile_method": PERCENTILE_METHOD,
            },
            "kills": [asdict(k) for k in self.kills],
            "restarts": [r[2] for r in restarts],
        }

    def setup_info(self) -> dict:
        a = self.args
        return {
            "workers": a.workers,
            "hostnames": [self.hosts[0], self.hosts[-1]] if self.hosts else [],
            "duration": a.duration,
            "interval": a.interval,
            "kill_every": a.kill_every if self.kill_every_s > 0 else "off",
            "heartbeat_timeout": a.heartbeat_timeout,
            "ping_timeout": a.ping_timeout,
            "settle_s": a.settle,
            "seed": a.seed,
            "workers_start_s": self.workers_start_s,
            "supervisor_steady_after_s": self.steady_after_s,
            "supervisor_pid": self.fleet.sup.pid,
            **self.fleet.environment(self.load_start),
        }

    # ---- cleanup (idempotent; every step on its own)
    def cleanup(self) -> list[str]:
        f = self.fleet
        done = []
        t = time.monotonic()
        msg = f.stop_supervisor()
        if msg is not None:
            done.append(f"{msg} ({time.monotonic() - t:.1f}s)")
        if f.suplog is not None:
            time.sleep(0.2)  # let the tailer read the shutdown's lines (ERRORs there count too)
            f.suplog.stop.set()
            f.suplog.thread.join(2)
        if self.catcher is not None:
            self.catcher.close()
        return done + f.stop(self.args.keep)


# ---------------------------------------------------------------- output
def minute_header() -> str:
    return (f"  {'elapsed':>8}{'RSS MB':>8}{'threads':>9}{'fds':>6}{'CPU %':>8}{'ticks':>7}{'tick max':>10}"
            f"{'workers':>9}{'box CPU %':>11}{'load1':>7}")


def minute_row(r: dict) -> str:
    def f(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    el = r["elapsed_s"]
    label = f"{int(el // 60)}m{int(el % 60):02d}s" if el % 60 >= 0.5 else f"{int(round(el) // 60)}m"
    return (f"  {label:>8}{f(r['rss_mb'], '.1f'):>8}{f(r['threads'], 'd'):>9}{f(r['fds'], 'd'):>6}"
            f"{f(r['cpu_pct_of_one_core'], '.2f'):>8}{r['ticks']:>7}{f(r['tick_max_s'], '.3f'):>10}"
            f"{r['workers_running']:>9}{f(r['box_cpu_pct'], '.1f'):>11}{r['load1']:>7.2f}")


def print_text(res: dict) -> None:
    s = res["setup"]
    m = {k: "-" if v is None else v for k, v in res["summary"].items()}  # e.g. no minute-1 sample yet
    print("celery-supervisor soak benchmark (bench/soak.py)")
    print(f"  setup: {s['workers']} workers ({s['hostnames'][0]} .. {s['hostnames'][-1]}), --pool solo, local platform, "
          f"one group with explicit workers (min_workers {s['workers']}); queue celery with min_consumers 1; "
          f"one json:// channel (every severity) to a local catcher")
    print(f"  supervisor run --log-level DEBUG: loop.interval {s['interval']}, ping_timeout {s['ping_timeout']}, "
          f"heartbeat_timeout {s['heartbeat_timeout']}; duration {s['duration']}, "
          + (f"SIGKILL of a random worker every {s['kill_every']} ({m['kills_planned']} planned)"
             if s["kill_every"] != "off" else "no SIGKILLs (--kill-every 0)"))
    print(f"  python {s['python']}, celery {s['celery']}, celery-supervisor {s['celery_supervisor']}, "
          f"redis {s['redis_version']} ({s['redis_binary']}), {s['cpus']} CPUs, Linux {s['kernel']}")
    print(f"  {s['workers']} workers answered ping {s['workers_start_s']}s after their start; the supervisor was "
          f"steady ({s['workers']}/{s['workers']} alive for {s['settle_s']}s) {s['supervisor_steady_after_s']}s after "
          f"its start, having used {m['cpu_s_startup']} CPU s; load average (1/5/15 min) {s['loadavg_at_start']} "
          f"at the window's start, {s['loadavg_at_end']} at its end")
    print(f"  percentiles: {m['percentile_method']}")
    if res["interrupted"]:
        print("  INTERRUPTED: the numbers below cover the window up to the interruption")
    if res["supervisor_died"]:
        print(f"  SUPERVISOR DIED: {res['supervisor_died']}")
    print()
    print("  per minute (CPU % of one core and box CPU % over that minute; tick max = its longest tick):")
    print(minute_header())
    for r in res["minutes"]:
        print(minute_row(r))
    print()
    print("  summary")
    print(f"    CPU: {m['cpu_s']} CPU s over {m['wall_s']} s = {m['cpu_pct_of_one_core']} % of one core "
          f"({m['cpu_ms_per_tick']} ms per tick)")
    print(f"    RSS: {m['rss_mb_at_1min']} MB at 1 min, {m['rss_mb_at_end']} MB at the end, max "
          f"{m['rss_mb_max_sampled']} MB sampled ({m['rss_mb_vmhwm']} MB VmHWM); growth "
          f"{m['rss_growth_mb_per_hour']} MB/h (minute 1 -> end), {m['rss_growth_mb_per_hour_lsq']} MB/h "
          f"(least squares from minute 1)")
    print(f"    threads: {m['threads_start']} at the start, {m['threads_end']} at the end (max {m['threads_max']}); "
          f"fds: {m['fds_start']} at the start, {m['fds_end']} at the end (max {m['fds_max']})")
    td = m["tick_duration_s"]
    print(f"    ticks: {m['ticks']} of {m['ticks_expected']} expected (window / loop.interval), "
          f"{m['ticks_longer_than_interval']} longer than loop.interval; tick duration p50 {fmt_s(td['p50'])}, "
          f"p95 {fmt_s(td['p95'])}, max {fmt_s(td['max'])}, mean {fmt_s(td['mean'])}; last tick "
          f"{m['last_tick_alive']} alive")
    kr, ka = m["kill_to_restart_logged_s"], m["kill_to_all_alive_s"]
    print(f"    kills: {m['kills']}; restarts issued: {m['restarts_issued']} ({m['restarts_ok']} ok); kills followed by "
          f"a restart of that worker: {m['kills_with_restart']}/{m['kills']}")
    if kr["n"]:
        print(f"    kill -> sup. logs restart p50 {fmt_s(kr['p50'])}, max {fmt_s(kr['max'])}; kill -> sup. sees all "
              f"alive p50 {fmt_s(ka['p50'])}, max {fmt_s(ka['max'])} (its log stamps)")
    print(f"    alerts delivered to the catcher: {m['alerts_delivered']} in the window "
          f"({m['alerts_before_window']} before it)")
    for title, count in sorted(m["alerts_by_title"].items(), key=lambda kv: -kv[1]):
        print(f"      {count:>4} x {title}")
    print(f"    supervisor log: {m['error_lines']} ERROR/CRITICAL line(s)")
    for line in m["first_errors"]:
        print(f"      {line}")
    print(f"    supervisor exit on SIGTERM: {res.get('supervisor_exit_code_on_sigterm')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", default="10m", help="the measured window (default 10m)")
    p.add_argument("--workers", type=int, default=20)
    p.add_argument("--interval", default="1s", help="loop.interval (default 1s)")
    p.add_argument("--kill-every", default="60s", help="SIGKILL a random worker this often; 0 = never (default 60s)")
    p.add_argument("--heartbeat-timeout", default="10s")
    p.add_argument("--ping-timeout", default="500ms", help="loop.ping_timeout (also bounds the active_queues call)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of N/N alive ticks before the window starts")
    p.add_argument("--seed", type=int, default=None, help="seed of the victims' choice (default: random)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (config, logs, pid files)")
    a = p.parse_args(argv)
    from supervisor.durations import parse_duration

    try:
        if parse_duration(a.duration) < SAMPLE_EVERY:
            p.error(f"--duration must be at least {SAMPLE_EVERY:g}s")
        parse_duration(a.interval)
        parse_duration(a.kill_every)
    except ValueError as e:
        p.error(str(e))
    if a.workers < 1:
        p.error("--workers must be at least 1")

    b = Soak(a)

    def exit_code(res: dict) -> int:
        if b.interrupted:
            return 130
        if not res["completed"] or res["summary"]["kills_with_restart"] < res["summary"]["kills"]:
            return 1
        return 0

    res, code = run_bench(b, exit_code)
    if res is not None:
        sup_exit, suplog = b.fleet.sup_exit, b.fleet.suplog
        res["supervisor_exit_code_on_sigterm"] = sup_exit
        with suplog.lock:  # ERROR lines of the whole log, the shutdown's included
            res["summary"]["error_lines"] = len(suplog.errors)
            res["summary"]["first_errors"] = suplog.errors[:5]
        if sup_exit != 0:
            code = code or 1
        if a.json:
            print(json.dumps(res, indent=2))
        else:
            print_text(res)
    return code


if __name__ == "__main__":
    sys.exit(main())
