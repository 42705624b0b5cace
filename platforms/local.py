"""The ``local`` platform: workers run as local processes started from a command-line template.

For development, demos and hosts without systemd, and as careful as the others: a restart never
leaves two copies of one worker. Before starting, every running copy is found and stopped
(SIGTERM, ``restart.stop_timeout``, then SIGKILL, and waited for):

- the process in the target's pid file, if it is still the same process (the pid file records
  the process start time, field 22 of ``/proc/PID/stat``, so a reused PID is not mistaken for it);
- any process whose environment carries ``CELERY_SUPERVISOR_TARGET=<target id>``, the marker set
  on everything this adapter starts (prefork pool children inherit it: only processes whose parent
  does not carry the same marker count as copies);
- any process whose argv equals the rendered argv exactly (a worker started by hand).

Files, per target, in the run dir (``platforms.local.run_dir``, else ``supervisor-local`` next to
``loop.state_path``): ``<id>.pid`` (JSON: pid, start_time, hostname, group, argv, started_at),
``<id>.log`` (the worker's stdout and stderr, appended) and ``<id>.lock`` (held during a restart,
so that two restarts of one target, in threads or processes, never interleave).

Linux only (it reads ``/proc``). Workers are started in a session of their own and outlive the
supervisor; run the supervisor with systemd's ``KillMode=process`` if its stop must not stop them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from platforms import Platform, PlatformError, render
from supervisor import redact
from supervisor.config import LocalRestart
from supervisor.model import RestartResult, Target

if TYPE_CHECKING:
    from supervisor.config import Config, GroupConfig

MARKER = "CELERY_SUPERVISOR_TARGET"
EARLY_EXIT = 0.2  # a process that dies this soon after its start is reported by restart() itself
KILL_WAIT = 5.0  # how long SIGKILLed processes may take to be gone before restart() gives up
LOG_ROTATE_BYTES = 10 * 1024 * 1024  # at a start, a bigger log is moved to <id>.log.1
TAIL_MAX_BYTES = 1024 * 1024  # logs() reads at most this much from the end of the file
_PF_KTHREAD = 0x00200000
_SAFE = re.compile(r"[^A-Za-z0-9_.@+-]")
_SECRET_NAME = re.compile(r"PASS|PWD|TOKEN|SECRET|KEY|URL|CREDENTIAL|AUTH|DSN|PRIVATE|COOKIE", re.I)


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


# ---------------------------------------------------------------- /proc
@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # R S D Z T ... (field 3 of /proc/PID/stat)
    start: int  # clock ticks after boot (field 22)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)


def read_proc(pid: int) -> Proc | None:
    """One process from /proc/PID/stat (None: no such process, or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    close = data.rfind(b")")  # comm may hold spaces and parentheses
    fields = data[close + 2 :].split()
    try:
        if int(fields[6]) & _PF_KTHREAD:
            return None
        return Proc(pid, int(fields[1]), fields[0].decode("ascii", "replace"), int(fields[19]))
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int | None) -> bool:
    """The process still runs (not a zombie) and is the same process (start time), if given."""
    p = read_proc(pid)
    return p is not None and p.state not in ("Z", "X", "x") and (start is None or p.start == start)


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone mid-scan, or another user's process
        return None


def _expand_hostname(value: str) -> str:
    """Celery's -n expansions: %h (this host's name), %n (its first label), %d (the rest)."""
    if "%" not in value:
        return value
    host = socket.gethostname()
    name, _, domain = host.partition(".")
    return value.replace("%h", host).replace("%n", name).replace("%d", domain).replace("%%", "%")


def celery_hostname(argv: tuple[str, ...]) -> str | None:
    """The Celery hostname of a `celery ... worker -n NAME` command line, or None if it is not one."""
    if "worker" not in argv or not any("celery" in os.path.basename(a) or a == "celery" for a in argv[:4]):
        return None
    for i, a in enumerate(argv):
        if a in ("-n", "--hostname") and i + 1 < len(argv):
            return _expand_hostname(argv[i + 1])
        if a.startswith("--hostname="):
            return _expand_hostname(a.split("=", 1)[1])
        if a.startswith("-n") and len(a) > 2 and not a.startswith("--"):
            return _expand_hostname(a[2:])
    return None


