"""The ``local`` platform: workers run as local processes started from a command-line template.

For development, demos and hosts without systemd, and as careful as the others: a restart never
leaves two copies of one worker. Before starting, every running copy is found and stopped
(SIGTERM, ``restart.stop_timeout``, then SIGKILL, and waited for). A process serves the target's
hostname (platforms.local_procs says how each is recognised) when it is:

- the process in the target's pid file, if it is still the same process (the pid file records
  its start time, so a reused PID is not mistaken for it);
- a process whose environment carries ``CELERY_SUPERVISOR_TARGET=<target id>``, the marker set
  on everything this adapter starts (prefork pool children inherit it: only processes whose parent
  does not carry the same marker count as copies);
- a process whose argv equals the rendered argv exactly (a worker started by hand);
- a celery worker's main process serving the hostname, however it was started: ``-n`` or not
  (Celery's default ``celery@<host>``), the console script or ``python -m celery``, its command
  line rewritten by setproctitle (``[celeryd: HOST:MainProcess]``);
- the process whose pid the worker's heartbeats report (``inventory(..., seen=...)``), if it started
  before the heartbeat that reported it. When that process runs but cannot be verified as the worker,
  the adapter does not restart and says why.

Files, per target, in the run dir (``platforms.local.run_dir``, else ``supervisor-local`` next to
``loop.state_path``): ``<id>.pid`` (JSON: pid, create_time, hostname, group, argv, started_at),
``<id>.log`` (the worker's stdout and stderr, appended) and ``<id>.lock`` (held during a restart,
so that two restarts of one target, in threads or processes, never interleave).

Runs where psutil does (Linux, macOS, the BSDs); signals go through a pidfd on Linux. Workers are
started in a session of their own and outlive the supervisor; run the supervisor with systemd's
``KillMode=process`` if its stop must not stop them. What a worker inherits: platforms.local_env.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from platforms import Platform, PlatformError, render_argv
from platforms.local_env import worker_environment
from platforms.local_procs import (
    MARKER,
    ExitWatch,
    Heard,
    Proc,
    ProcScan,
    Signaller,
    Want,
    alive,
    heard_process,
    read_proc,
    same_start,
    worker_of,
)
from supervisor import hostnames as _hostnames
from supervisor import redact
from supervisor.config import LocalRestart
from supervisor.model import RestartResult, Target, WorkerSeen

if TYPE_CHECKING:
    from supervisor.config import Config, GroupConfig

EARLY_EXIT = 0.2  # a process that dies this soon after its start is reported by restart() itself
KILL_WAIT = 5.0  # how long SIGKILLed processes may take to be gone before restart() gives up
LOG_ROTATE_BYTES = 10 * 1024 * 1024  # at a start, a bigger log is moved to <id>.log.1
TAIL_MAX_BYTES = 1024 * 1024  # logs() reads at most this much from the end of the file
_SAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


def target_id(group: str, hostname: str) -> str:
    """A stable, filesystem-safe key for (group, hostname): ``default.celery@w1``; a short hash of
    the raw pair is appended whenever the plain form could be ambiguous or was altered."""
    raw = f"{group}.{hostname}"
    safe = _SAFE.sub("_", raw)
    if safe[:1] in (".", "-"):
        safe = "_" + safe[1:]
    if safe != raw or "." in group or len(safe) > 120:
        digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        safe = f"{safe[:110]}-{digest}"
    return safe


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# ---------------------------------------------------------------- files
def tail_file(path: Path, lines: int, max_bytes: int = TAIL_MAX_BYTES, start: int = 0) -> str:
    """The last `lines` lines of a file (from byte `start` on), reading backwards from its end."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos, buf = end, b""
            while pos > start and buf.count(b"\n") <= lines and end - pos < max_bytes:
                step = min(8192, pos - start)
                pos -= step
                f.seek(pos)
                buf = f.read(step) + buf
    except OSError:
        return ""
    parts = buf.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    if pos > start and parts:  # the first part may be a line cut in the middle
        parts = parts[1:]
    return b"\n".join(parts[-lines:]).decode("utf-8", "replace")


@dataclass(frozen=True)
class PidFile:
    pid: int
    start: float | None  # the process's start time (psutil create_time)
    hostname: str | None
    group: str | None
    started_at: float | None


