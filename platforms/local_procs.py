"""Which local processes serve a Celery hostname, and signalling them safely (for platforms.local).

A worker is recognised however it was started, by evidence that survives each way:

- its Celery hostname, read from its command line (``celery ... worker -n NAME``, ``python -m
  celery``, the ``celery`` console script, with or without ``-n``: then Celery's default
  ``celery@<this host>``, ``%h``/``%n``/``%d`` expanded as Celery does) or, once setproctitle
  rewrote it, from its title ``[celeryd: NAME:MainProcess] ...`` (pool children read
  ``[celeryd: NAME:ForkPoolWorker-1]``: never a copy of the worker);
- the marker variable ``CELERY_SUPERVISOR_TARGET`` in its environment (what the adapter started);
- the pid its heartbeats report, when that process started before the heartbeat that reported it
  (a pid reused since is younger than the heartbeat).

psutil does the reading (Linux, macOS and the BSDs); a pidfd, where the kernel has them, makes a
signal safe from a PID reused between the scan and the signal.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from platforms import PlatformError

MARKER = "CELERY_SUPERVISOR_TARGET"
HOSTNAME_VAR = "CELERY_WORKER_HOSTNAME"  # celery's click option -n reads it when -n is not given
SAME_START = 1.5  # seconds: two readings of one process's start time agree within this
_GONE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})
_TITLE = re.compile(r"\[celeryd: (?P<host>[^\]\s]+):(?P<role>[A-Za-z][\w-]*)\]")
_GLOBAL_VALUE_OPTIONS = ("-b", "--broker", "--result-backend", "--loader", "--config", "--workdir")
_PYTHON_VALUE_OPTIONS = ("-W", "-X", "--check-hash-based-pycs")


# ---------------------------------------------------------------- one process
@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    status: str  # psutil's: running, sleeping, zombie ...
    start: float  # when it started (psutil's create_time, seconds since the epoch)

    @property
    def key(self) -> tuple[int, float]:
        return (self.pid, self.start)

    @property
    def gone(self) -> bool:
        return self.status in _GONE


def same_start(a: float | None, b: float | None) -> bool:
    """Two readings of one process's start time. On Linux psutil adds the boot time, a whole number
    of seconds that moves when the clock is stepped, so one process may read a second apart; a PID
    reused by another process reads later by at least the first one's lifetime."""
    return a is not None and b is not None and abs(a - b) < SAME_START


def read_proc(pid: int) -> Proc | None:
    """One process (None: no such process, or it cannot be read)."""
    if pid <= 0:
        return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return Proc(pid, p.ppid(), p.status(), p.create_time())
    except psutil.Error:
        return None


def alive(pid: int, start: float | None) -> bool:
    """The process still runs (not a zombie) and is the same process (start time), if given."""
    p = read_proc(pid)
    return p is not None and not p.gone and (start is None or same_start(p.start, start))


# ---------------------------------------------------------------- what a command line says
@dataclass(frozen=True)
class Identity:
    """What a process's command line (or title) says about it."""

    readable: bool  # its command line could be read
    celery: bool = False  # a celery worker process (main or pool child)
    main: bool = False  # a worker's main process (what serves the hostname)
    hostname: str | None = None  # the Celery hostname it serves, when the command line or title says
    app: str | None = None  # its -A/--app, when given
    python: bool = False  # a Python interpreter: it may run a worker we cannot recognise


UNREADABLE = Identity(readable=False)
NOT_A_WORKER = Identity(readable=True)


def expand_hostname(value: str | None) -> str | None:
    """The hostname a worker started with ``-n value`` (None: without -n) serves, as Celery computes
    it: ``name`` alone means ``celery@name``; %h, %n, %d, %i, %I and %% are expanded for this host."""
    from celery.utils.nodenames import default_nodename, host_format

    try:
        return host_format(default_nodename(value))
    except (ValueError, KeyError, TypeError):  # an unknown %x: celery itself refuses to start
        return None


def _take(args: Sequence[str], i: int, short: str | None, long: str) -> tuple[str, int] | None:
    """The value of the option at args[i] (``-n X``, ``-nX``, ``--hostname X``, ``--hostname=X``) and
    the index after it; None when args[i] is another option."""
    a = args[i]
    if a == long or (short is not None and a == short):
        return (args[i + 1], i + 2) if i + 1 < len(args) else ("", i + 1)
    if a.startswith(long + "="):
        return a[len(long) + 1 :], i + 1
    if short is not None and a.startswith(short) and not a.startswith("--") and len(a) > len(short):
        return a[len(short) :], i + 1
    return None