class ProcScan:
    """One pass over /proc: each process's parent, state and start time; its argv and its marker
    are read only when asked for (and remembered for the rest of the pass)."""

    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        try:
            names = os.listdir("/proc")
        except OSError as e:
            raise PlatformError(f"cannot list /proc: {e}") from None
        for name in names:
            if name.isdigit():
                p = read_proc(int(name))
                if p is not None:
                    self.procs[p.pid] = p
        self._argv: dict[int, tuple[str, ...] | None] = {}
        self._marker: dict[int, str | None] = {}
        self._children: dict[int, list[int]] | None = None

    def argv(self, pid: int) -> tuple[str, ...] | None:
        if pid not in self._argv:
            data = _read_bytes(f"/proc/{pid}/cmdline")
            if not data:
                self._argv[pid] = None
            else:
                self._argv[pid] = tuple(os.fsdecode(a) for a in data.rstrip(b"\0").split(b"\0"))
        return self._argv[pid]

    def marker(self, pid: int) -> str | None:
        if pid not in self._marker:
            value = None
            data = _read_bytes(f"/proc/{pid}/environ")
            if data:
                key = MARKER.encode() + b"="
                if data.startswith(key):
                    i = len(key)
                else:
                    i = data.find(b"\0" + key)
                    i = i + 1 + len(key) if i >= 0 else -1
                if i >= 0:
                    j = data.find(b"\0", i)
                    value = os.fsdecode(data[i : j if j >= 0 else len(data)])
            self._marker[pid] = value
        return self._marker[pid]

    def children(self, pid: int) -> list[int]:
        if self._children is None:
            self._children = {}
            for p in self.procs.values():
                self._children.setdefault(p.ppid, []).append(p.pid)
        return self._children.get(pid, [])

    def descendants(self, pid: int) -> list[Proc]:
        out, todo, seen = [], list(self.children(pid)), {pid}
        while todo:
            c = todo.pop()
            if c in seen or c not in self.procs:
                continue
            seen.add(c)
            out.append(self.procs[c])
            todo.extend(self.children(c))
        return out

    def ancestors(self, pid: int) -> set[int]:
        out: set[int] = set()
        p = self.procs.get(pid)
        while p is not None and p.ppid not in out and p.ppid > 0:
            out.add(p.ppid)
            p = self.procs.get(p.ppid)
        return out

    def copies(self, wanted: dict[str, tuple[str, ...] | None],
               hostnames: dict[str, str] | None = None) -> dict[str, list[Proc]]:
        """For each target id: the live processes that are a copy of its worker (marker, exact
        argv, or a celery worker whose -n/--hostname is the target's Celery hostname: a worker
        started by hand through the `celery` script runs as `python .../celery ...`) and whose
        parent is not (pool children and a worker's own subprocesses are not copies). This process
        and its ancestors never are."""
        by_argv: dict[tuple[str, ...], set[str]] = {}
        for tid, argv in wanted.items():
            if argv:
                by_argv.setdefault(tuple(argv), set()).add(tid)
        by_host: dict[str, set[str]] = {}
        for tid, h in (hostnames or {}).items():
            by_host.setdefault(h, set()).add(tid)
        owners_memo: dict[int, frozenset[str]] = {}

        def owners(pid: int) -> frozenset[str]:
            if pid not in owners_memo:
                found: set[str] = set()
                m = self.marker(pid)
                if m is not None and m in wanted:
                    found.add(m)
                if by_argv or by_host:
                    a = self.argv(pid)
                    if a is not None:
                        found |= by_argv.get(a, set())
                        if by_host:
                            h = celery_hostname(a)
                            if h is not None:
                                found |= by_host.get(h, set())
                owners_memo[pid] = frozenset(found)
            return owners_memo[pid]

        me = os.getpid()
        exclude = {me} | self.ancestors(me)
        result: dict[str, list[Proc]] = {tid: [] for tid in wanted}
        for pid, p in self.procs.items():
            if pid in exclude or p.state in ("Z", "X", "x"):
                continue
            mine = owners(pid)
            if not mine:
                continue
            parents = owners(p.ppid) if p.ppid in self.procs else frozenset()
            for tid in mine - parents:
                result[tid].append(p)
        return result


