"""Benchmark: how fast does `supervisor run` bring back a SIGKILLed Celery worker, and what does
watching cost?

Everything is real: a private redis-server on a free port (supervisor.embedded_redis), real Celery
workers (`celery -A supervisor.demo_app worker --pool solo`) started through the `local` platform
adapter, a real `supervisor run -c CONFIG` subprocess, and a real SIGKILL per trial.

Per trial (the victims go round robin over the workers):

  t0 = the SIGKILL (time.monotonic just before os.kill)
  restart issued  = first moment the victim's pid file names a new pid, or the log file gets a new
                    "--- ... celery-supervisor starts <hostname>: ..." line (both polled every 10 ms)
  answers ping    = first reply to a targeted `control.ping(destination=[h], limit=1)`, polled
                    back to back, each on a fresh connection (supervisor.observe.control.ping, the
                    supervisor's own call). An unanswered ping costs --ping-timeout plus about 0.1 s,
                    so this number carries up to ~0.2 s of polling delay: Redis broadcasts sent before
                    the new worker subscribed are lost, not queued. (Polling on one shared connection
                    instead, as a plain `app.control.ping` loop does, measured up to ~1 s late: after
                    unanswered pings, kombu's Redis client missed replies for about a second.)

Between trials it waits for a steady state: every worker answers ping and the supervisor's own
tick log has said "N/N workers alive" for --settle seconds (with --supervisor-log-level DEBUG, the
default: the supervisor then logs one short line per tick, which also gives tick durations); at
INFO it just sleeps --settle seconds after every worker answers.

Over the run: CPU seconds (utime + stime of the supervisor process, /proc/PID/stat, threads
included, children not) from the first trial's start to the end of the last trial, CPU % of one
core over that same wall time, peak RSS (VmHWM at the end, plus the max of VmRSS sampled every
100 ms).

Then (``Extra``, its own redis-server and 3 workers): heartbeat-only detection, --hb-trials
SIGKILLs of an alert-only group's workers, kill -> the supervisor logs ``FIRING worker_lost``; and
`supervisor once --json` vs `celery inspect ping` on the healthy fleet, --once-trials each,
alternated, wall time of the whole command.

Usage:  python bench/detect.py [--trials 10] [--workers 3] [--interval 1s] [--json] [--keep]
Exit code: 0 when every trial was restarted and answered ping within --timeout, 1 otherwise,
2 when the setup itself failed, 130 on Ctrl-C. Everything started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, however this file is run
from _common import (  # noqa: E402
    PERCENTILE_METHOD,
    Fleet,
    SetupError,
    add_kill_args,
    fmt_s,
    log,
    log_stamp,
    proc_cpu,
    proc_state_start,
    proc_status_kb,
    read_pid,
    run_bench,
    summary,
    wait_all_ping,
    worker_restart,
)
from _common import ping as ping_host  # noqa: E402

START_MARK = b"celery-supervisor starts "
# a worker's "ready" line (celery's default log format, local time): "[2026-01-01 12:00:00,123: INFO/MainProcess] celery@x ready."
READY_RE = re.compile(rb"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] (\S+) ready\.")


class RssSampler:
    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.max_kb = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            kb = proc_status_kb(self.pid, "VmRSS")
            if kb is not None:
                self.max_kb = max(self.max_kb, kb)
                self.samples += 1
            self.stop.wait(self.every)


class RestartWatch:
    """Polls a target's pid file and log every 10 ms (in a thread) for the replacement's start."""

    def __init__(self, pid_path: Path, log_path: Path, old_pid: int, hostname: str, t0_ref: list):
        self.pid_path, self.log_path, self.old_pid = pid_path, log_path, old_pid
        self.mark = START_MARK + hostname.encode() + b":"
        try:
            self.offset = log_path.stat().st_size
        except OSError:
            self.offset = 0
        self.t0_ref = t0_ref  # [t0] once the kill was sent
        self.t_pid: float | None = None
        self.t_log: float | None = None
        self.new_pid: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="restartwatch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        while not self.stop.is_set() and (self.t_pid is None or self.t_log is None):
            now = time.monotonic()
            if self.t_pid is None:
                rec = read_pid(self.pid_path)
                if rec is not None and rec[0] != self.old_pid:
                    self.t_pid, self.new_pid = now, rec[0]
            if self.t_log is None:
                try:
                    with open(self.log_path, "rb") as fh:
                        fh.seek(self.offset)
                        chunk = fh.read()
                except OSError:
                    chunk = b""
                if chunk:
                    self.offset += len(chunk)
                    buf = (buf + chunk)[-4096:]
                    if self.mark in buf:
                        self.t_log = now
            self.stop.wait(0.01)

    @property
    def t_first(self) -> float | None:
        seen = [t for t in (self.t_pid, self.t_log) if t is not None]
        return min(seen) if seen else None


# ---------------------------------------------------------------- the benchmark
@dataclass
class Trial:
    n: int
    victim: str
    old_pid: int
    new_pid: int | None = None
    restart_s: float | None = None  # kill -> restart issued (first of pid file / log line)
    restart_pidfile_s: float | None = None
    restart_logline_s: float | None = None
    ping_s: float | None = None  # kill -> answers ping again
    ready_s: float | None = None  # kill -> the new worker logs "ready." (its own log stamp)
    sup_restart_logged_s: float | None = None  # kill -> the supervisor logs the restart (its own log stamp)
    sup_sees_alive_s: float | None = None  # kill -> the supervisor's first tick with every worker alive again
    phase_delay_s: float | None = None  # random wait after the steady state, so kills land at any tick phase
    pings_sent: int = 0
    wait_steady_s: float | None = None  # how long we waited for the steady state before this trial
    error: str | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    fleet: Fleet = field(default_factory=Fleet)
    rss: RssSampler | None = None
    kill_walls: list = field(default_factory=list)  # (trial, time.time() at the kill)

    # ---- setup
    def setup(self) -> None:
        from supervisor.durations import parse_duration

        a, f = self.args, self.fleet
        self.interval_s = parse_duration(a.interval)
        self.rng = random.Random(a.seed)
        url = f.open("bench-detect-")
        self.hosts = [f"celery@bench-{i}" for i in range(1, a.workers + 1)]
        doc = {
            "broker": {"url": url},
            "loop": {"interval": a.interval, "state_path": str(Path(f.tmp) / "state.db"),
                     "ping_timeout": "500ms"},
            "platforms": {"local": {"run_dir": str(f.run_dir)}},
            "groups": [{
                "name": "bench",
                "workers": self.hosts,
                "min_workers": a.workers,
                "heartbeat_timeout": a.heartbeat_timeout,
                "restart": worker_restart(url, max_restarts=a.trials + 5),
            }],
        }
        took = f.start_workers(doc, self.hosts, 60)
        log(f"started {a.workers} workers in {took:.1f}s; starting `supervisor run`")
        f.start_supervisor(a.supervisor_log_level)
        self.rss = RssSampler(f.sup.pid)
        self.rss.start()

    def ping(self, host: str, timeout: float) -> bool:
        """A targeted ping with limit=1 on a fresh connection (see the module docstring)."""
        return ping_host(self.fleet.app, host, timeout)

    def wait_all_ping(self, timeout: float) -> list[str]:
        return wait_all_ping(self.fleet.app, self.hosts, timeout)

    def sup_alive(self) -> None:
        sup = self.fleet.sup
        if sup.poll() is not None:
            raise SetupError(f"`supervisor run` exited with {sup.returncode}; see {self.fleet.tmp}/supervisor.log")

    def wait_steady(self, timeout: float) -> str | None:
        """Every worker answers ping and the supervisor has been calm for --settle seconds."""
        a = self.args
        deadline = time.monotonic() + timeout
        missing = self.wait_all_ping(timeout)
        if missing:
            return f"not answering ping: {', '.join(missing)}"
        if self.args.supervisor_log_level.upper() != "DEBUG":
            time.sleep(a.settle)
            return None
        while time.monotonic() < deadline:
            self.sup_alive()
            since = self.fleet.suplog.all_alive_since(len(self.hosts))
            if since is not None and time.monotonic() - since >= a.settle:
                return None
            time.sleep(0.05)
        return f"the supervisor's ticks did not say {len(self.hosts)}/{len(self.hosts)} alive for {a.settle}s"

    # ---- one trial
    def trial(self, n: int) -> Trial:
        a = self.args
        victim = self.hosts[(n - 1) % len(self.hosts)]
        rec = read_pid(self.fleet.pid_path(victim))
        if rec is None:
            return Trial(n, victim, -1, error="no pid file")
        pid, start = rec
        st = proc_state_start(pid)
        if st is None or st[0] in ("Z", "X") or (start is not None and st[1] != start):
            return Trial(n, victim, pid, error=f"pid {pid} of the pid file is not running")
        tr = Trial(n, victim, pid)
        t0_ref: list = []
        watch = RestartWatch(self.fleet.pid_path(victim), self.fleet.log_path(victim), pid, victim, t0_ref)
        log_offset = watch.offset
        watch.start()
        # the steady state is recognised from a tick line, so without this the kill would always land
        # just after a tick: wait a random part of the interval so that it lands at any phase
        tr.phase_delay_s = round(self.rng.uniform(0, self.interval_s), 3)
        time.sleep(0.02 + tr.phase_delay_s)
        t0 = time.monotonic()
        self.kill_walls.append((tr, time.time()))
        os.kill(pid, signal.SIGKILL)
        t0_ref.append(t0)
        deadline = t0 + a.timeout
        t_ping = None
        while time.monotonic() < deadline:
            tr.pings_sent += 1
            if self.ping(victim, a.ping_timeout):
                t_ping = time.monotonic()
                break
            if self.fleet.sup.poll() is not None:
                break
        # the restart is seen before the ping in practice; give the watcher the rest of the time
        while watch.t_first is None and time.monotonic() < deadline and self.fleet.sup.poll() is None:
            time.sleep(0.01)
        watch.stop.set()
        watch.thread.join(1)
        tr.new_pid = watch.new_pid
        tr.ready_s = self.ready_after(victim, log_offset, self.kill_walls[-1][1])
        for name, t in (("restart_pidfile_s", watch.t_pid), ("restart_logline_s", watch.t_log),
                        ("restart_s", watch.t_first), ("ping_s", t_ping)):
            if t is not None:
                setattr(tr, name, round(t - t0, 4))
        if tr.restart_s is None:
            tr.error = f"no restart within {a.timeout:g}s"
        elif tr.ping_s is None:
            tr.error = f"restarted, but no ping reply within {a.timeout:g}s"
        sup = self.fleet.sup
        if sup.poll() is not None:
            tr.error = (tr.error + "; " if tr.error else "") + f"`supervisor run` exited with {sup.returncode}"
        return tr

    def ready_after(self, host: str, offset: int, kill_wall: float) -> float | None:
        """kill -> the first "<host> ready." line the worker's log got after the kill."""
        try:
            with open(self.fleet.log_path(host), "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return None
        for m in READY_RE.finditer(data):
            if m[2].decode() == host:
                st = log_stamp(m[1].decode())
                if st is not None:
                    return round(st - kill_wall, 4)
        return None

    # ---- the run
    def run(self) -> dict:
        a = self.args
        # before the first trial: the supervisor must be up and calm (imports, first ticks)
        msg = self.wait_steady(60)
        self.load_start = [round(x, 2) for x in os.getloadavg()]
        if msg:
            raise SetupError(f"no steady state after the supervisor's start: {msg}; see {self.fleet.tmp}")
        startup_cpu = proc_cpu(self.fleet.sup.pid)
        cpu0, wall0 = proc_cpu(self.fleet.sup.pid), time.monotonic()
        ticks0 = self.fleet.suplog.tick_count()
        trials: list[Trial] = []
        for n in range(1, a.trials + 1):
            if n > 1:
                ts = time.monotonic()
                msg = self.wait_steady(a.timeout)
                waited = time.monotonic() - ts
                if msg:
                    trials.append(Trial(n, self.hosts[(n - 1) % len(self.hosts)], -1,
                                        error=f"no steady state before the trial: {msg}"))
                    log(f"  trial {n:>3}: ABORTED: {trials[-1].error}")
                    break
            else:
                waited = 0.0
            tr = self.trial(n)
            tr.wait_steady_s = round(waited, 2)
            trials.append(tr)
            fmt = lambda v: f"{v:6.3f}s" if v is not None else "   -   "  # noqa: E731
            log(f"  trial {n:>3}: {tr.victim:<16} pid {tr.old_pid} -> {tr.new_pid}: restart issued "
                f"{fmt(tr.restart_s)} (pid file {fmt(tr.restart_pidfile_s)}, log {fmt(tr.restart_logline_s)}), "
                f"answers ping {fmt(tr.ping_s)}" + (f"  FAILED: {tr.error}" if tr.error else ""))
            self.fleet.adapter._reap()  # the workers the bench started itself are its children: no zombies
            if self.fleet.sup.poll() is not None:
                break
        # let the last victim come back fully, so the window covers whole trials
        self.wait_steady(a.timeout)
        for tr, kill_wall in self.kill_walls:
            r, back = self.fleet.suplog.supervisor_view(tr.victim, kill_wall, len(self.hosts))
            tr.sup_restart_logged_s = round(r, 4) if r is not None else None
            tr.sup_sees_alive_s = round(back, 4) if back is not None else None
        cpu1, wall1 = proc_cpu(self.fleet.sup.pid), time.monotonic()
        hwm = proc_status_kb(self.fleet.sup.pid, "VmHWM")
        total_cpu = proc_cpu(self.fleet.sup.pid)
        ticks = self.fleet.suplog.tick_count() - ticks0
        durations = self.fleet.suplog.tick_durations(ticks0)  # the ticks of the measured window
        ok = [t for t in trials if t.error is None]
        wall = wall1 - wall0
        cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
        return {
            "setup": self.setup_info(),
            "trials": [asdict(t) for t in trials],
            "failed": [asdict(t) for t in trials if t.error is not None],
            "kill_to_restart_s": summary([t.restart_s for t in ok]),
            "kill_to_ping_s": summary([t.ping_s for t in ok]),
            "restart_to_ping_s": summary([t.ping_s - t.restart_s for t in ok]),
            "kill_to_ready_logged_s": summary([t.ready_s for t in ok if t.ready_s is not None]),
            "ready_logged_to_ping_s": summary([t.ping_s - t.ready_s for t in ok if t.ready_s is not None]),
            "kill_to_supervisor_restart_logged_s": summary([t.sup_restart_logged_s for t in ok
                                                            if t.sup_restart_logged_s is not None]),
            "kill_to_supervisor_sees_alive_s": summary([t.sup_sees_alive_s for t in ok
                                                        if t.sup_sees_alive_s is not None]),
            "restarted_within_one_interval": sum(t.restart_s <= self.interval_s for t in ok),
            "restarted_within_two_intervals": sum(t.restart_s <= 2 * self.interval_s for t in ok),
            "percentile_method": PERCENTILE_METHOD,
            "supervisor": {
                "pid": self.fleet.sup.pid,
                "cpu_s": round(cpu, 3) if cpu is not None else None,
                "wall_s": round(wall, 2),
                "cpu_pct_of_one_core": round(100 * cpu / wall, 2) if cpu is not None and wall > 0 else None,
                "cpu_s_startup": round(startup_cpu, 3) if startup_cpu is not None else None,
                "cpu_s_total": round(total_cpu, 3) if total_cpu is not None else None,
                "peak_rss_mb_vmhwm": round(hwm / 1024, 1) if hwm else None,
                "peak_rss_mb_sampled": round(self.rss.max_kb / 1024, 1) if self.rss.max_kb else None,
                "rss_samples": self.rss.samples,
                "ticks_in_window": ticks if durations else None,
                "cpu_ms_per_tick": round(1000 * cpu / ticks, 2) if durations and ticks and cpu is not None else None,
                "tick_duration_s": summary(durations) if durations else None,
                "log_problems": self.fleet.suplog.problems[-20:],
            },
        }

    def setup_info(self) -> dict:
        a = self.args
        return {
            "workers": a.workers,
            "hostnames": self.hosts,
            "interval": a.interval,
            "heartbeat_timeout": a.heartbeat_timeout,
            "trials": a.trials,
            "ping_poll_timeout_s": a.ping_timeout,
            "seed": a.seed,
            "settle_s": a.settle,
            "supervisor_log_level": a.supervisor_log_level,
            **self.fleet.environment(self.load_start),
        }

    # ---- cleanup (idempotent; every step on its own)
    def cleanup(self) -> list[str]:
        for th in (self.rss, self.fleet.suplog):
            if th is not None:
                th.stop.set()
        return self.fleet.stop(self.args.keep)


def print_text(res: dict) -> None:
    s = res["setup"]
    print("celery-supervisor detection benchmark (bench/detect.py)")
    print(f"  setup: {s['workers']} workers ({', '.join(s['hostnames'])}), --pool solo, local platform; "
          f"loop.interval {s['interval']}, heartbeat_timeout {s['heartbeat_timeout']}, {s['trials']} trials")
    print(f"  python {s['python']}, celery {s['celery']}, celery-supervisor {s['celery_supervisor']}, "
          f"redis {s['redis_version']} ({s['redis_binary']}), {s['cpus']} CPUs, Linux {s['kernel']}")
    print(f"  ping polled with timeout {s['ping_poll_timeout_s']}s; supervisor log level {s['supervisor_log_level']}; "
          f"load average (1/5/15 min) {s['loadavg_at_start']} at the start, {s['loadavg_at_end']} at the end")
    print(f"  percentiles: {res['percentile_method']}")
    print()
    print(f"  {'':<28}{'n':>4}{'p50':>10}{'p95':>10}{'min':>10}{'max':>10}{'mean':>10}")
    rows = (("kill_to_restart_s", "kill -> restart issued"), ("kill_to_ping_s", "kill -> answers ping"),
            ("restart_to_ping_s", "restart -> answers ping"), None,
            ("kill_to_ready_logged_s", "kill -> worker logs ready"), ("ready_logged_to_ping_s", "ready -> answers ping"),
            ("kill_to_supervisor_restart_logged_s", "kill -> sup. logs restart"),
            ("kill_to_supervisor_sees_alive_s", "kill -> sup. sees all alive"))
    for row in rows:
        if row is None:
            if any(res[k]["n"] for k, _ in rows[4:]):
                print("  from log stamps (wall clock, 1 ms):")
            continue
        key, label = row
        d = res[key]
        if not d["n"]:
            continue
        print(f"  {label:<28}{d['n']:>4}" + "".join(f"{fmt_s(d[k]):>10}" for k in ("p50", "p95", "min", "max", "mean")))
    n_ok = res["kill_to_restart_s"]["n"]
    print(f"  restart issued within one loop.interval of the kill: {res['restarted_within_one_interval']}/{n_ok}, "
          f"within two: {res['restarted_within_two_intervals']}/{n_ok}")
    sv = res["supervisor"]
    print()
    print(f"  supervisor process: {sv['cpu_s']} CPU s over {sv['wall_s']} s wall = {sv['cpu_pct_of_one_core']} % "
          f"of one core (startup before the first trial: {sv['cpu_s_startup']} CPU s)")
    if sv["ticks_in_window"]:
        td = sv["tick_duration_s"]
        print(f"  ticks: {sv['ticks_in_window']} in the window, {sv['cpu_ms_per_tick']} ms CPU per tick; tick "
              f"duration p50 {fmt_s(td['p50'])}, p95 {fmt_s(td['p95'])}, max {fmt_s(td['max'])}")
    print(f"  peak RSS: {sv['peak_rss_mb_vmhwm']} MB (VmHWM), {sv['peak_rss_mb_sampled']} MB (max of "
          f"{sv['rss_samples']} VmRSS samples)")
    for line in sv["log_problems"]:
        print(f"  supervisor log: {line}")
    if res["failed"]:
        print()
        for t in res["failed"]:
            print(f"  FAILED trial {t['n']} ({t['victim']}, pid {t['old_pid']}): {t['error']}")


# ---------------------------------------------------------------- heartbeat-only detection and `once`
@dataclass
class Extra:
    """Its own redis-server, 3 workers and `supervisor run` with an alert-only group (no restart):
    SIGKILL one worker -> the supervisor logs ``FIRING worker_lost:<hostname>`` (its output tailed
    every 10 ms). The worker is started again by the bench before the next trial. Then, the daemon
    stopped, `supervisor once` and `celery inspect ping` alternated on the healthy fleet, wall time
    of each whole command (interpreter start included)."""

    args: argparse.Namespace
    fleet: Fleet = field(default_factory=Fleet)

    def setup(self) -> None:
        a, f = self.args, self.fleet
        self.rng = random.Random(a.seed)
        self.url = f.open("bench-extra-")
        self.hosts = [f"celery@hb-{i}" for i in range(1, 4)]
        start_doc = {
            "broker": {"url": self.url},
            "loop": {"interval": a.interval, "state_path": str(Path(f.tmp) / "start.db")},
            "platforms": {"local": {"run_dir": str(f.run_dir)}},
            "groups": [{"name": "watch", "workers": self.hosts, "restart": worker_restart(self.url, 100)}],
        }
        f.start_workers(start_doc, self.hosts, 60)  # started through the local adapter (pid files)
        self.alert_doc = {
            "broker": {"url": self.url},
            "loop": {"interval": a.interval, "state_path": str(Path(f.tmp) / "state.db"), "ping_timeout": "500ms"},
            "groups": [{"name": "watch", "workers": self.hosts, "min_workers": 3,
                        "heartbeat_timeout": a.hb_timeout}],  # no restart: alert only
        }
        import yaml

        f.config_path.write_text(yaml.safe_dump(self.alert_doc, sort_keys=False), encoding="utf-8")

    def steady(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if wait_all_ping(self.fleet.app, self.hosts, timeout):
            return False
        while time.monotonic() < deadline:
            since = self.fleet.suplog.all_alive_since(3)
            if since is not None and time.monotonic() - since >= self.args.settle:
                return True
            time.sleep(0.05)
        return False

    def hb_trial(self, n: int) -> dict:
        f = self.fleet
        victim = self.hosts[(n - 1) % 3]
        rec = read_pid(f.pid_path(victim))
        out = Path(f.tmp) / "supervisor.log"
        offset = out.stat().st_size
        mark = f"FIRING worker_lost:{victim}".encode()
        time.sleep(0.02 + self.rng.uniform(0, parse_s(self.args.interval)))
        t0 = time.monotonic()
        os.kill(rec[0], signal.SIGKILL)
        seen, buf = None, b""
        while time.monotonic() < t0 + 120:
            with open(out, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            buf = (buf + chunk)[-8192:]
            if mark in buf:
                seen = time.monotonic() - t0
                break
            time.sleep(0.01)
        f.adapter._reap()
        tg = next(t for t in f.targets if t.hostname == victim)
        f.adapter.restart(tg, "bench: back for the next trial")
        return {"n": n, "victim": victim, "paged_s": round(seen, 4) if seen is not None else None}

    def run(self) -> dict:
        a, f = self.args, self.fleet
        res: dict = {"hb_timeout": a.hb_timeout, "ping_timeout_s": 0.5, "interval": a.interval}
        if a.hb_trials > 0:
            f.start_supervisor("DEBUG")
            if not self.steady(60):
                raise SetupError(f"extra: no steady state; see {f.tmp}")
            trials = []
            for n in range(1, a.hb_trials + 1):
                tr = self.hb_trial(n)
                trials.append(tr)
                log(f"  heartbeat-only trial {n}: {tr['victim']} paged {fmt_s(tr['paged_s'])} after the SIGKILL")
                if not self.steady(a.timeout):
                    log("  heartbeat-only: no steady state after the trial; stopping this phase")
                    break
            res["hb_trials"] = trials
            res["kill_to_paged_s"] = summary([t["paged_s"] for t in trials if t["paged_s"] is not None])
            f.stop_supervisor()
        if a.once_trials > 0:
            if wait_all_ping(f.app, self.hosts, 60):
                raise SetupError("extra: the fleet is not healthy for the `once` comparison")
            import subprocess

            once_argv = [sys.executable, "-m", "supervisor", "once", "-c", str(f.config_path), "--json"]
            ping_argv = [sys.executable, "-m", "celery", "-b", self.url, "inspect", "ping"]
            times: dict[str, list[float]] = {"once": [], "inspect_ping": []}
            codes: dict[str, list[int]] = {"once": [], "inspect_ping": []}
            for _ in range(a.once_trials):
                for name, argv in (("once", once_argv), ("inspect_ping", ping_argv)):
                    t = time.monotonic()
                    r = subprocess.run(argv, cwd=f.tmp, capture_output=True, timeout=60)
                    times[name].append(round(time.monotonic() - t, 4))
                    codes[name].append(r.returncode)
                    if name == "once":
                        doc = json.loads(r.stdout or b"{}")
                        alive = sum(w.get("alive") is True for w in doc.get("workers", []))
                        if r.returncode != 0 or alive != 3:
                            log(f"  once: exit {r.returncode}, {alive}/3 alive (expected 0 and 3/3)")
            log(f"  once: {times['once']}; celery inspect ping: {times['inspect_ping']}")
            res["once_s"] = summary(times["once"])
            res["inspect_ping_s"] = summary(times["inspect_ping"])
            res["once_exit_codes"] = codes["once"]
            p_once, p_ping = res["once_s"]["p50"], res["inspect_ping_s"]["p50"]
            res["once_over_inspect_ping_p50"] = round(p_once / p_ping, 3) if p_once and p_ping else None
        return res

    def cleanup(self) -> list[str]:
        if self.fleet.suplog is not None:
            self.fleet.suplog.stop.set()
        return self.fleet.stop(self.args.keep)


def parse_s(text: str) -> float:
    from supervisor.durations import parse_duration

    return parse_duration(text)


def print_extra(res: dict) -> None:
    print()
    if "kill_to_paged_s" in res:
        d = res["kill_to_paged_s"]
        print(f"  heartbeat-only (alert-only group, heartbeat_timeout {res['hb_timeout']}, ping_timeout 0.5s, "
              f"loop.interval {res['interval']}):")
        print(f"  {'kill -> FIRING worker_lost':<28}{d['n']:>4}"
              + "".join(f"{fmt_s(d[k]):>10}" for k in ("p50", "p95", "min", "max", "mean")))
    if "once_s" in res:
        for key, label in (("once_s", "supervisor once (3 alive)"), ("inspect_ping_s", "celery inspect ping")):
            d = res[key]
            print(f"  {label:<28}{d['n']:>4}" + "".join(f"{fmt_s(d[k]):>10}" for k in ("p50", "p95", "min", "max", "mean")))
        print(f"  once / inspect ping (p50): {res['once_over_inspect_ping_p50']}; once exit codes {res['once_exit_codes']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_kill_args(p)
    p.add_argument("--supervisor-log-level", default="DEBUG", choices=["DEBUG", "INFO"],
                   help="DEBUG (default) logs one line per tick: gives tick durations and the steady state")
    p.add_argument("--seed", type=int, default=None, help="seed of the random kill phase (default: random)")
    p.add_argument("--hb-trials", type=int, default=5,
                   help="heartbeat-only detection: SIGKILLs of an alert-only group's workers (0: skip)")
    p.add_argument("--hb-timeout", default="5s", help="that group's heartbeat_timeout")
    p.add_argument("--once-trials", type=int, default=5,
                   help="`supervisor once` vs `celery inspect ping` on a healthy fleet of 3, alternated (0: skip)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (config, logs, pid files)")
    a = p.parse_args(argv)
    if a.trials < 1 or a.workers < 1:
        p.error("--trials and --workers must be at least 1")

    b = Bench(a)
    res, code = run_bench(b, lambda res: 1 if res["failed"] else 0)
    if res is not None:
        sup_exit = b.fleet.sup_exit
        res["supervisor"]["exit_code_on_sigterm"] = sup_exit
        if sup_exit not in (0, None):
            res["supervisor"]["log_problems"].append(f"`supervisor run` exited {sup_exit} on SIGTERM")
        if a.json:
            print(json.dumps(res, indent=2))
        else:
            print_text(res)
        if res["failed"]:
            log(f"{len(res['failed'])} trial(s) failed: " + ", ".join(f"#{t['n']} {t['victim']}" for t in res["failed"]))
    if code not in (0, 1) or (a.hb_trials <= 0 and a.once_trials <= 0):
        return code
    extra, extra_code = run_bench(Extra(a), lambda r: 0)
    if extra is not None:
        print(json.dumps({"extra": extra}, indent=2) if a.json else "", end="\n" if a.json else "")
        if not a.json:
            print_extra(extra)
    return code or extra_code


if __name__ == "__main__":
    sys.exit(main())
