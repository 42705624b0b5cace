"""Durable state in one SQLite file (WAL) at ``loop.state_path``.

What survives a restart of the supervisor (even a SIGKILL):

- ``memory``: the decision core's memory, written once per tick in one transaction together with
  the alerts that tick accepted: rule states, what was announced as firing (so that a restart
  neither re-sends a FIRING alert nor forgets to resolve it), restart grace, group modes (canary),
  flapping, when each firing alert was last sent (``notify.repeat_every``);
- ``restarts``: every restart attempt, written BEFORE the platform is asked (a kill in the middle
  of a restart still counts it against the budget); budgets are computed from it, and
  ``supervisor reset`` clears a target's rows;
- ``outbox``: one row per (alert, channel), accepted in the tick's transaction, marked delivered
  or failed by the notifier; rows still pending are delivered after a restart;
- ``silences``: ``supervisor silence`` writes them, every tick reads them;
- the last tick's status document, for ``supervisor status``.

A file that is not a readable SQLite database, fails its integrity check, or carries a newer
schema than this version knows is moved aside (``<name>.corrupt-<time>``, ``<name>.newer-<time>``)
with an ERROR saying so, and a fresh one is started: never silently lost, never a crash loop.
Several processes may use one file (the daemon, ``status``, ``silence``, ``reset``): WAL plus a
busy timeout.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from supervisor import redact

log = logging.getLogger("supervisor")
SCHEMA_VERSION = 1
HISTORY_KEEP = 7 * 86400.0  # restart rows older than this are pruned
OUTBOX_KEEP = 86400.0  # delivered / given-up outbox rows are kept this long (status)
BUSY_TIMEOUT_MS = 5000
# SQLite's page cache per connection: its default (2 MiB) fills slowly as the status document is
# rewritten every tick, a daemon's RSS creeping up for hours; the file's hot pages fit in this
CACHE_KIB = 512


def _dumps(value: Any) -> str:
    """Compact JSON of a memory value (the status document of a 500-worker fleet every tick): orjson
    where it can (a tenth of the time; a NaN becomes null, valid JSON), the stdlib's json for what
    orjson refuses (an integer past 64 bits) or where it is not installed."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency
        orjson = None
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):
            pass
    return json.dumps(value, separators=(",", ":"))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS memory (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS restarts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, target TEXT NOT NULL, grp TEXT NOT NULL,
    hostname TEXT, reason TEXT, outcome TEXT NOT NULL DEFAULT 'started', message TEXT,
    cleared REAL);
CREATE INDEX IF NOT EXISTS restarts_target ON restarts (target, at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, msg_id TEXT NOT NULL, channel TEXT NOT NULL,
    message TEXT NOT NULL, created REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, last_error TEXT, done_at REAL,
    UNIQUE (msg_id, channel));
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, next_at);
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY AUTOINCREMENT, match TEXT NOT NULL, until REAL NOT NULL,
    reason TEXT NOT NULL, author TEXT, created REAL NOT NULL, expired REAL);
"""


class StateError(Exception):
    """The state file cannot be used at all (e.g. its directory is not writable)."""


class StateLocked(StateError):
    """Another `supervisor run` holds the state file's lock (the file itself is fine)."""


def _oserror(e: OSError) -> str:
    """An OSError as a short reason (the path is named by the caller)."""
    return e.strerror.lower() if e.strerror else str(e)


@dataclass(frozen=True)
class Silence:
    id: int
    match: str  # a group name or a Celery hostname
    until: float
    reason: str
    author: str | None
    created: float

    def covers(self, group: str | None, hostname: str | None, subject: str | None = None) -> bool:
        return self.match in (group, hostname, subject)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RestartRow:
    id: int
    at: float
    target: str
    group: str
    hostname: str | None
    reason: str | None
    outcome: str
    message: str | None