class _Signaller:
    """Signals processes by (pid, start time), through a pidfd where the kernel has them, so that
    a PID reused between the scan and the signal is never hit. Keeps the pidfds to wait on."""

    def __init__(self) -> None:
        self.fds: dict[tuple[int, int], int] = {}

    def send(self, p: Proc, sig: int) -> str | None:
        """None when sent (or the process is already gone); else why not."""
        fd = self.fds.get(p.key)
        if fd is None:
            try:
                fd = os.pidfd_open(p.pid)
            except ProcessLookupError:
                return None
            except (AttributeError, OSError):
                fd = None
            if fd is not None:
                self.fds[p.key] = fd
        try:
            now = read_proc(p.pid)
            if now is None or now.start != p.start:
                return None
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(p.pid, sig)
        except ProcessLookupError:
            return None
        except PermissionError:
            return f"pid {p.pid}: permission denied"
        except OSError as e:
            return f"pid {p.pid}: {e.strerror or e}"
        return None

    def wait(self, keys: Iterable[tuple[int, int]], timeout: float) -> None:
        """Until one of these processes exits, or timeout."""
        if timeout <= 0:
            return
        fds = [self.fds[k] for k in keys if k in self.fds]
        if not fds:
            time.sleep(min(timeout, 0.05))
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


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
    start: int | None
    hostname: str | None
    group: str | None
    started_at: float | None