def _legacy_start(ticks: int) -> float | None:
    """A pid file written before psutil recorded the start in clock ticks after boot (Linux)."""
    try:
        import psutil

        return psutil.boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return None


def read_pidfile(path: Path) -> PidFile | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("create_time") is not None:
            start = float(data["create_time"])
        elif data.get("start_time") is not None:
            start = _legacy_start(int(data["start_time"]))
        else:
            start = None
        return PidFile(int(data["pid"]), start, data.get("hostname"), data.get("group"), data.get("started_at"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class _Exit:
    pid: int
    start: float | None
    detail: str
    at: float


# ---------------------------------------------------------------- the adapter
class Adapter(Platform):
    kind = "local"

    def __init__(self, config: Config):
        super().__init__(config)
        local = config.platforms.local
        if local is not None and local.run_dir is not None:
            self.run_dir = Path(local.run_dir).expanduser()
        else:
            self.run_dir = Path(config.loop.state_path).expanduser().parent / "supervisor-local"
        self._lock = threading.Lock()
        self._children: dict[str, tuple[subprocess.Popen, float | None]] = {}  # what we started: proc, start
        self._stale: list[subprocess.Popen] = []  # older children not reaped yet
        self._exits: dict[str, _Exit] = {}  # our children we reaped, last per target
        self._running: dict[str, tuple[int, float | None]] = {}  # last seen running (pid, start)
        self._gone: dict[str, tuple[int, float | None, float | None]] = {}  # seen going away: pid, start, when
        self._busy: set[str] = set()  # restarts in progress in this process
        self._heard: dict[str, Heard] = {}  # what the heartbeats last said (pid, when), per target
        self._exit_watch: ExitWatch | None = None  # watch(): worker exits wake the loop at once

    # ---- paths and commands (no I/O)
    def _paths(self, tid: str) -> tuple[Path, Path, Path]:
        return self.run_dir / f"{tid}.pid", self.run_dir / f"{tid}.log", self.run_dir / f"{tid}.lock"

    def _restart_cfg(self, group: GroupConfig) -> LocalRestart:
        r = group.restart
        if not isinstance(r, LocalRestart):
            raise PlatformError(f"group {group.name!r} does not restart through the local platform")
        return r

    def _argv(self, cfg: LocalRestart, hostname: str) -> list[str]:
        # split the template first, then fill each word: a hostname is data, never syntax
        try:
            argv = render_argv(cfg.target, hostname)
        except (KeyError, IndexError, ValueError) as e:
            raise PlatformError(f"cannot build the command for {_hostnames.shown(hostname)}: {e}") from None
        if not argv:
            raise PlatformError(f"the command for {hostname} is empty")
        return argv

    def _argv_or_none(self, cfg: LocalRestart, hostname: str | None) -> tuple[str, ...] | None:
        if not hostname:
            return None
        try:
            return tuple(self._argv(cfg, hostname))
        except PlatformError:
            return None

    def _want(self, cfg: LocalRestart, hostname: str | None) -> Want:
        """What identifies the worker of a hostname: the command we would run, its -A app."""
        argv = self._argv_or_none(cfg, hostname)
        ident = worker_of(argv) if argv else None
        return Want(argv, hostname, ident.app if ident is not None else None)

    def target_for(self, group: GroupConfig, hostname: str) -> Target:
        return Target(id=target_id(group.name, hostname), group=group.name, hostname=hostname)

    def describe(self, target: Target) -> str:
        try:
            cfg = self._restart_cfg(self.group(target.group))
        except (KeyError, PlatformError):
            return f"(group {target.group!r} has no local restart command)"
        try:  # the argv the restart runs, quoted as a shell would need it
            command = shlex.join(render_argv(cfg.target, target.hostname)) if target.hostname else cfg.target
        except (KeyError, IndexError, ValueError) as e:
            return redact.scrub(f"(cannot build the command for {_hostnames.shown(target.hostname)}: {e})")
        parts = []
        if cfg.cwd:
            parts.append(f"cd {shlex.quote(cfg.cwd)} &&")
        for name, value in cfg.env.items():
            # restart.env values are secrets unless plainly not (redact.env_value_is_secret)
            shown = redact.MASK if redact.env_value_is_secret(name, value) else shlex.quote(value)
            parts.append(f"{name}={shown}")
        parts.append(command)
        return redact.scrub(" ".join(parts))

    # ---- reaping
    def _reap(self) -> None:
        """Collect the exit status of every child we started that has ended (no zombies)."""
        with self._lock:
            now = time.time()
            for tid, (proc, start) in list(self._children.items()):
                rc = proc.poll()
                if rc is not None:
                    self._exits[tid] = _Exit(proc.pid, start, describe_exit(rc), now)
                    del self._children[tid]
            self._stale = [p for p in self._stale if p.poll() is None]

    # ---- inventory
    def _pidfiles(self, group: str) -> dict[str, PidFile]:
        """hostname -> pid file, for this group's pid files in the run dir."""
        out: dict[str, PidFile] = {}
        try:
            entries = list(os.scandir(self.run_dir))
        except OSError:
            return out
        for e in entries:
            if e.name.endswith(".pid"):
                pf = read_pidfile(Path(e.path))
                if pf is not None and pf.group == group and pf.hostname:
                    out[pf.hostname] = pf
        return out

    def _remember(self, group: str, seen: Mapping[str, WorkerSeen] | None) -> None:
        """Keep what the heartbeats said of each worker: the pid it reports, and when."""
        for h, ws in (seen or {}).items():
            if ws.pid and ws.last_heartbeat is not None:
                with self._lock:
                    self._heard[target_id(group, h)] = Heard(ws.pid, ws.last_heartbeat)

    def inventory(self, group: GroupConfig, known: Iterable[str] = (), *,
                  seen: Mapping[str, WorkerSeen] | None = None) -> list[Target]:
        """``seen``: what the heartbeats said of the group's workers (hostname -> WorkerSeen): the
        pid each reports is evidence of which process serves it, however it was started."""
        cfg = self._restart_cfg(group)
        self._reap()
        self._remember(group.name, seen)
        pidfiles = self._pidfiles(group.name)
        hostnames = list(dict.fromkeys([*group.workers, *known, *pidfiles]))
        now = time.time()
        results: dict[str, Target] = {}
        pending: dict[str, str] = {}  # tid -> hostname, not found running through the pid file
        for h in hostnames:
            tid = target_id(group.name, h)
            pf = pidfiles.get(h)
            if tid in self._busy:
                results[h] = Target(tid, group.name, h, "restarting", "restart in progress")
            elif pf is not None and alive(pf.pid, pf.start):
                results[h] = Target(tid, group.name, h, "running", f"pid {pf.pid}", pf.start)
                self._seen_running(tid, pf.pid, pf.start)
            else:
                pending[tid] = h
        doubts: dict[str, tuple[Proc, str]] = {}
        for tid, h in list(pending.items()):  # the pid its heartbeats report: one process, no scan
            heard = self._heard.get(tid)
            if heard is None:
                continue
            p, why = heard_process(None, heard, tid, h)
            if p is not None and why is None:
                results[h] = Target(tid, group.name, h, "running", f"pid {p.pid} (reported by its heartbeats)", p.start)
                self._seen_running(tid, p.pid, p.start)
                del pending[tid]
            elif p is not None and why is not None:
                doubts[tid] = (p, why)
        if pending:
            scan = ProcScan()
            found = scan.copies({tid: self._want(cfg, h) for tid, h in pending.items()})
            for tid, h in pending.items():
                roots = found.get(tid) or []
                if roots:
                    pids = ", ".join(str(p.pid) for p in roots)
                    what = f"pid {pids}" if len(roots) == 1 else f"{len(roots)} copies: pids {pids}"
                    results[h] = Target(tid, group.name, h, "running", f"{what} (not from its pid file)",
                                        roots[0].start)
                    self._seen_running(tid, roots[0].pid, roots[0].start)
                elif tid in doubts:
                    # it may be the worker: taken as running, and never doubled (restart() refuses)
                    p, why = doubts[tid]
                    results[h] = Target(tid, group.name, h, "running", f"{why}; taken as running", p.start)
                    self._seen_running(tid, p.pid, p.start)
                else:
                    results[h] = self._not_running(tid, group.name, h, now, pidfiles.get(h))
        return [results[h] for h in hostnames]

    def _seen_running(self, tid: str, pid: int, start: float | None) -> None:
        with self._lock:
            self._running[tid] = (pid, start)
            self._gone.pop(tid, None)
            self._exits.pop(tid, None)
        self._watch_exit(tid, pid, start)

    # ---- exits wake the loop (supervisor/wake.py)
    def watch(self, wake) -> None:
        """Every worker process this adapter knows runs (seen in an inventory, or started by a
        restart) is watched through a pidfd: its exit calls ``wake`` at once."""
        if self._exit_watch is None:
            self._exit_watch = ExitWatch(wake)
            with self._lock:
                running = list(self._running.items())
            for tid, (pid, start) in running:
                self._watch_exit(tid, pid, start)

    def _watch_exit(self, tid: str, pid: int, start: float | None) -> None:
        w = self._exit_watch
        if w is not None:
            w.watch(pid, start, f"local worker {tid}")

    def _not_running(self, tid: str, group: str, hostname: str, now: float, pf: PidFile | None = None) -> Target:
        self._reap()  # it may have died between the reap at the top of inventory() and now
        with self._lock:
            ex = self._exits.get(tid)
            if ex is not None:
                self._running.pop(tid, None)
                return Target(tid, group, hostname, "exited", ex.detail, ex.at)
            last = self._running.pop(tid, None)
            if last is not None:
                self._gone[tid] = (*last, now)
            elif pf is not None and tid not in self._gone:
                # started by an earlier run of the supervisor (or another adapter) and gone before we
                # ever saw it run: we did not witness the death (since None), so the core confirms it
                # with a ping before it acts -- the worker may have been brought back by other means
                self._gone[tid] = (pf.pid, pf.start, None)
            gone = self._gone.get(tid)
        if gone is not None:
            return Target(tid, group, hostname, "exited", f"not running (pid {gone[0]} gone)", gone[2])
        # never started here and no such process: the platform cannot tell whether it died (it may
        # run on another host); the core then judges it by heartbeat and ping alone
        return Target(tid, group, hostname, "unknown", "not running here (no pid file, no such process)")

    # ---- logs
    def logs(self, target: Target, lines: int = 50) -> str:
        tid = target_id(target.group, target.hostname) if target.hostname else target.id
        if not tid or "/" in tid or tid.startswith("."):
            return ""
        return redact.scrub(tail_file(self._paths(tid)[1], lines))

    # ---- restart
    def restart(self, target: Target, reason: str) -> RestartResult:
        hostname = target.hostname
        try:
            group = self.group(target.group)
        except KeyError:
            return RestartResult(False, f"unknown group {target.group!r}")
        if not hostname:
            return RestartResult(False, f"target {target.id!r} names no Celery hostname: nothing to start")
        try:
            cfg = self._restart_cfg(group)
            argv = self._argv(cfg, hostname)
        except PlatformError as e:
            return RestartResult(False, redact.scrub(e))
        tid = target_id(group.name, hostname)
        # the supervisor's environment (the broker URL it watches included), less its own secrets
        # and settings (platforms.local_env), plus `env`
        env, _ = worker_environment(self.config, os.environ, cfg.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # so that logs() shows a crashed worker's last words
        env.setdefault("SPT_NOENV", "1")  # setproctitle: keep /proc/PID/environ (our marker) intact
        env[MARKER] = tid
        cwd = os.path.expanduser(cfg.cwd) if cfg.cwd else None
        problem = self._cannot_start(argv, cwd, env)
        if problem:
            return RestartResult(False, redact.scrub(f"cannot start {hostname}: {problem}; nothing was stopped"))
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return RestartResult(False, redact.scrub(f"cannot create the run dir {self.run_dir}: {e}"))
        try:
            with self._exclusive(tid) as mine:
                if not mine:
                    return RestartResult(True, f"a restart of {hostname} is already in progress", in_progress=True)
                return self._restart_locked(tid, group.name, hostname, argv, cwd, env, cfg, reason)
        except PlatformError as e:
            return RestartResult(False, redact.scrub(e))

    def pid_of(self, target: Target) -> int | None:
        """The PID of the running worker process of a target (from its pid file), or None."""
        tid = target_id(target.group, target.hostname) if target.hostname else target.id
        pf = read_pidfile(self._paths(tid)[0])
        return pf.pid if pf is not None and alive(pf.pid, pf.start) else None

    def stop(self, target: Target, timeout: float | None = None) -> bool:
        """Stop every running copy of a target (SIGTERM, then SIGKILL after the timeout) and forget
        its pid file. For `supervisor demo`, benchmarks and tests; the loop never stops a worker."""
        group = self.group(target.group)
        cfg = self._restart_cfg(group)
        self._argv(cfg, target.hostname)  # refuses a hostname it cannot build a command for
        tid = target_id(group.name, target.hostname)
        pid_path = self._paths(tid)[0]
        with self._exclusive(tid) as mine:
            if not mine:
                return False
            _, error = self._stop_copies(tid, self._want(cfg, target.hostname), read_pidfile(pid_path),
                                         cfg.stop_timeout if timeout is None else timeout)
            if error is None:
                with contextlib.suppress(OSError):
                    pid_path.unlink()
            self._reap()
            return error is None

    @contextlib.contextmanager
    def _exclusive(self, tid: str) -> Iterator[bool]:
        """Holds the target's lock (this process's threads and other processes alike)."""
        with self._lock:
            if tid in self._busy:
                yield False
                return
            self._busy.add(tid)
        fd = None
        try:
            try:
                fd = os.open(self._paths(tid)[2], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise PlatformError(f"cannot open the lock file {self._paths(tid)[2]}: {e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock
            with self._lock:
                self._busy.discard(tid)

    @staticmethod
    def _cannot_start(argv: list[str], cwd: str | None, env: dict[str, str]) -> str | None:
        """Why the command would not start, checked before anything is stopped."""
        if cwd is not None and not os.path.isdir(cwd):
            return f"working directory {cwd!r} does not exist or is not a directory"
        exe = argv[0]
        if os.sep in exe:
            path = exe if os.path.isabs(exe) else os.path.join(cwd or os.getcwd(), exe)
            if not os.path.isfile(path):
                return f"executable {exe!r} not found"
            if not os.access(path, os.X_OK):
                return f"{exe!r} is not executable"
        elif shutil.which(exe, path=env.get("PATH", os.defpath)) is None:
            return f"executable {exe!r} not found on PATH"
        return None

    def _restart_locked(self, tid: str, group: str, hostname: str, argv: list[str], cwd: str | None,
                        env: dict[str, str], cfg: LocalRestart, reason: str) -> RestartResult:
        pid_path, log_path, _ = self._paths(tid)
        want = replace(self._want(cfg, hostname), argv=tuple(argv))
        stopped, error = self._stop_copies(tid, want, read_pidfile(pid_path), cfg.stop_timeout)
        if error:
            return RestartResult(False, f"{hostname}: {error}; not starting a second copy")
        # start
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))
        try:
            log = open(log_path, "ab")  # noqa: SIM115 (closed by the with below)
        except OSError as e:
            return RestartResult(False, f"{hostname}: cannot open the log file {log_path}: {e}")
        with log:
            stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
            log.write(redact.scrub(f"--- {stamp} celery-supervisor starts {hostname}: {reason}\n").encode())
            log.flush()
            offset = log.tell()
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            except OSError as e:
                what = e.strerror or str(e)
                if e.filename:
                    what = f"{what}: {e.filename!r}"
                msg = f"{hostname}: the command could not start ({what})"
                if stopped:
                    msg += f"; {'; '.join(stopped)}"
                return RestartResult(False, redact.scrub(msg))
        p = read_proc(proc.pid)
        start = p.start if p is not None else None
        with self._lock:
            old = self._children.pop(tid, None)
            if old is not None:
                self._stale.append(old[0])
            self._children[tid] = (proc, start)
            self._exits.pop(tid, None)
            self._gone.pop(tid, None)
            self._running[tid] = (proc.pid, start)
        self._watch_exit(tid, proc.pid, start)
        record = {"pid": proc.pid, "create_time": start, "hostname": hostname, "group": group,
                  "argv": argv, "started_at": time.time()}
        tmp = pid_path.with_name(pid_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, pid_path)
        except OSError as e:
            # the worker runs: the marker and argv still find it; say what is wrong
            stopped.append(f"warning: cannot write the pid file {pid_path}: {e}")
        before = "; ".join(stopped)
        try:
            rc = proc.wait(EARLY_EXIT)
        except subprocess.TimeoutExpired:
            msg = f"started {hostname} as pid {proc.pid}" + (f" ({before})" if before else "")
            return RestartResult(True, redact.scrub(msg))
        detail = describe_exit(rc)
        with self._lock:
            if self._children.get(tid, (None,))[0] is proc:
                del self._children[tid]
                self._exits[tid] = _Exit(proc.pid, start, detail, time.time())
        out = tail_file(log_path, 10, start=offset).strip()
        msg = f"{hostname} exited at once after its start (pid {proc.pid}, {detail})"
        if before:
            msg += f" ({before})"
        msg += f"; last output:\n{out}" if out else "; it wrote no output"
        return RestartResult(False, redact.scrub(msg))

    def _stop_copies(self, tid: str, want: Want, pf: PidFile | None, timeout: float) -> tuple[list[str], str | None]:
        """Stop every running copy of the target: SIGTERM, wait up to `timeout`, SIGKILL, and wait
        for them (and, after SIGKILL, their descendants) to be gone. (notes, error). A process the
        heartbeats name that cannot be verified as the worker: nothing is stopped (error)."""
        sig = Signaller()
        t0 = time.monotonic()
        deadline = t0 + timeout
        termed: dict[tuple[int, float], Proc] = {}
        killed: dict[tuple[int, float], Proc] = {}
        errors: list[str] = []
        heard = self._heard.get(tid)

        def scan_copies() -> tuple[ProcScan, list[Proc], str | None]:
            self._reap()
            scan = ProcScan()
            never = scan.never()  # a pid file naming the supervisor itself is bogus
            roots = scan.copies({tid: want})[tid]
            if pf is not None and pf.start is not None and pf.pid not in never:
                p = scan.procs.get(pf.pid)
                if p is not None and same_start(p.start, pf.start) and not p.gone and all(r.pid != p.pid for r in roots):
                    roots.append(p)
            doubt = None
            if heard is not None and want.hostname:
                p, why = heard_process(scan, heard, tid, want.hostname)
                if p is not None and why is None and all(r.pid != p.pid for r in roots):
                    roots.append(p)
                doubt = why
            return scan, roots, doubt

        try:
            scan, roots, doubt = scan_copies()
            if doubt:
                return [], (f"{doubt}: cannot tell whether it is the worker, so it is neither stopped nor "
                            "doubled; stop it by hand if it is not")
            while True:  # graceful: SIGTERM each copy once, wait for all to be gone
                if not roots:
                    break
                if time.monotonic() >= deadline:
                    break
                for r in roots:
                    if r.key not in termed:
                        err = sig.send(r, signal.SIGTERM)
                        termed[r.key] = r
                        if err:
                            errors.append(err)
                if errors:
                    return [], f"cannot stop the running copy ({'; '.join(errors)})"
                sig.wait([r.key for r in roots], min(0.5, deadline - time.monotonic()))
                scan, roots, _ = scan_copies()
            kill_deadline = time.monotonic() + KILL_WAIT
            while roots or killed:  # forceful: SIGKILL the copies and all below them until all are gone
                victims = {p.key: p for r in roots for p in (r, *scan.descendants(r.pid)) if not p.gone}
                for k, p in killed.items():
                    q = scan.procs.get(p.pid)
                    if q is not None and same_start(q.start, p.start) and not q.gone:
                        victims.setdefault(k, q)
                if not victims:
                    break
                if time.monotonic() >= kill_deadline:
                    left = ", ".join(f"{p.pid} ({p.status})" for p in victims.values())
                    return [], f"processes still alive {KILL_WAIT:.0f}s after SIGKILL: {left}"
                for v in victims.values():
                    err = sig.send(v, signal.SIGKILL)
                    killed.setdefault(v.key, v)
                    if err:
                        return [], f"cannot kill the running copy ({err})"
                time.sleep(0.02)
                scan, roots, _ = scan_copies()
        finally:
            sig.close()
        self._reap()
        notes = []
        took = time.monotonic() - t0
        if termed:
            pids = ", ".join(str(k[0]) for k in termed if k not in killed)
            if pids:
                notes.append(f"stopped pid {pids} with SIGTERM")
        if killed:
            pids = ", ".join(str(k[0]) for k in killed)
            notes.append(f"killed pid {pids} with SIGKILL after {timeout:g}s stop timeout")
        if notes:
            notes[-1] += f" in {took:.1f}s"
        return notes, None

    def close(self) -> None:
        """Workers outlive the supervisor: only reap what has ended and let go of the rest."""
        if self._exit_watch is not None:
            self._exit_watch.close()
            self._exit_watch = None
        self._reap()
        with self._lock:
            self._children.clear()
            self._stale.clear()