def _celery_args(argv: Sequence[str]) -> Sequence[str] | None:
    """The arguments given to the celery program (after ``celery``, ``python .../celery`` or
    ``python -m celery``), or None when the command line does not run celery."""
    if not argv:
        return None
    base = os.path.basename(argv[0]).lower().removesuffix(".exe")
    if base == "celery":
        return argv[1:]
    if not base.startswith(("python", "pypy")):
        return None
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        a = argv[i]
        if a == "-m" or (a.startswith("-m") and len(a) > 2):
            module, start = (argv[i + 1] if i + 1 < len(argv) else "", i + 2) if a == "-m" else (a[2:], i + 1)
            return argv[start:] if module in ("celery", "celery.__main__") else None
        if a.startswith("-c"):  # python -c CODE
            return None
        i += 2 if a in _PYTHON_VALUE_OPTIONS else 1
    if i < len(argv) and os.path.basename(argv[i]).lower().removesuffix(".exe") == "celery":
        return argv[i + 1 :]
    return None


def worker_of(argv: Sequence[str], env_hostname: Callable[[], str | None] = lambda: None) -> Identity | None:
    """The identity of a ``celery ... worker`` main process from its argv (None: not one).
    ``env_hostname``: reads CELERY_WORKER_HOSTNAME from its environment (celery's -n falls back on it)."""
    args = _celery_args(argv)
    if args is None:
        return None
    app, i, command = None, 0, None
    while i < len(args):  # celery's own options, then the sub-command
        a = args[i]
        got = _take(args, i, "-A", "--app")
        if got is not None:
            app, i = got
            continue
        if a.startswith("-"):
            i += 2 if a in _GLOBAL_VALUE_OPTIONS else 1
            continue
        command = a
        break
    if command != "worker":
        return None
    hostname: str | None = None
    named = False
    j = i + 1
    while j < len(args):
        got = _take(args, j, "-n", "--hostname")
        if got is not None:
            hostname, j = got
            named = True
            continue
        got = _take(args, j, "-A", "--app")
        if got is not None:
            app, j = got
            continue
        j += 1
    if not named:
        hostname = env_hostname()
    return Identity(readable=True, celery=True, main=True, hostname=expand_hostname(hostname), app=app or None)


def title_of(text: str) -> Identity | None:
    """The identity of a process whose title celery set through setproctitle
    (``[celeryd: celery@x:MainProcess] -active- (-A proj worker ...)``), else None."""
    if not text.startswith("[celeryd"):
        return None
    m = _TITLE.match(text)
    if m is None:  # cut short (the title may not be longer than the original command line)
        return Identity(readable=True, celery=True)
    app = None
    _, paren, rest = text.partition(" (")
    if paren:
        complete = rest.endswith(")")
        words = rest.removesuffix(")").split()
        if not complete:
            words = words[:-1]  # the last word may be cut
        for k in range(len(words)):
            got = _take(words, k, "-A", "--app")
            if got is not None and got[1] <= len(words) and got[0]:
                app = got[0]
                break
    return Identity(readable=True, celery=True, main=m["role"] == "MainProcess", hostname=m["host"], app=app)


def same_app(a: str | None, b: str | None) -> bool:
    """Two -A values name the same project (unknown on either side: cannot tell, so yes). Two
    projects on one host may both run workers with Celery's default hostname."""
    if not a or not b:
        return True
    return a.split(":", 1)[0].split(".", 1)[0] == b.split(":", 1)[0].split(".", 1)[0]


# ---------------------------------------------------------------- all processes
@dataclass(frozen=True)
class Want:
    """What identifies the worker of one target: the command the adapter would run (``argv``, a
    hand-started copy of it), its Celery hostname and its -A app (from that command)."""

    argv: tuple[str, ...] | None
    hostname: str | None
    app: str | None = None