def _aside(path: Path, why: str, tag: str) -> Path:
    dest = path.with_name(f"{path.name}.{tag}-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(dest) + suffix))
    log.error("state file %s %s: moved aside to %s; starting with an empty state "
              "(restart budgets, announced alerts and silences start afresh)", path, why, dest)
    return dest


class StateStore:
    """One SQLite file. Thread-safe (one connection behind a lock); every method commits."""

    def __init__(self, path: str | os.PathLike, clock=time.time, readonly: bool = False,
                 busy_timeout: float = BUSY_TIMEOUT_MS / 1000):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.clock = clock
        self.readonly = readonly
        self.moved_aside: Path | None = None
        self._lock = threading.RLock()
        self._db = self._open()

    # ------------------------------------------------------------ opening
    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.busy_timeout,
                                 check_same_thread=False)
        else:
            db = sqlite3.connect(str(self.path), timeout=self.busy_timeout, check_same_thread=False,
                                 isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        return db

    def _check(self, db: sqlite3.Connection) -> str | None:
        """Why this database cannot be used (None: fine)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            return f"newer:has schema version {version}, newer than this version's {SCHEMA_VERSION}"
        ok = db.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            return f"corrupt:failed its integrity check ({ok})"
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            return "corrupt:holds tables but no celery-supervisor schema version"
        return None

    def _usable(self, readonly: bool) -> int:
        """The file's size (0: none yet), or StateError saying why it cannot be used: SQLite's own
        error for a directory or a file it may not open is "unable to open database file"."""
        import stat

        try:
            st = self.path.stat()
        except FileNotFoundError:
            if readonly:
                raise StateError(f"no state file at {self.path}") from None
            return 0
        except (OSError, ValueError) as e:  # permission denied on a directory, a name too long, a NUL
            why = _oserror(e) if isinstance(e, OSError) else str(e)
            raise StateError(f"cannot use loop.state_path {self.path}: {why}") from None
        if stat.S_ISDIR(st.st_mode):
            raise StateError(f"loop.state_path {self.path} is a directory: name a file in it, "
                             f"e.g. {self.path / 'supervisor-state.db'}")
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"loop.state_path {self.path} is not a regular file")
        try:
            with open(self.path, "rb" if readonly else "r+b"):
                pass
        except OSError as e:
            raise StateError(f"cannot {'read' if readonly else 'write'} the state file {self.path}: "
                             f"{_oserror(e)}") from None
        return st.st_size

    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            self._usable(readonly=True)
            db = None
            try:
                db = self._connect()
                problem = self._check(db)
                if problem is None and not db.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'memory'").fetchone():
                    problem = "x:holds no celery-supervisor state yet"
            except sqlite3.DatabaseError as e:
                problem = f"x:is not a readable SQLite database ({e})"
            if problem is not None:
                if db is not None:
                    db.close()
                raise StateError(f"state file {self.path} {problem.split(':', 1)[1]}")
            return db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            why = _oserror(e) if isinstance(e, OSError) else str(e)
            raise StateError(f"cannot create the directory of loop.state_path {self.path}: {why}") from None
        for attempt in (1, 2):
            size = self._usable(readonly=False)
            db = None
            try:
                db = self._connect()
                problem = self._check(db) if size else None
                if problem is None:
                    db.execute("PRAGMA journal_mode = WAL")
                    db.execute("PRAGMA synchronous = NORMAL")
                    db.executescript(_SCHEMA)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    return db
            except sqlite3.OperationalError as e:
                # locked, busy, read-only, disk full, I/O error: the file may be fine; never move it
                if db is not None:
                    db.close()
                raise StateError(f"cannot use loop.state_path {self.path}: {e}") from None
            except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
                problem = f"corrupt:is not a readable SQLite database ({e})"
            if db is not None:
                db.close()
            if attempt == 2:
                raise StateError(f"state file {self.path} {problem.split(':', 1)[1]}")
            tag, why = problem.split(":", 1)
            try:
                self.moved_aside = _aside(self.path, why, tag)
            except OSError as e:
                raise StateError(f"state file {self.path} {why}, and it cannot be moved aside: {_oserror(e)}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    def _tx(self):
        return _Tx(self)

    # ------------------------------------------------------------ the core's memory
    def load_memory(self) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM memory").fetchall()
        out: dict[str, Any] = {}
        for name, value in rows:
            try:
                out[name] = json.loads(value)
            except ValueError:
                log.error("state file %s: unreadable memory entry %r ignored", self.path, name)
        return out

    def save(self, memory: dict[str, Any], outbox: Iterable[tuple[str, str, dict]] = ()) -> None:
        """The core's memory and the alerts accepted with it, in one transaction (all or nothing).
        ``outbox``: (msg_id, channel, message as JSON-able dict)."""
        now = self.clock()
        with self._lock, self._tx() as db:
            for name, value in memory.items():
                db.execute("INSERT OR REPLACE INTO memory (name, value, updated) VALUES (?, ?, ?)",
                           (name, _dumps(value), now))
            for msg_id, channel, message in outbox:
                db.execute("INSERT OR IGNORE INTO outbox (msg_id, channel, message, created, next_at) "
                           "VALUES (?, ?, ?, ?, ?)", (msg_id, channel, json.dumps(message), now, now))

    def memory_updated(self, name: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT updated FROM memory WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def replica_id(self) -> str:
        """A stable identity of this state file's supervisor (``host:random``), created once: the
        leader lease's holder, so that a leader restarted after a crash takes its own lease back at
        once instead of waiting for it to expire (``run_lock`` keeps one daemon per file)."""
        mem = self.load_memory()
        rid = mem.get("replica_id")
        if isinstance(rid, str) and rid:
            return rid
        import secrets
        import socket

        rid = f"{socket.gethostname()}:{secrets.token_hex(6)}"
        if not self.readonly:
            self.save({"replica_id": rid})
        return rid

    # ------------------------------------------------------------ restarts and budgets
    def restart_started(self, at: float, target: str, group: str, hostname: str | None, reason: str) -> int:
        with self._lock, self._tx() as db:
            cur = db.execute("INSERT INTO restarts (at, target, grp, hostname, reason) VALUES (?, ?, ?, ?, ?)",
                             (at, target, group, hostname, reason))
            return int(cur.lastrowid)

    def restart_finished(self, row_id: int, ok: bool, message: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("UPDATE restarts SET outcome = ?, message = ? WHERE id = ?",
                       ("ok" if ok else "failed", redact.scrub(message)[:2000], row_id))

    def history(self, since: float) -> dict[str, list[float]]:
        """target id -> times of restart attempts since ``since`` (cleared ones excluded), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT target, at FROM restarts WHERE at >= ? AND cleared IS NULL "
                                    "ORDER BY at", (since,)).fetchall()
        out: dict[str, list[float]] = {}
        for target, at in rows:
            out.setdefault(target, []).append(at)
        return out

    def recent_restarts(self, limit: int = 20) -> list[RestartRow]:
        with self._lock:
            rows = self._db.execute("SELECT id, at, target, grp, hostname, reason, outcome, message FROM restarts "
                                    "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [RestartRow(*r) for r in rows]

    def reset(self, target: str) -> int:
        """Clear the restart history of a target id or Celery hostname: its budget is full again.
        Returns the number of attempts cleared."""
        with self._lock, self._tx() as db:
            cur = db.execute("UPDATE restarts SET cleared = ? WHERE cleared IS NULL AND (target = ? OR hostname = ?)",
                             (self.clock(), target, target))
            return cur.rowcount

    def known_targets(self) -> list[tuple[str, str | None]]:
        with self._lock:
            return self._db.execute("SELECT DISTINCT target, hostname FROM restarts").fetchall()

    # ------------------------------------------------------------ outbox
    def outbox_done(self, msg_id: str, channel: str, delivered: bool, error: str | None,
                    retry_at: float | None = None) -> None:
        """A delivery ended: delivered, or failed (``retry_at``: try again then from the outbox;
        None: given up)."""
        now = self.clock()
        with self._lock, self._tx() as db:
            if delivered:
                db.execute("UPDATE outbox SET state = 'delivered', attempts = attempts + 1, done_at = ?, "
                           "last_error = NULL WHERE msg_id = ? AND channel = ?", (now, msg_id, channel))
            elif retry_at is not None:
                db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? "
                           "WHERE msg_id = ? AND channel = ?", (retry_at, error, msg_id, channel))
            else:
                db.execute("UPDATE outbox SET state = 'failed', attempts = attempts + 1, done_at = ?, "
                           "last_error = ? WHERE msg_id = ? AND channel = ?", (now, error, msg_id, channel))

    def outbox_pending(self, due_before: float | None = None) -> list[tuple[str, str, dict, int]]:
        """(msg_id, channel, message, attempts) of alerts not yet delivered, oldest first."""
        q = "SELECT msg_id, channel, message, attempts FROM outbox WHERE state = 'pending'"
        args: tuple = ()
        if due_before is not None:
            q += " AND next_at <= ?"
            args = (due_before,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [(m, c, json.loads(body), a) for m, c, body, a in rows]

    def outbox_row(self, msg_id: str, channel: str) -> tuple[float, int, str, float] | None:
        """(created, attempts, state, next_at) of one outbox row."""
        with self._lock:
            return self._db.execute("SELECT created, attempts, state, next_at FROM outbox "
                                    "WHERE msg_id = ? AND channel = ?",
                                    (msg_id, channel)).fetchone()

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        return dict(rows)

    # ------------------------------------------------------------ silences
    def add_silence(self, match: str, duration: float, reason: str, author: str | None = None) -> Silence:
        now = self.clock()
        with self._lock, self._tx() as db:
            cur = db.execute("INSERT INTO silences (match, until, reason, author, created) VALUES (?, ?, ?, ?, ?)",
                             (match, now + duration, reason, author, now))
            return Silence(int(cur.lastrowid), match, now + duration, reason, author, now)

    def expire_silence(self, match_or_id: str) -> int:
        now = self.clock()
        with self._lock, self._tx() as db:
            cur = db.execute("UPDATE silences SET expired = ? WHERE expired IS NULL AND until > ? "
                             "AND (match = ? OR CAST(id AS TEXT) = ?)", (now, now, match_or_id, match_or_id))
            return cur.rowcount

    def silences(self, now: float | None = None) -> list[Silence]:
        now = self.clock() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT id, match, until, reason, author, created FROM silences "
                                    "WHERE expired IS NULL AND until > ? ORDER BY id", (now,)).fetchall()
        return [Silence(*r) for r in rows]

    # ------------------------------------------------------------ housekeeping
    def prune(self) -> None:
        now = self.clock()
        with self._lock, self._tx() as db:
            db.execute("DELETE FROM restarts WHERE at < ?", (now - HISTORY_KEEP,))
            db.execute("DELETE FROM outbox WHERE state != 'pending' AND done_at < ?", (now - OUTBOX_KEEP,))
            db.execute("DELETE FROM silences WHERE until < ?", (now - HISTORY_KEEP,))


def run_lock(path: str | os.PathLike):
    """An exclusive lock on ``<state_path>.lock`` for the life of a daemon: two `supervisor run`
    on one state file would act twice on the same budgets. Returns the open file (keep it);
    StateError naming the holder's pid when another process has it."""
    import fcntl

    lock_path = Path(str(path) + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+", errors="replace")  # noqa: SIM115 (held for the process's life)
    except (OSError, ValueError) as e:
        why = _oserror(e) if isinstance(e, OSError) else str(e)
        raise StateError(f"cannot create the lock file {lock_path}: {why}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        import errno

        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            f.close()
            raise StateError(f"cannot lock {lock_path}: {_oserror(e)}") from None
        f.seek(0)
        pid = f.read(32).strip() or "?"
        f.close()
        raise StateLocked(f"another `supervisor run` (pid {pid}) already uses the state file {path}: "
                          "run one daemon per loop.state_path (a second replica needs its own)") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception)."""

    def __init__(self, store: StateStore):
        self.db = store._db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error:
                if self.db.in_transaction:  # never leave the connection wedged in a transaction
                    self.db.execute("ROLLBACK")
                raise
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:  # the original error matters more
                pass


def new_msg_id() -> str:
    return uuid.uuid4().hex
