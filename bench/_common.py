"""What the benchmarks share: /proc readers, nearest-rank statistics, the supervisor log tailer,
the worker command line, the fleet (temp folder, private redis-server, workers through the `local`
adapter, `supervisor run`) with its stop-by-PID cleanup, and the signal scaffold of a run.

Not a package module: each benchmark is run as a script (`python bench/X.py`) and puts this
folder on sys.path first.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
# the supervisor's DEBUG line per tick: "... supervisor: tick 12: 3/3 workers alive, 0 findings, 0 actions, 0.012s"
TICK_RE = re.compile(r"tick (\d+): (\d+)/(\d+) workers alive, (\d+) findings, (\d+) actions, ([\d.]+)s")
# its WARNING line per restart: "... restart bench.celery@bench-1 (celery@bench-1): <reason> -> <result>"
RESTART_RE = re.compile(r" restart (\S+) \((\S+)\): (.*) -> (.*)$")
PERCENTILE_METHOD = "nearest rank: the ceil(p/100*n)-th smallest value (for n <= 19, p95 is the max)"


def log_stamp(text: str) -> float | None:
    """A logging asctime ("2026-01-01 12:00:00,123", local time) as a time.time() value."""
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


# ---------------------------------------------------------------- /proc helpers
def proc_cpu(pid: int) -> float | None:
    """utime + stime of a process in seconds (all its threads), or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    f = data[data.rfind(b")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / HZ  # fields 14 and 15 of proc(5)


def proc_status_kb(pid: int, key: str) -> int | None:
    """A numeric field of /proc/PID/status (VmRSS, VmHWM in kB; Threads is a plain count)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_fds(pid: int) -> int | None:
    """How many file descriptors the process holds open, or None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def proc_state_start(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    f = data[data.rfind(b")") + 2 :].split()
    return f[0].decode(), int(f[19])


def read_pid(path: Path) -> tuple[int, int | None] | None:
    """(pid, start time) from a pid file of the local platform adapter."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return int(d["pid"]), d.get("start_time")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_pid(path: Path) -> int | None:
    """The pid a pid file names, if that very process (same start time) still runs."""
    rec = read_pid(path)
    if rec is None:
        return None
    st = proc_state_start(rec[0])
    if st is None or st[0] in ("Z", "X") or (rec[1] is not None and st[1] != rec[1]):
        return None
    return rec[0]


# ---------------------------------------------------------------- stats
def nearest_rank(values: list[float], p: float) -> float | None:
    """The p-th percentile by the nearest-rank method: the ceil(p/100 * n)-th smallest value."""
    if not values:
        return None
    s = sorted(values)
    return s[max(1, math.ceil(p / 100 * len(s))) - 1]


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": nearest_rank(values, 50),
        "p95": nearest_rank(values, 95),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


# ---------------------------------------------------------------- watching the supervisor
class SupervisorLog:
    """Tails the supervisor's output file: tick lines (DEBUG), restart lines, errors."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        # (monotonic when read, wall-clock stamp of the line, tick number, alive, total, tick duration)
        self.ticks: list[tuple[float, float | None, int, int, int, float]] = []
        self.restarts: list[tuple[float | None, str, str]] = []  # (wall-clock stamp, hostname, line)
        self.problems: list[str] = []  # ERROR / Traceback / "took longer" lines
        self.errors: list[str] = []  # ERROR / CRITICAL lines only
        self.slow_ticks = 0  # "tick took ..., longer than loop.interval" lines
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="suplog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        pos, buf = 0, b""
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
            except OSError:
                chunk = b""
            now = time.monotonic()
            if chunk:
                pos += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._line(raw.decode("utf-8", "replace"), now)
            self.stop.wait(0.02)

    def _line(self, line: str, now: float) -> None:
        stamp = log_stamp(line[:23])
        with self.lock:
            m = TICK_RE.search(line)
            if m:
                self.ticks.append((now, stamp, int(m[1]), int(m[2]), int(m[3]), float(m[6])))
                return
            m = RESTART_RE.search(line)
            if m:
                self.restarts.append((stamp, m[2], line))
            if " ERROR " in line or " CRITICAL " in line:
                self.errors.append(line)
            if "longer than loop.interval" in line:
                self.slow_ticks += 1
            if " ERROR " in line or "Traceback" in line or "longer than loop.interval" in line \
                    or " CRITICAL " in line:
                self.problems.append(line)

    def all_alive_since(self, n: int) -> float | None:
        """Monotonic time since which every tick seen said n/n alive (None: the last one did not)."""
        with self.lock:
            since = None
            for seen, _, _, alive, total, _ in reversed(self.ticks):
                if alive == total == n:
                    since = seen
                else:
                    break
            return since

    def tick_durations(self, since: int = 0, until: int | None = None) -> list[float]:
        with self.lock:
            return [t[5] for t in self.ticks[since:until]]

    def supervisor_view(self, hostname: str, kill_wall: float, n: int) -> tuple[float | None, float | None]:
        """From the supervisor's own log stamps: (kill -> its restart line for hostname, kill -> its first
        tick after that saying n/n alive). The restart line is written when the tick ends, after the
        adapter's 0.2 s early-exit check of the new process."""
        with self.lock:
            r = next((st for st, h, _ in self.restarts if h == hostname and st is not None and st >= kill_wall - 0.002),
                     None)
            if r is None:
                return None, None
            back = next((st for _, st, _, alive, total, _ in self.ticks
                         if st is not None and st > r and alive == total == n), None)
        return r - kill_wall, (back - kill_wall) if back is not None else None

    def tick_count(self) -> int:
        with self.lock:
            return len(self.ticks)


# ---------------------------------------------------------------- the fleet and the supervisor
def worker_target() -> str:
    """The `local` restart target of the benchmarks' workers: the demo app, solo pool, this Python."""
    return (f"{shlex.quote(sys.executable)} -m celery -A supervisor.demo_app worker "
            "-n {hostname} --pool solo --without-mingle --without-gossip -l INFO")


def worker_restart(broker_url: str, max_restarts: int) -> dict:
    """The `restart` block of the benchmarks' group: the `local` platform, worker_target() on the
    broker, no backoff, short grace and stop timeouts, `max_restarts` in an hour."""
    return {
        "platform": "local",
        "target": worker_target(),
        "env": {"CELERY_BROKER_URL": broker_url},
        "max_restarts": max_restarts,
        "window": "1h",
        "backoff": "0s",
        "grace": "5s",
        "stop_timeout": "5s",
    }


def ping(app, host: str, timeout: float) -> bool:
    """A targeted ping with limit=1 on a fresh connection (the supervisor's own call)."""
    from supervisor.observe import control

    try:
        return host in control.ping(app, [host], timeout)
    except control.BrokerUnreachable as e:
        log(f"ping {host}: {e}")
        time.sleep(0.1)
        return False


def wait_all_ping(app, hosts: list[str], timeout: float) -> list[str]:
    """Pings every host until all answered or the timeout passed; returns those that never did."""
    deadline = time.monotonic() + timeout
    waiting = list(hosts)
    while waiting and time.monotonic() < deadline:
        waiting = [h for h in waiting if not ping(app, h, 0.5)]
    return waiting


def start_supervisor(config_path: Path, cwd: str, out, log_level: str | None) -> subprocess.Popen:
    """`supervisor run -c CONFIG` in its own session, stdout and stderr into the open file `out`."""
    argv = [sys.executable, "-m", "supervisor", "run", "-c", str(config_path)]
    if log_level:
        argv += ["--log-level", log_level]
    return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_supervisor(sup: subprocess.Popen, timeout: float = 20) -> tuple[int | None, str]:
    """SIGTERM, wait up to `timeout`, else SIGKILL: (exit code on SIGTERM or None, what happened)."""
    if sup.poll() is not None:
        return None, f"supervisor (pid {sup.pid}) had already exited with {sup.returncode}"
    sup.send_signal(signal.SIGTERM)
    try:
        code = sup.wait(timeout)
        return code, f"supervisor (pid {sup.pid}) exited {code} on SIGTERM"
    except subprocess.TimeoutExpired:
        sup.kill()
        sup.wait(5)
        return None, f"supervisor (pid {sup.pid}) did NOT exit within {timeout:g}s of SIGTERM: killed"


def stop_workers(adapter, targets: list, pid_path) -> str:
    """Each target through adapter.stop (every copy, however started), else SIGKILL of the process its
    pid file names (only when the start time still matches). `pid_path(hostname)` gives the pid file."""
    stopped = 0
    for t in targets:
        try:
            if adapter.stop(t, timeout=5):
                stopped += 1
                continue
        except Exception as e:  # fall back to the pid file
            log(f"adapter.stop({t.hostname}) failed: {e}")
        rec = read_pid(pid_path(t.hostname))
        if rec is not None:
            st = proc_state_start(rec[0])
            if st is not None and (rec[1] is None or st[1] == rec[1]):
                try:
                    os.kill(rec[0], signal.SIGKILL)
                    stopped += 1
                except OSError:
                    pass
    return f"{stopped}/{len(targets)} workers stopped"


def redis_version(binary: str) -> str:
    try:
        rv = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"v=(\S+)", rv)
        return m[1] if m else rv.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


@dataclass
class Fleet:
    """What a benchmark starts and stops again by PID: a temporary folder, a private redis-server,
    workers of one group started through the `local` platform adapter, and `supervisor run`.
    Each step is on its own, so that stop() undoes whatever part of the setup happened."""

    tmp: str = ""
    run_dir: Path | None = None  # the local adapter's pid and log files
    redis: object = None
    config_path: Path | None = None
    adapter: object = None
    targets: list = field(default_factory=list)
    tids: dict[str, str] = field(default_factory=dict)  # hostname -> target id
    app: object = None
    sup: subprocess.Popen | None = None
    sup_log_file: object = None
    suplog: SupervisorLog | None = None
    sup_started: float | None = None  # time.monotonic() at the supervisor's start
    sup_exit: int | None = None  # its exit code on SIGTERM (None: it had exited before, or was killed)
    sup_stopped: bool = False

    def open(self, prefix: str) -> str:
        """The temporary folder and the redis-server; returns the broker URL (db 0)."""
        from supervisor.embedded_redis import RedisServer

        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.run_dir = Path(self.tmp) / "run"
        self.redis = RedisServer()
        self.redis.start()
        return f"{self.redis.url}/0"

    def start_workers(self, doc: dict, hosts: list[str], ping_within: float) -> float:
        """Writes `doc` as the config, starts `hosts` (of its first group) through the local adapter and
        waits until every one answers ping; returns the seconds from the first start to the last reply."""
        import yaml

        from platforms.local import Adapter
        from supervisor.config import load_config
        from supervisor.observe.celeryapp import make_app

        self.config_path = Path(self.tmp) / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        cfg = load_config(self.config_path, env={})
        self.adapter = Adapter(cfg)
        group = cfg.groups[0]
        self.targets = [self.adapter.target_for(group, h) for h in hosts]
        self.tids = {t.hostname: t.id for t in self.targets}
        self.app = make_app(cfg.broker)

        t = time.monotonic()
        for tg in self.targets:
            r = self.adapter.restart(tg, "bench start")
            if not r.ok:
                raise SetupError(f"could not start {tg.hostname}: {r.message}")
        missing = wait_all_ping(self.app, hosts, ping_within)
        if missing:
            raise SetupError(f"workers did not answer ping within {ping_within:g}s: {missing}; see {self.run_dir}")
        return time.monotonic() - t

    def start_supervisor(self, log_level: str | None) -> None:
        """`supervisor run -c CONFIG` with its output in TMP/supervisor.log, and the tailer of that file."""
        sup_out = Path(self.tmp) / "supervisor.log"
        self.sup_log_file = open(sup_out, "ab")  # noqa: SIM115 (closed in stop)
        self.sup = start_supervisor(self.config_path, self.tmp, self.sup_log_file, log_level)
        self.sup_started = time.monotonic()
        self.suplog = SupervisorLog(sup_out)
        self.suplog.start()

    def pid_path(self, host: str) -> Path:
        return self.run_dir / f"{self.tids[host]}.pid"

    def log_path(self, host: str) -> Path:
        return self.run_dir / f"{self.tids[host]}.log"

    def environment(self, loadavg_at_start: list[float] | None) -> dict:
        """The versions and the machine, for a benchmark's "setup" block (its last keys)."""
        import celery

        from supervisor import __version__

        return {
            "python": platform.python_version(),
            "celery": celery.__version__,
            "celery_supervisor": __version__,
            "redis_binary": self.redis.binary,
            "redis_version": redis_version(self.redis.binary),
            "cpus": os.cpu_count(),
            "loadavg_at_start": loadavg_at_start,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "kernel": platform.release(),
            "tmp": self.tmp,
        }

    def stop_supervisor(self) -> str | None:
        """SIGTERM `supervisor run` and wait (sets sup_exit): what happened, or None when there is no
        supervisor or it was stopped already."""
        if self.sup is None or self.sup_stopped:
            return None
        self.sup_stopped = True
        self.sup_exit, msg = stop_supervisor(self.sup)
        return msg

    def stop(self, keep: bool) -> list[str]:
        """Everything still running, by PID: the supervisor (unless stop_supervisor() did it), the log
        tailer, the workers, the redis-server; then the temporary folder (unless `keep`). What was done."""
        done = []
        msg = self.stop_supervisor()
        if msg is not None:
            done.append(msg)
        if self.suplog is not None:
            self.suplog.stop.set()
        if self.adapter is not None:
            done.append(stop_workers(self.adapter, self.targets, self.pid_path))
        if self.sup_log_file is not None:
            self.sup_log_file.close()
        if self.redis is not None:
            self.redis.close()
            done.append("redis stopped")
        if self.tmp:
            if keep:
                done.append(f"kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return done


def run_bench(bench, exit_code: Callable[[dict], int]) -> tuple[dict | None, int]:
    """bench.setup(), then res = bench.run(): (res, exit_code(res)). SIGTERM counts as Ctrl-C: (None, 130);
    a SetupError gives (None, 2). bench.cleanup() runs in every case, with SIGINT and SIGTERM ignored
    (a second Ctrl-C must not leave processes behind), and its lines are logged."""

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    res = None
    try:
        bench.setup()
        res = bench.run()
        code = exit_code(res)
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except SetupError as e:
        log(f"setup failed: {e}")
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for line in bench.cleanup():
            log(f"cleanup: {line}")
    return res, code


def add_kill_args(p) -> None:
    """The options of the SIGKILL benchmarks (bench/detect.py, bench/detect_docker.py)."""
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--interval", default="5s", help="loop.interval (default 5s, the config's default)")
    p.add_argument("--heartbeat-timeout", default="10s")
    p.add_argument("--timeout", type=float, default=60.0, help="per trial: restart and ping must happen by then")
    p.add_argument("--ping-timeout", type=float, default=0.1, help="each targeted ping's wait (polling step)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of calm before each kill")