class ProcScan:
    """One pass over the processes: each one's parent, status and start time; its command line and
    environment are read only when asked for (and remembered for the rest of the pass)."""

    def __init__(self, only: Iterable[int] | None = None) -> None:
        """``only``: these pids alone (no listing of every process)."""
        self.procs: dict[int, Proc] = {}
        self._handles: dict[int, psutil.Process] = {}
        if only is not None:
            for pid in only:
                p = read_proc(pid)
                if p is not None:
                    self.procs[pid] = p
        else:
            try:
                it = list(psutil.process_iter(["ppid", "status", "create_time"]))
            except psutil.Error as e:
                raise PlatformError(f"cannot list the processes: {e}") from None
            for h in it:
                info = h.info
                if h.pid <= 0 or info.get("ppid") is None or info.get("create_time") is None:
                    continue
                self.procs[h.pid] = Proc(h.pid, info["ppid"], info.get("status") or "?", info["create_time"])
                self._handles[h.pid] = h
        self._argv: dict[int, tuple[str, ...] | None] = {}
        self._env: dict[int, dict[str, str] | None] = {}
        self._ident: dict[int, Identity] = {}
        self._children: dict[int, list[int]] | None = None

    def _handle(self, pid: int) -> psutil.Process | None:
        h = self._handles.get(pid)
        if h is None:
            try:
                h = self._handles[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return h

    def argv(self, pid: int) -> tuple[str, ...] | None:
        """Its command line; () when it has none (a kernel thread, a zombie), None when unreadable."""
        if pid not in self._argv:
            h = self._handle(pid)
            try:
                self._argv[pid] = tuple(h.cmdline()) if h is not None else ()
            except psutil.NoSuchProcess:  # gone mid-scan (a zombie too)
                self._argv[pid] = ()
            except psutil.Error:  # another user's process
                self._argv[pid] = None
        return self._argv[pid]

    def environ(self, pid: int) -> dict[str, str] | None:
        if pid not in self._env:
            h = self._handle(pid)
            try:
                self._env[pid] = h.environ() if h is not None else None
            except (psutil.Error, OSError):  # another user's process, gone, or unreadable
                self._env[pid] = None
        return self._env[pid]

    def marker(self, pid: int) -> str | None:
        env = self.environ(pid)
        return env.get(MARKER) if env else None

    def identity(self, pid: int) -> Identity:
        if pid not in self._ident:
            argv = self.argv(pid)
            if argv is None:
                ident = UNREADABLE
            elif not argv:
                ident = NOT_A_WORKER
            else:
                ident = title_of(" ".join(a for a in argv if a)) if argv[0].startswith("[celeryd") else None
                if ident is None:
                    ident = worker_of(argv, lambda: (self.environ(pid) or {}).get(HOSTNAME_VAR))
                if ident is None:
                    base = os.path.basename(argv[0]).lower()
                    ident = Identity(readable=True, python=base.startswith(("python", "pypy")))
            self._ident[pid] = ident
        return self._ident[pid]

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

    @staticmethod
    def never() -> set[int]:
        """This process and its ancestors: never a copy of a worker."""
        out = {os.getpid()}
        with contextlib.suppress(psutil.Error):
            out |= {p.pid for p in psutil.Process().parents()}
        return out

    def copies(self, wanted: Mapping[str, Want]) -> dict[str, list[Proc]]:
        """For each target id: the live processes that are a copy of its worker (its marker, its
        exact command, or a celery worker main process serving its hostname, of the same -A app
        where both say) and whose parent is not (pool children and a worker's own subprocesses are
        not copies)."""
        by_argv: dict[tuple[str, ...], set[str]] = {}
        by_host: dict[str, set[str]] = {}
        for tid, w in wanted.items():
            if w.argv:
                by_argv.setdefault(tuple(w.argv), set()).add(tid)
            if w.hostname:
                by_host.setdefault(w.hostname, set()).add(tid)
        memo: dict[int, frozenset[str]] = {}

        def owners(pid: int) -> frozenset[str]:
            if pid not in memo:
                found: set[str] = set()
                a = self.argv(pid)
                if a:  # kernel threads, zombies and unreadable processes have no environment to read
                    m = self.marker(pid)
                    if m is not None and m in wanted:
                        found.add(m)
                    found |= by_argv.get(a, set())
                    if by_host:
                        ident = self.identity(pid)
                        if ident.main and ident.hostname is not None:
                            found |= {t for t in by_host.get(ident.hostname, ()) if same_app(ident.app, wanted[t].app)}
                memo[pid] = frozenset(found)
            return memo[pid]

        exclude = self.never()
        result: dict[str, list[Proc]] = {tid: [] for tid in wanted}
        for pid, p in self.procs.items():
            if pid in exclude or p.gone:
                continue
            mine = owners(pid)
            if not mine:
                continue
            ident = self.identity(pid)
            if ident.celery and not ident.main and ident.hostname is not None:
                continue  # a pool child (setproctitle says so): goes with its worker
            parents = owners(p.ppid) if p.ppid in self.procs else frozenset()
            for tid in mine - parents:
                result[tid].append(p)
        return result


# ---------------------------------------------------------------- heartbeat evidence
@dataclass(frozen=True)
class Heard:
    """What the heartbeats said: the worker's pid, and when we heard it (our clock, wall time)."""

    pid: int
    at: float


def heard_process(scan: ProcScan | None, heard: Heard, tid: str, hostname: str) -> tuple[Proc | None, str | None]:
    """The process that sent the heartbeats, if it still runs here: (proc, None) when it is the
    worker; (proc, why) when a process with that pid started before the heartbeat but cannot be
    verified as the worker (the adapter then must not start another); (None, None) otherwise."""
    s = scan if scan is not None else ProcScan(only=[heard.pid])  # one process: no need to list them all
    p = s.procs.get(heard.pid)
    if p is None or p.gone or p.start > heard.at or p.pid in s.never():  # gone, or a younger process reusing its pid
        return None, None
    m = s.marker(p.pid)
    if m is not None:
        return (p, None) if m == tid else (None, None)
    ident = s.identity(p.pid)
    if ident.celery and ident.hostname is not None:
        return (p, None) if ident.main and ident.hostname == hostname else (None, None)
    if not ident.readable:
        return p, (f"pid {p.pid}, which its heartbeats report, runs but its command line cannot be read "
                      "(another user's process?)")
    if ident.celery:
        return p, f"pid {p.pid}, which its heartbeats report, is a celery process whose title does not name its hostname"
    if ident.python:
        return p, (f"pid {p.pid}, which its heartbeats report, is a Python process that does not look like "
                      f"a celery worker ({' '.join((s.argv(p.pid) or ())[:4])[:120]})")
    return None, None


# ---------------------------------------------------------------- signals
class Signaller:
    """Signals processes by (pid, start time), through a pidfd where the kernel has them, so that
    a PID reused between the scan and the signal is never hit. Keeps the pidfds to wait on."""

    def __init__(self) -> None:
        self.fds: dict[tuple[int, float], int] = {}

    def send(self, p: Proc, sig: int) -> str | None:
        """None when sent (or the process is already gone); else why not."""
        fd = self.fds.get(p.key)
        if fd is None:
            try:
                fd = os.pidfd_open(p.pid)
            except ProcessLookupError:
                return None
            except (AttributeError, OSError):  # not Linux, or an old kernel: check, then kill
                fd = None
            if fd is not None:
                self.fds[p.key] = fd
        try:
            now = read_proc(p.pid)
            if now is None or not same_start(now.start, p.start):
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

    def wait(self, keys: Iterable[tuple[int, float]], timeout: float) -> None:
        """Until one of these processes exits, or timeout."""
        if timeout <= 0:
            return
        fds = [self.fds[k] for k in keys if k in self.fds]
        if not fds or not hasattr(select, "poll"):
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


# ---------------------------------------------------------------- exit watch (supervisor/wake.py)
class ExitWatch:
    """Calls ``wake(reason)`` the moment a watched process exits: one thread polls a pidfd per
    process (Linux >= 5.3), or, without pidfds, checks the watched pids every ``POLL`` seconds.
    ``watch(pid, start, label)`` adds a process (checked against its start time, so a reused pid
    is never watched in its place); a process that is gone already wakes at once. A process is
    watched until it exits; ``close()`` stops the thread."""

    POLL = 0.25

    def __init__(self, wake: Callable[[str], None]):
        import threading

        self.wake = wake
        self._lock = threading.Lock()
        self._want: dict[int, tuple[float | None, str]] = {}  # pid -> (start, label), not yet opened
        self._fds: dict[int, tuple[int, str]] = {}  # pid -> (pidfd or -1, label)
        self._pidfd = hasattr(os, "pidfd_open")
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._closed = False
        self.exits = 0  # exits reported (tests, narration)
        self._thread = threading.Thread(target=self._run, name="local:exit-watch", daemon=True)
        self._thread.start()

    def watch(self, pid: int, start: float | None, label: str) -> None:
        with self._lock:
            if self._closed or pid in self._fds or pid in self._want:
                return
            self._want[pid] = (start, label)
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")
        self._thread.join(2.0)

    def _open(self) -> list[str]:
        """Open what was asked for; the labels of processes already gone."""
        with self._lock:
            want, self._want = self._want, {}
        gone = []
        for pid, (start, label) in want.items():
            fd = -1
            if self._pidfd:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    fd = None
                except OSError:
                    self._pidfd = False  # not in this kernel: poll instead
                    fd = -1
            if fd is None or not alive(pid, start):  # checked after opening: the fd is that process
                if fd is not None and fd >= 0:
                    os.close(fd)
                gone.append(f"{label}: pid {pid} is gone")
                continue
            old = self._fds.pop(pid, None)
            if old is not None and old[0] >= 0:
                os.close(old[0])
            self._fds[pid] = (fd, label)
        return gone

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
            gone = self._open()
            poller = select.poll()
            poller.register(self._r, select.POLLIN)
            polled = False
            for fd, _label in self._fds.values():
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
                else:
                    polled = True
            if not gone:
                try:
                    events = poller.poll(self.POLL * 1000 if polled else None)
                except InterruptedError:
                    continue
                ready = {fd for fd, _ in events}
                if self._r in ready:
                    with contextlib.suppress(OSError):
                        os.read(self._r, 4096)
                for pid, (fd, label) in list(self._fds.items()):
                    if (fd >= 0 and fd in ready) or (fd < 0 and not alive(pid, None)):
                        del self._fds[pid]
                        if fd >= 0:
                            os.close(fd)
                        gone.append(f"{label}: pid {pid} exited")
            for reason in gone:
                self.exits += 1
                try:
                    self.wake(reason)
                except Exception:  # the waker must never end the watch
                    pass
        for fd, _label in self._fds.values():
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