def read_pidfile(path: Path) -> PidFile | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PidFile(
            int(data["pid"]),
            int(data["start_time"]) if data.get("start_time") is not None else None,
            data.get("hostname"),
            data.get("group"),
            data.get("started_at"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _boot_time() -> float:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


@dataclass(frozen=True)
class _Exit:
    pid: int
    start: int | None
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
        self._children: dict[str, tuple[subprocess.Popen, int | None]] = {}  # what we started: proc, start
        self._stale: list[subprocess.Popen] = []  # older children not reaped yet
        self._exits: dict[str, _Exit] = {}  # our children we reaped, last per target
        self._running: dict[str, tuple[int, int | None]] = {}  # last seen running (pid, start)
        self._gone: dict[str, tuple[int, int | None, float]] = {}  # seen going away: pid, start, when
        self._busy: set[str] = set()  # restarts in progress in this process
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._btime = _boot_time()

    # ---- paths and commands (no I/O)
    def _paths(self, tid: str) -> tuple[Path, Path, Path]:
        return self.run_dir / f"{tid}.pid", self.run_dir / f"{tid}.log", self.run_dir / f"{tid}.lock"

    def _restart_cfg(self, group: GroupConfig) -> LocalRestart:
        r = group.restart
        if not isinstance(r, LocalRestart):
            raise PlatformError(f"group {group.name!r} does not restart through the local platform")
        return r

    def _argv(self, cfg: LocalRestart, hostname: str) -> list[str]:
        try:
            argv = shlex.split(render(cfg.target, hostname))
        except (KeyError, IndexError, ValueError) as e:
            raise PlatformError(f"cannot build the command for {hostname}: {e}") from None
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

    def _since(self, start: int | None) -> float | None:
        if start is None or not self._btime:
            return None
        return self._btime + start / self._hz

    def target_for(self, group: GroupConfig, hostname: str) -> Target:
        return Target(id=target_id(group.name, hostname), group=group.name, hostname=hostname)

    def describe(self, target: Target) -> str:
        try:
            cfg = self._restart_cfg(self.group(target.group))
        except (KeyError, PlatformError):
            return f"(group {target.group!r} has no local restart command)"
        try:
            command = render(cfg.target, target.hostname or "{hostname}")
        except (KeyError, IndexError, ValueError):
            command = cfg.target
        parts = []
        if cfg.cwd:
            parts.append(f"cd {shlex.quote(cfg.cwd)} &&")
        for name, value in cfg.env.items():
            secretish = _SECRET_NAME.search(name) or "://" in value or "@" in value or redact.looks_like_token(value)
            shown = redact.MASK if secretish else shlex.quote(value)
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

    def inventory(self, group: GroupConfig, known: Iterable[str] = ()) -> list[Target]:
        cfg = self._restart_cfg(group)
        self._reap()
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
                results[h] = Target(tid, group.name, h, "running", f"pid {pf.pid}", self._since(pf.start))
                self._seen_running(tid, pf.pid, pf.start)
            else:
                pending[tid] = h
        if pending:
            scan = ProcScan()
            found = scan.copies({tid: self._argv_or_none(cfg, h) for tid, h in pending.items()}, pending)
            for tid, h in pending.items():
                roots = found.get(tid) or []
                if roots:
                    pids = ", ".join(str(p.pid) for p in roots)
                    what = f"pid {pids}" if len(roots) == 1 else f"{len(roots)} copies: pids {pids}"
                    results[h] = Target(tid, group.name, h, "running", f"{what} (not from its pid file)",
                                        self._since(roots[0].start))
                    self._seen_running(tid, roots[0].pid, roots[0].start)
                else:
                    results[h] = self._not_running(tid, group.name, h, now, pidfiles.get(h))
        return [results[h] for h in hostnames]

    def _seen_running(self, tid: str, pid: int, start: int | None) -> None:
        with self._lock:
            self._running[tid] = (pid, start)
            self._gone.pop(tid, None)
            self._exits.pop(tid, None)

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
        # the supervisor's environment, less what holds its own secrets (Apprise URLs, passwords it
        # read through ${VAR}): a worker gets those only when `env` names them
        env = {k: v for k, v in os.environ.items() if redact.scrub(v) == v}
        env.update(cfg.env)
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
        argv = tuple(self._argv(cfg, target.hostname))
        tid = target_id(group.name, target.hostname)
        pid_path = self._paths(tid)[0]
        with self._exclusive(tid) as mine:
            if not mine:
                return False
            _, error = self._stop_copies(tid, argv, read_pidfile(pid_path), target.hostname,
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
        stopped, error = self._stop_copies(tid, tuple(argv), read_pidfile(pid_path), hostname, cfg.stop_timeout)
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
        record = {"pid": proc.pid, "start_time": start, "hostname": hostname, "group": group,
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

    def _stop_copies(self, tid: str, argv: tuple[str, ...], pf: PidFile | None, hostname: str | None,
                     timeout: float) -> tuple[list[str], str | None]:
        """Stop every running copy of the target: SIGTERM, wait up to `timeout`, SIGKILL, and wait
        for them (and, after SIGKILL, their descendants) to be gone. (notes, error)."""
        sig = _Signaller()
        t0 = time.monotonic()
        deadline = t0 + timeout
        termed: dict[tuple[int, int], Proc] = {}
        killed: dict[tuple[int, int], Proc] = {}
        errors: list[str] = []
        never = {os.getpid(), os.getppid()}  # a pid file naming the supervisor itself is bogus

        def scan_copies() -> tuple[ProcScan, list[Proc]]:
            self._reap()
            scan = ProcScan()
            roots = scan.copies({tid: argv}, {tid: hostname} if hostname else None)[tid]
            if pf is not None and pf.start is not None and pf.pid not in never:
                p = scan.procs.get(pf.pid)
                if p is not None and p.start == pf.start and p.state not in ("Z", "X", "x") \
                        and all(r.pid != p.pid for r in roots):
                    roots.append(p)
            return scan, roots

        try:
            while True:  # graceful: SIGTERM each copy once, wait for all to be gone
                scan, roots = scan_copies()
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
            kill_deadline = time.monotonic() + KILL_WAIT
            while roots or killed:  # forceful: SIGKILL the copies and all below them until all are gone
                victims = {p.key: p for r in roots for p in (r, *scan.descendants(r.pid))
                           if p.state not in ("Z", "X", "x")}
                for k, p in killed.items():
                    q = scan.procs.get(p.pid)
                    if q is not None and q.start == p.start and q.state not in ("Z", "X", "x"):
                        victims.setdefault(k, q)
                if not victims:
                    break
                if time.monotonic() >= kill_deadline:
                    left = ", ".join(f"{p.pid} ({p.state})" for p in victims.values())
                    return [], f"processes still alive {KILL_WAIT:.0f}s after SIGKILL: {left}"
                for v in victims.values():
                    err = sig.send(v, signal.SIGKILL)
                    killed.setdefault(v.key, v)
                    if err:
                        return [], f"cannot kill the running copy ({err})"
                time.sleep(0.02)
                scan, roots = scan_copies()
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
        self._reap()
        with self._lock:
            self._children.clear()
            self._stale.clear()
