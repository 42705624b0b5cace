"""One compatibility run: every scenario of one Celery version as a group of its own under one real
`supervisor run` (local platform, the tests' private Redis, alerts to a local HTTP catcher), driven
through its phases once for all scenarios, each scenario measured on its own:

1. start: each worker is started by hand, as its user would (the command line of its group's
   `restart.target`, the broker URL in the environment, nothing from the supervisor: no marker),
   and must answer a targeted ping;
2. healthy: `supervisor run` starts, then HEALTHY_S seconds after its first tick with nothing wrong;
3. busy: one task of BUSY_TASK_S seconds per worker (longer than `heartbeat_timeout`, shorter than
   `hung_timeout`); halfway, `supervisor once --dry-run --json` is asked what it sees;
4. kill: SIGKILL of the main process of each worker in turn, timing the restart and the first pong;
5. busy2: the busy phase again, now that the supervisor itself started every worker (after grace).

What the tests then check (the ``*_problems`` functions below) is what a user would: restarts recorded by the
supervisor (`supervisor status --json`) and starts of the command (lines in its log), alerts
delivered, the worker's status, pongs, and how many copies of the worker run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from tests.compat.scenarios import SCENARIOS, Scenario
from tests.support.catchers import HttpCatcher
from tests.support.compat_venvs import FLAVOURS, venv_for
from tests.support.fleet import Fleet
from tests.support.workers import APP_DIR, celery_app

HEALTHY_S = 40.0
HEARTBEAT_TIMEOUT = 5.0
HUNG_TIMEOUT = 60.0
BUSY_TASK_S = 15.0  # > heartbeat_timeout, < hung_timeout
BUSY_ONCE_AT = 9.0  # seconds into the busy tasks: every solo worker has been silent > heartbeat_timeout
BUSY_WATCH_S = BUSY_TASK_S + 5.0
START_TIMEOUT = 90.0  # all workers up (they start together on a small machine)
PING_TIMEOUT = 45.0  # SIGKILL -> pong, per worker
KILL_SETTLE_S = 8.0  # after the last pong: no second restart may follow
GRACE_S = 20.0  # restart.grace: a restarted worker is not judged for that long
BUSY_PHASES = {"busy": "started by hand", "busy2": "started by the supervisor"}
MARKER = "CELERY_SUPERVISOR_TARGET"  # what the local platform sets in what it starts


# ---------------------------------------------------------------- /proc, for counting copies
def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[1]), fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    s = _stat(pid)
    return s[2] if s else None


def alive(pid: int | None, start: int | None = None) -> bool:
    if not pid:
        return False
    s = _stat(pid)
    return s is not None and s[1] not in ("Z", "X") and (start is None or s[2] == start)


def _marker(pid: int) -> str | None:
    env = _read(f"/proc/{pid}/environ") or b""
    for item in env.split(b"\0"):
        if item.startswith(MARKER.encode() + b"="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def _cmdline(pid: int) -> str:
    return (_read(f"/proc/{pid}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace").strip()


def copies(tid: str | None, queue: str, hostname: str | None = None) -> list[tuple[int, str]]:
    """The top processes of a worker on this host: those carrying the local platform's marker for
    it, or its queue (unique to the scenario) or its hostname (None: the worker has no -n) on their
    command line or setproctitle title, whose parent is not one of them. One running worker is one
    such process (its pool children sit below it); an orphaned pool child counts as one more.
    [(pid, cmdline)]."""
    pattern = re.compile(r"(^|[\s\[(])(" + "|".join(re.escape(x) for x in (queue, hostname) if x) + r")($|[\s:)\]])")

    memo: dict[int, bool] = {}

    def serves(pid: int) -> bool:
        if pid not in memo:
            s = _stat(pid)
            memo[pid] = bool(s and s[1] not in ("Z", "X") and (
                (tid is not None and _marker(pid) == tid) or pattern.search(_cmdline(pid))))
        return memo[pid]

    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        if serves(pid):
            s = _stat(pid)
            if s is not None and not serves(s[0]):
                out.append((pid, _cmdline(pid)[:240]))
    return out


def processes_marked(tids: set[str]) -> list[int]:
    """Every process carrying one of these markers (for the final cleanup, by PID)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and _marker(int(name)) in tids:
            out.append(int(name))
    return out


# ---------------------------------------------------------------- pings
def ping(app, hostname: str, timeout: float = 0.5) -> bool:
    """A targeted ping on a fresh connection (a pooled one can miss replies after a failed ping)."""
    try:
        with app.connection_for_write() as conn:
            return bool(app.control.ping(destination=[hostname], timeout=timeout, limit=1, connection=conn))
    except Exception:
        time.sleep(0.1)
        return False


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _title_body(q) -> tuple[str, str]:
    if isinstance(q.json, dict):
        return str(q.json.get("title") or ""), str(q.json.get("message") or "")
    return "", q.text


def _names_re(*names: str) -> re.Pattern:
    return re.compile("|".join(rf"(?<![\w@.-]){re.escape(n)}(?![\w.-])" for n in names if n))


# ---------------------------------------------------------------- the run
class VersionRun:
    """All scenarios of one Celery version under one supervisor. ``run()`` never raises: a failure
    of the whole run is kept in ``error`` and every phase not reached is absent from ``done``."""

    def __init__(self, version: str, tmp: Path, broker_url: str, uid: str, scenarios=SCENARIOS):
        self.version = version
        self.tag = "v" + version.replace(".", "")
        self.tmp = tmp
        self.broker_url = broker_url
        self.uid = uid
        self.scenarios: list[Scenario] = list(scenarios)
        self.venvs = {f: venv_for(version, f) for f in FLAVOURS}
        self.error: str | None = None
        self.done: set[str] = set()
        self.phases: dict[str, dict] = {}
        self.fleet_alerts: dict[str, list[str]] = {}  # phase -> alerts naming no scenario
        self.durations: dict[str, float] = {}
        self.sup_rc: int | None = None
        self.catcher = HttpCatcher()
        self.fleet: Fleet | None = None
        self.app = None
        self.hand: dict[str, subprocess.Popen] = {}  # the workers started by hand, reaped and stopped by us
        self.r: dict[str, dict] = {}  # scenario name -> everything measured
        for s in self.scenarios:
            queue = f"{self.tag}-{s.name}-{uid}"
            self.r[s.name] = {
                "version": version, "scenario": s.name, "setup": s.describe(),
                "hostname": s.hostname(self.tag, uid), "group": f"{self.tag}-{s.name}", "queue": queue,
                "command": s.command(self.venvs[s.flavour], queue), "tid": None,
                "start_error": None, "pid": None, "pid_start": None, "start_ping_s": None,
            }

    # ---- config
    def config(self) -> dict:
        groups, queues = [], []
        for s in self.scenarios:
            r = self.r[s.name]
            groups.append({
                "name": r["group"], "workers": [r["hostname"]], "min_workers": 1, "queues": [r["queue"]],
                "heartbeat_timeout": f"{HEARTBEAT_TIMEOUT:g}s", "hung_timeout": f"{HUNG_TIMEOUT:g}s",
                "restart": {"platform": "local", "target": r["command"], "cwd": str(APP_DIR),
                            "max_restarts": 3, "window": "10m", "backoff": "1s", "grace": "20s",
                            "stop_timeout": "5s"},
            })
            queues.append({"name": r["queue"], "warning": 100, "critical": 1000, "for": "30s", "min_consumers": 1})
        return {
            # the README's minimal config: the broker URL from the environment, which workers share
            "broker": {"url": "${CELERY_BROKER_URL}"},
            "loop": {"interval": "1s"},
            "notify": {"channels": [{"name": "catcher", "url": f"json://127.0.0.1:{self.catcher.port}/alerts",
                                     "severities": ["info", "warning", "critical"]}],
                       "retry": ["200ms", "500ms"]},
            "groups": groups,
            "queues": queues,
        }

    # ---- driving
    def run(self) -> VersionRun:
        t0 = time.monotonic()
        self.catcher.start()
        try:
            for phase in ("start", "healthy", "busy", "kill", "busy2"):
                p0 = time.monotonic()
                if phase.startswith("busy"):
                    self._busy(phase)
                else:
                    getattr(self, f"_{phase}")()
                self.durations[phase] = round(time.monotonic() - p0, 1)
                self.done.add(phase)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            if self.fleet is not None:
                self.error += f"\n--- supervisor log (last lines):\n{_tail(self.fleet.log_path, 30)}"
        finally:
            self._teardown()
            self.durations["total"] = round(time.monotonic() - t0, 1)
        return self

    def _start(self) -> None:
        import shlex

        self.fleet = Fleet(self.tmp, self.config())
        self.app = celery_app(self.broker_url)
        env = {**os.environ, "CELERY_BROKER_URL": self.broker_url}
        for s in self.scenarios:
            r = self.r[s.name]
            r["tid"] = self.fleet.target(r["hostname"], group=r["group"]).id
            r["log"] = str(self.fleet.run_dir / f"{r['tid']}.log")  # the local platform's log of it
            r["hand_log"] = str(self.tmp / f"{s.name}.by-hand.log")
            argv = shlex.split(r["command"].replace("{hostname}", r["hostname"]))
            try:
                with open(r["hand_log"], "ab") as out:
                    proc = subprocess.Popen(argv, cwd=str(APP_DIR), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                r["start_error"] = f"cannot start {argv[0]}: {e}"
                continue
            self.hand[s.name] = proc
            r["pid"], r["pid_start"] = proc.pid, start_time(proc.pid)
        t0 = time.monotonic()
        waiting = [s.name for s in self.scenarios if self.r[s.name]["start_error"] is None]
        while waiting and time.monotonic() - t0 < START_TIMEOUT:
            for name in list(waiting):
                if ping(self.app, self.r[name]["hostname"]):
                    self.r[name]["start_ping_s"] = round(time.monotonic() - t0, 2)
                    waiting.remove(name)
        for name in waiting:
            r = self.r[name]
            r["start_error"] = (f"started as pid {r['pid']} but never answered ping within {START_TIMEOUT:.0f}s; "
                                f"its log:\n{_tail(Path(r['hand_log']))}")

    def _starts(self, name: str) -> int:
        """How many times the local platform started the worker (one line in its log per start)."""
        return self.fleet.starts(self.r[name]["hostname"])

    def _pid(self, name: str) -> int | None:
        """The worker's pid: from the local platform's pid file once it started it, else ours."""
        return self.fleet.pid(self.r[name]["hostname"]) or self.r[name]["pid"]

    def _copies(self, s: Scenario) -> list[tuple[int, str]]:
        r = self.r[s.name]
        found = copies(r["tid"], r["queue"], r["hostname"] if s.named else None)
        return [(pid, f"{cmd} (started by hand, before the supervisor)" if pid == r["pid"] else cmd)
                for pid, cmd in found]

    def _reap(self) -> None:
        for proc in self.hand.values():
            proc.poll()

    def _live(self) -> list[Scenario]:
        return [s for s in self.scenarios if self.r[s.name]["start_error"] is None]

    def _phase_begin(self, name: str) -> dict:
        ph = {"wall": time.time(), "mono": time.monotonic(), "log_offset": len(self.fleet.output().encode()),
              "starts": {s.name: self._starts(s.name) for s in self.scenarios}}
        self.phases[name] = ph
        return ph

    def _supervisor_alive(self) -> None:
        if self.fleet.proc is None or self.fleet.proc.poll() is not None:
            rc = None if self.fleet.proc is None else self.fleet.proc.returncode
            raise RuntimeError(f"`supervisor run` is not running (exit code {rc})")

    def _phase_end(self, name: str) -> dict:
        """What happened to each scenario since the phase began."""
        ph = self.phases[name]
        ph["end_wall"], ph["end_mono"] = time.time(), time.monotonic()
        status = self.status()
        ph["status"] = status
        log_text = self.fleet.output().encode()[ph["log_offset"]:].decode(errors="replace")
        requests = [q for q in self.catcher.received() if ph["mono"] <= q.at <= ph["end_mono"]]
        claimed = set()
        out = {}
        any_name = _names_re(*[x for r in self.r.values() for x in (r["hostname"], r["group"], r["queue"])])
        for s in self.scenarios:
            r = self.r[s.name]
            names = _names_re(r["hostname"], r["group"], r["queue"])
            rows = [x for x in status.get("recent_restarts", [])
                    if x.get("hostname") == r["hostname"] and ph["wall"] <= x["at"] <= ph["end_wall"]]
            alerts = []
            for q in requests:
                title, body = _title_body(q)
                # by the title (it names the worker or group); by the body only when the title names no
                # scenario: bodies carry workers' last log lines, which name other nodes (mingle, gossip)
                if names.search(title) or (not any_name.search(title) and names.search(body)):
                    alerts.append(title or body[:120])
                    claimed.add(id(q))
            worker = next((w for w in status.get("workers", []) if w.get("hostname") == r["hostname"]), None)
            out[s.name] = {
                "restarts": [{"at": round(x["at"] - ph["wall"], 2), "reason": x.get("reason"),
                              "outcome": x.get("outcome"), "message": (x.get("message") or "")[:300]} for x in rows],
                "starts": self._starts(s.name) - ph["starts"][s.name],
                "alerts": alerts,
                "status": None if worker is None else f"{worker.get('status')} ({worker.get('reason')})",
                "log": [ln for ln in log_text.splitlines() if names.search(ln) and " DEBUG " not in ln][-15:],
            }
        self.fleet_alerts[name] = [_title_body(q)[0] or _title_body(q)[1][:120] for q in requests
                                   if id(q) not in claimed]
        return out

    def status(self) -> dict:
        """`supervisor status -c FILE --json`: what the daemon recorded (workers, restarts)."""
        p = subprocess.run([sys.executable, "-m", "supervisor", "status", "-c", str(self.fleet.path), "--json"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise RuntimeError(f"`supervisor status --json` exited {p.returncode}: {p.stderr[-1000:]}") from None

    def _healthy(self) -> None:
        self._phase_begin("healthy")  # from before its start: what its first ticks do counts
        self.fleet.run()
        deadline = time.monotonic() + 30
        while not re.search(r"\btick \d+:", self.fleet.output()):
            if self.fleet.proc.poll() is not None:
                raise RuntimeError(f"`supervisor run` exited with {self.fleet.proc.returncode} at its start")
            if time.monotonic() > deadline:
                break  # its log format changed: go on, the checks below still hold
            time.sleep(0.2)
        end = time.monotonic() + HEALTHY_S
        while time.monotonic() < end:
            self._supervisor_alive()
            time.sleep(1)
        for name, res in self._phase_end("healthy").items():
            self.r[name]["healthy"] = res

    def _busy(self, phase: str) -> None:
        if phase != "busy":  # after the restarts: wait until the last restarted worker is out of its grace
            kills = [self.r[s.name].get("kill", {}).get("wall") for s in self._live()]
            wait = max([k for k in kills if k] or [0]) + GRACE_S + 3 - time.time()
            if wait > 0:
                time.sleep(wait)
        ph = self._phase_begin(phase)
        live = self._live()
        pids = {}
        for s in live:
            pid = self._pid(s.name)
            pids[s.name] = (pid, start_time(pid) if pid else None)
            self.app.send_task("tasks.sleep", args=[BUSY_TASK_S], queue=self.r[s.name]["queue"])
        once: dict = {}

        def ask_status() -> None:
            time.sleep(BUSY_ONCE_AT)
            try:
                once["status"] = self.status()
            except Exception as e:
                once["status_error"] = str(e)

        def ask_once() -> None:
            time.sleep(BUSY_ONCE_AT)
            try:
                p = subprocess.run([sys.executable, "-m", "supervisor", "once", "-c", str(self.fleet.path),
                                    "--dry-run", "--json"], capture_output=True, text=True, timeout=90,
                                   stdin=subprocess.DEVNULL)
                once["rc"] = p.returncode
                once["doc"] = json.loads(p.stdout)
            except Exception as e:  # recorded; the tests that need it say so
                once["error"] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=f, daemon=True) for f in (ask_status, ask_once)]
        for th in threads:
            th.start()
        while time.monotonic() < ph["mono"] + BUSY_WATCH_S:
            self._supervisor_alive()
            self._reap()
            time.sleep(0.5)
        for th in threads:
            th.join(120)
        # the process that took the task still runs, alone; then it answers again
        survived, running = {}, {}
        for s in live:
            r = self.r[s.name]
            survived[s.name] = alive(*pids[s.name])
            running[s.name] = self._copies(s)
        waiting = [s.name for s in live]
        t0 = time.monotonic()
        answered: dict[str, float] = {}
        while waiting and time.monotonic() - t0 < 30:
            for name in list(waiting):
                if ping(self.app, self.r[name]["hostname"]):
                    answered[name] = round(time.monotonic() - t0, 2)
                    waiting.remove(name)
        res = self._phase_end(phase)
        ph["once"] = {k: v for k, v in once.items() if k not in ("status", "doc")}
        for s in live:
            r = self.r[s.name]
            b = res[s.name]
            b["pid"] = pids[s.name][0]
            b["answered_after"] = answered.get(s.name)
            b["pid_alive"] = survived[s.name]
            b["copies"] = running[s.name]
            # what `once` judged and found, mid-task, about this scenario
            names = _names_re(r["hostname"], r["group"], r["queue"])
            doc = once.get("doc") or {}
            b["once_rc"] = once.get("rc")
            b["once_error"] = once.get("error")
            b["once_findings"] = [
                f"{f.get('severity')} {f.get('rule')}: {f.get('summary')}" for f in doc.get("findings", [])
                if f.get("severity") in ("warning", "critical")
                and (f.get("group") == r["group"] or f.get("hostname") == r["hostname"]
                     or names.search(f"{f.get('subject')} {f.get('summary')}"))
            ]
            w = next((w for w in doc.get("workers", []) if w.get("hostname") == r["hostname"]), None)
            b["once_status"] = None if w is None else w.get("status")
            w = next((w for w in (once.get("status") or {}).get("workers", [])
                      if w.get("hostname") == r["hostname"]), None)
            b["status_mid"] = None if w is None else f"{w.get('status')} ({w.get('reason')})"
            r[phase] = b

    def _kill(self) -> None:
        self._phase_begin("kill")
        for s in self._live():
            r = self.r[s.name]
            k: dict = {"error": None}
            r["kill"] = k
            old = self._pid(s.name)
            if not old or not alive(old):
                k["error"] = f"no running worker to kill (pid {old} is gone)"
                continue
            k["old_pid"], k["old_start"] = old, start_time(old)
            seen: dict[str, float] = {}
            stop = threading.Event()

            def watch(old=old, hostname=r["hostname"], seen=seen, stop=stop) -> None:
                while not stop.is_set():
                    p = self.fleet.pid(hostname)
                    if p and p != old:
                        seen["pidfile"] = time.monotonic()
                        return
                    stop.wait(0.02)

            th = threading.Thread(target=watch, daemon=True)
            th.start()
            k["wall"], t0 = time.time(), time.monotonic()
            os.kill(old, signal.SIGKILL)
            while time.monotonic() - t0 < PING_TIMEOUT:
                # a pong needs the new process: ping once it was started (or 3 s on, whatever the pid file says)
                if "pidfile" not in seen and time.monotonic() - t0 < 3:
                    time.sleep(0.02)
                elif ping(self.app, r["hostname"]):
                    k["ping_s"] = round(time.monotonic() - t0, 2)
                    break
            stop.set()
            th.join(2)
            self._reap()
            if "pidfile" in seen:
                k["pidfile_s"] = round(seen["pidfile"] - t0, 2)
        time.sleep(KILL_SETTLE_S)
        self._supervisor_alive()
        res = self._phase_end("kill")
        for s in self._live():
            r = self.r[s.name]
            k = r["kill"]
            k.update(res[s.name])
            if k.get("old_pid"):
                rows = [x for x in self.phases["kill"]["status"].get("recent_restarts", [])
                        if x.get("hostname") == r["hostname"] and x["at"] >= k["wall"]]
                k["restart_s"] = round(min(x["at"] for x in rows) - k["wall"], 2) if rows else None
                k["restarts"] = [x for x in k["restarts"] if x["at"] >= k["wall"] - self.phases["kill"]["wall"]]
                k["old_alive"] = alive(k["old_pid"], k["old_start"])
                k["copies"] = self._copies(s)
                k["worker_log"] = _tail(Path(r["log"]), 8)

    def _teardown(self) -> None:
        try:
            if self.fleet is not None:
                try:
                    self.sup_rc = self.fleet.stop()
                finally:
                    self.fleet.cleanup()
        finally:
            for proc in self.hand.values():  # the workers we started by hand, by their PID (and session)
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            tids = {r["tid"] for r in self.r.values() if r["tid"]}
            for pid in processes_marked(tids):  # whatever the local platform started and outlived its stop
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if self.app is not None:
                self.app.close()
            self.catcher.stop()

    # ---- results
    def result(self, name: str) -> dict:
        return self.r[name]

    def to_json(self) -> dict:
        return {"version": self.version, "error": self.error, "done": sorted(self.done),
                "durations": self.durations, "supervisor_rc": self.sup_rc,
                "fleet_alerts": self.fleet_alerts,
                "venvs": {f: v.versions() for f, v in self.venvs.items()},
                "once_mid_task": {p: self.phases[p].get("once") for p in BUSY_PHASES if p in self.phases},
                "scenarios": self.r}


# ---------------------------------------------------------------- checks (shared by the tests and the matrix)
# Each takes a run's JSON document (``VersionRun.to_json()``) and a scenario name, and returns what
# is wrong, in words that name the cause; [] when the scenario passed.
def _phase_missing(run: dict, r: dict, phase: str) -> list[str]:
    if r["start_error"]:
        return [f"the worker never ran: {r['start_error']}"]
    if phase not in run["done"]:
        return [f"the run did not reach the {phase} phase: {run['error']}"]
    return []


def healthy_problems(run: dict, name: str) -> list[str]:
    r = run["scenarios"][name]
    out = _phase_missing(run, r, "healthy")
    if out:
        return out
    h = r["healthy"]
    if h["restarts"] or h["starts"]:
        out.append(f"restarted while healthy: {len(h['restarts'])} restart(s) recorded by the supervisor, "
                   f"{h['starts']} start(s) of its command: {h['restarts']}")
    if h["alerts"]:
        out.append(f"alerts while healthy: {h['alerts']}")
    if run["fleet_alerts"].get("healthy"):
        out.append(f"fleet-wide alerts while healthy: {run['fleet_alerts']['healthy']}")
    if not (h["status"] or "").startswith("alive"):
        out.append(f"`supervisor status` after {HEALTHY_S:.0f}s healthy says {h['status']!r}, not alive")
    if out and h["log"]:
        out.append("supervisor log:\n  " + "\n  ".join(h["log"]))
    return out


def kill_problems(run: dict, name: str) -> list[str]:
    r = run["scenarios"][name]
    out = _phase_missing(run, r, "kill")
    if out:
        return out
    k = r.get("kill") or {}
    if k.get("error"):
        return [k["error"]]
    n = len(k["restarts"])
    if n != 1 or k["starts"] != 1:
        out.append(f"expected exactly one restart after SIGKILL: {n} recorded by the supervisor, "
                   f"{k['starts']} start(s) of its command: {k['restarts']}")
    if k.get("ping_s") is None:
        out.append(f"never answered ping within {PING_TIMEOUT:.0f}s of the SIGKILL")
    if k.get("old_alive"):
        out.append(f"the SIGKILLed pid {k['old_pid']} still runs")
    if len(k.get("copies") or []) != 1:
        out.append(f"{len(k.get('copies') or [])} copies of the worker run after its restart: {k.get('copies')}")
    if out:
        if k.get("log"):
            out.append("supervisor log:\n  " + "\n  ".join(k["log"]))
        out.append(f"worker log:\n{k.get('worker_log')}")
    return out


def _busy_phases(run: dict, r: dict, check) -> list[str]:
    out = []
    for phase, how in BUSY_PHASES.items():
        missing = _phase_missing(run, r, phase)
        if missing:
            return out + missing
        found = check(r[phase], phase)
        if found:
            out.append(f"when {how}: " + found[0])
            out += found[1:]
    return out


def busy_restart_problems(run: dict, name: str) -> list[str]:
    def check(b: dict, phase: str) -> list[str]:
        out = []
        if b["restarts"] or b["starts"]:
            out.append(f"restarted while busy in a {BUSY_TASK_S:.0f}s task (hung_timeout {HUNG_TIMEOUT:.0f}s): "
                       f"{len(b['restarts'])} restart(s) recorded, {b['starts']} start(s): {b['restarts']}")
        if not b["pid_alive"]:
            out.append(f"its process (pid {b['pid']}) did not survive the task")
        if len(b["copies"] or []) != 1:
            out.append(f"{len(b['copies'] or [])} copies of the worker ran after the task: {b['copies']}")
        if b["answered_after"] is None:
            out.append("it did not answer ping after its task")
        if out:
            out.append(f"judged mid-task: `supervisor status` {b['status_mid']!r}, `once` {b['once_status']!r}")
            if b["log"]:
                out.append("supervisor log:\n  " + "\n  ".join(b["log"]))
        return out

    return _busy_phases(run, run["scenarios"][name], check)


def busy_page_problems(run: dict, name: str) -> list[str]:
    def check(b: dict, phase: str) -> list[str]:
        out = []
        if b["alerts"]:
            out.append(f"alerts while busy within hung_timeout: {b['alerts']}")
        if run["fleet_alerts"].get(phase):
            out.append(f"fleet-wide alerts while busy: {run['fleet_alerts'][phase]}")
        if b["once_error"]:
            out.append(f"`supervisor once --dry-run --json` mid-task failed: {b['once_error']}")
        elif b["once_findings"]:
            out.append(f"`supervisor once` mid-task (exit {b['once_rc']}) found: {b['once_findings']}")
        if out and b["log"]:
            out.append("supervisor log:\n  " + "\n  ".join(b["log"]))
        return out

    return _busy_phases(run, run["scenarios"][name], check)
