"""A fake ``systemctl`` and ``journalctl`` for machines whose PID 1 is not systemd (CI, containers).

It behaves, as seen through the command line, like systemd 252 for the verbs the systemd platform
adapter uses, and it really runs the units' commands:

- ``systemctl [-H HOST] [--user] start|stop|restart UNIT...``: a per-unit manager process (this
  file, ``--manager``) runs the unit's ExecStart as the main process, reaps it and records its exit
  (``code=killed, status=9/KILL``, ``Result=signal``), kills what is left of its process group
  (KillMode), restarts it after RestartSec when ``Restart=on-failure|always`` says so
  (``activating``/``auto-restart``, NRestarts), and writes its output and the manager's own messages
  to the unit's journal. ``stop`` sends SIGTERM, waits TimeoutStopSec, then SIGKILL (Result=timeout).
- ``systemctl show [-p A,B]... UNIT...``: ``Key=Value`` lines, one block per unit, blocks separated
  by a blank line; an unknown unit shows ``LoadState=not-found`` and ``ActiveState=inactive`` (exit 0).
- ``systemctl is-active UNIT...``: prints each state; exit 0 when one is active, else 3.
- ``systemctl list-units [--all] [--output=json] [PATTERN...]``.
- ``journalctl [--user] [-u UNIT]... [-n N] [-o cat|short|short-iso|json] [-q] [--no-pager]`` (no
  ``-H``, as the real one: the adapter reads another host's journal through ``ssh``).
- ``ssh [-o OPT]... [-p PORT] [--] DEST COMMAND``: recorded, then COMMAND runs here.

Unknown units: ``restart``/``start`` -> "Failed to restart X: Unit X not found." exit 5.

State lives in ``$FAKE_SYSTEMD_DIR``:
  units/NAME         unit files (INI, as systemd reads them; ``foo@.service`` is a template: %i %I %n %H %%);
                     the [Service] keys honoured: ExecStart, WorkingDirectory, Environment,
                     EnvironmentFile, Restart, RestartSec, TimeoutStopSec, KillMode; Description
  run/UNIT.json      runtime state (ActiveState, SubState, MainPID, timestamps, Result, NRestarts)
  journal/UNIT.jsonl journal entries ({"t", "pid", "ident", "msg"})
  calls.jsonl        every invocation: {"prog", "argv", "host", "user", "verb", "units"}
  fail.json          failure injection: {"restart": {"rc": 1, "stderr": "...", "sleep": 0}, ...}, keyed
                     by systemctl verb, "*" (any systemctl verb) or "journalctl"

Only the standard library: any ``python3`` can run it (``FAKE_SYSTEMD_PYTHON`` in the wrappers).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

SIGNAMES = {int(s): s.name.removeprefix("SIG") for s in signal.Signals}
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}  # systemd: a clean exit
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOT_BOOTED = "System has not been booted with systemd as init system (PID 1). Can't operate.\n" \
             "Failed to connect to bus: Host is down"
UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".mount", ".path", ".slice", ".scope")


# ---------------------------------------------------------------- files
def base() -> str:
    d = os.environ.get("FAKE_SYSTEMD_DIR")
    if not d:
        sys.stderr.write("fake systemd: FAKE_SYSTEMD_DIR is not set\n")
        sys.exit(1)
    return d


def path(*parts: str) -> str:
    return os.path.join(base(), *parts)


def read_json(p: str, default=None):
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(p: str, data) -> None:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, p)


def append_line(p: str, data) -> None:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    line = (json.dumps(data) + "\n").encode()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(unit: str):
    os.makedirs(path("run"), exist_ok=True)
    fd = os.open(path("run", f"{unit}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def journal(unit: str, msg: str, pid: int | None = None, ident: str = "systemd") -> None:
    append_line(path("journal", f"{unit}.jsonl"), {"t": time.time(), "pid": pid or 1, "ident": ident, "msg": msg})


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


def fmt_ts(t: float | None) -> str:
    """systemd's pretty timestamp: "Day YYYY-MM-DD HH:MM:SS TZ" (empty when unset)."""
    if not t:
        return ""
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def fmt_span(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    if seconds >= 60:
        return f"{int(seconds // 60)}min {seconds % 60:g}s"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


# ---------------------------------------------------------------- unit files
def mangle(name: str) -> str:
    return name if name.endswith(UNIT_SUFFIXES) else name + ".service"


def parse_span(v: str) -> float:
    """systemd time spans: "90", "90s", "1min 30s", "500ms", "infinity"."""
    v = v.strip()
    if v in ("infinity", ""):
        return float("inf")
    units = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1,
             "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
             "d": 86400, "day": 86400, "days": 86400}
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*([a-z]*)", v):
        total += float(num) * units.get(unit or "s", 1)
    return total


def unescape(s: str) -> str:
    """systemd-escape --unescape: \\xNN sequences, "-" means "/" (for %I)."""
    s = s.replace("-", "/")
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), s)


def specifiers(text: str, unit: str, instance: str) -> str:
    prefix = unit.split("@", 1)[0] if "@" in unit else unit.rsplit(".", 1)[0]
    table = {"i": instance, "I": unescape(instance), "n": unit, "N": unit.rsplit(".", 1)[0], "p": prefix,
             "H": socket.gethostname(), "%": "%"}
    return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), text)


def parse_unit_file(text: str) -> dict[str, list[str]]:
    """[Service] and [Unit] keys (repeatable, in order); line continuations with a trailing \\."""
    out: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if "=" in line and section in ("Service", "Unit"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def load_unit(unit: str) -> dict | None:
    """The unit's definition (None: not found), with specifiers expanded for an instance."""
    instance = ""
    p = path("units", unit)
    if not os.path.isfile(p) and "@" in unit:
        prefix, rest = unit.split("@", 1)
        instance, _, suffix = rest.rpartition(".")
        p = path("units", f"{prefix}@.{suffix}")
        if not instance:
            return None
    try:
        with open(p, encoding="utf-8") as f:
            keys = parse_unit_file(f.read())
    except OSError:
        return None

    def last(k: str, default: str = "") -> str:
        v = keys.get(k)
        return specifiers(v[-1], unit, instance) if v else default

    env_lines = [specifiers(v, unit, instance) for v in keys.get("Environment", [])]
    return {
        "exec_start": last("ExecStart"),
        "working_directory": last("WorkingDirectory"),
        "environment": env_lines,
        "environment_files": [specifiers(v, unit, instance) for v in keys.get("EnvironmentFile", [])],
        "restart": last("Restart", "no"),
        "restart_sec": parse_span(last("RestartSec", "100ms")),
        "timeout_stop_sec": parse_span(last("TimeoutStopSec", "90s")),
        "kill_mode": last("KillMode", "control-group"),
        "description": last("Description", unit),
        "user": last("User"),
        "start_limit_burst": int(last("StartLimitBurst", "5")),
        "start_limit_interval": parse_span(last("StartLimitIntervalSec", "10s")),
    }


def parse_env_assignments(line: str) -> dict[str, str]:
    """Environment="A=1" "B=2 3" C=4 (systemd quoting)."""
    out = {}
    for item in shlex.split(line):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
    return out


def read_env_file(spec: str) -> tuple[dict[str, str], str | None]:
    optional = spec.startswith("-")
    p = spec[1:] if optional else spec
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return {}, None if optional else f"Failed to load environment files: {e.strerror}"
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        out[k.strip()] = v
    return out, None


def expand_exec(cmdline: str, env: dict[str, str]) -> list[str]:
    """ExecStart= word splitting and variable expansion: "${VAR}" stays one word, a lone "$VAR"
    word is split at whitespace. A leading "-", "@", "+", "!" prefix is dropped."""
    words = shlex.split(cmdline)
    if words:
        words[0] = words[0].lstrip("-@+!:")
    out: list[str] = []
    for w in words:
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", w)
        if m:
            out += env.get(m.group(1), "").split()
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), w))
    return out


# ---------------------------------------------------------------- runtime state
def new_state() -> dict:
    return {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "MainPID": 0,
            "ExecMainPID": 0, "ExecMainCode": 0, "ExecMainStatus": 0, "NRestarts": 0,
            "ExecMainStartTimestamp": None, "ExecMainExitTimestamp": None, "ActiveEnterTimestamp": None,
            "InactiveEnterTimestamp": None, "manager": 0, "gen": "", "stop": False, "stop_timed_out": False}


def get_state(unit: str) -> dict:
    st = read_json(path("run", f"{unit}.json"))
    return st if isinstance(st, dict) else new_state()


def put_state(unit: str, st: dict) -> None:
    write_json(path("run", f"{unit}.json"), st)


def check_vanished(unit: str) -> dict:
    """A unit whose manager died without recording the end (it was killed): settle the state from
    what is left (the main process, by its pid)."""
    st = get_state(unit)
    if st["ActiveState"] in ("inactive", "failed") or pid_alive(st.get("manager")):
        return st
    with locked(unit):
        st = get_state(unit)
        if st["ActiveState"] in ("inactive", "failed") or pid_alive(st.get("manager")):
            return st
        main = st.get("MainPID")
        if pid_alive(main):
            return st  # the main process still runs; only its watcher is gone
        now = time.time()
        st.update(ActiveState="failed", SubState="failed", Result="signal", ExecMainCode=2, ExecMainStatus=9,
                  MainPID=0, ExecMainExitTimestamp=now, InactiveEnterTimestamp=now)
        put_state(unit, st)
    journal(unit, f"{unit}: Main process exited, code=killed, status=9/KILL")
    journal(unit, f"{unit}: Failed with result 'signal'.")
    return st


def start_allowed(unit: str, st: dict, d: dict) -> bool:
    """StartLimitIntervalSec= / StartLimitBurst=: every start (by hand or automatic) counts; past the
    limit the unit fails with Result=start-limit-hit until `systemctl reset-failed`. Under the lock."""
    now = time.time()
    starts = [t for t in st.get("starts", []) if now - t < d["start_limit_interval"]]
    if d["start_limit_burst"] and len(starts) >= d["start_limit_burst"]:
        st.update(ActiveState="failed", SubState="failed", Result="start-limit-hit", manager=0, MainPID=0,
                  InactiveEnterTimestamp=now, starts=starts)
        put_state(unit, st)
        journal(unit, f"{unit}: Start request repeated too quickly.")
        journal(unit, f"{unit}: Failed with result 'start-limit-hit'.")
        return False
    st["starts"] = [*starts, now]
    return True


# ---------------------------------------------------------------- the manager (one per running unit)
def manager(unit: str, gen: str) -> int:
    """Runs the unit's main process, reaps it, records its end, restarts it per Restart=."""
    while True:
        d = load_unit(unit)
        if d is None:
            return 1
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "INVOCATION_ID": uuid.uuid4().hex}
        problem = None
        for spec in d["environment_files"]:
            values, err = read_env_file(spec)
            env.update(values)
            problem = problem or err
        for line in d["environment"]:
            env.update(parse_env_assignments(line))
        argv = expand_exec(d["exec_start"], env)
        cwd = d["working_directory"] or "/"
        proc = None
        if problem is None:
            if not argv:
                problem = "Service has no ExecStart= setting. Refusing."
            else:
                try:
                    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
                except OSError as e:
                    problem = f"Failed to execute {argv[0]}: {e.strerror}"
        now = time.time()
        if proc is None:
            with locked(unit):
                st = get_state(unit)
                if st["gen"] != gen:
                    return 0
                st.update(ActiveState="failed", SubState="failed", Result="exit-code", ExecMainCode=1,
                          ExecMainStatus=203, MainPID=0, ExecMainExitTimestamp=now, InactiveEnterTimestamp=now,
                          ExecMainStartTimestamp=now, manager=0)
                put_state(unit, st)
            journal(unit, f"{unit}: {problem}")
            journal(unit, f"{unit}: Main process exited, code=exited, status=203/EXEC")
            journal(unit, f"{unit}: Failed with result 'exit-code'.")
            return 0
        with locked(unit):
            st = get_state(unit)
            if st["gen"] != gen:  # superseded while starting: not ours to run
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return 0
            st.update(ActiveState="active", SubState="running", MainPID=proc.pid, ExecMainPID=proc.pid,
                      ExecMainStartTimestamp=now, ExecMainExitTimestamp=None, ExecMainCode=0, ExecMainStatus=0,
                      ActiveEnterTimestamp=now, Result="success", manager=os.getpid(),
                      InvocationID=env["INVOCATION_ID"])
            put_state(unit, st)
        journal(unit, f"Started {d['description']}.")
        ident = os.path.basename(argv[0])

        def pump(proc=proc, ident=ident) -> None:  # stdout/stderr -> journal, as journald does
            for raw in proc.stdout:
                journal(unit, raw.decode("utf-8", "replace").rstrip("\n"), proc.pid, ident)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rc = proc.wait()  # systemd learns of the death from SIGCHLD, not from the output pipe
        now = time.time()
        if d["kill_mode"] != "process":  # what is left of the unit goes with its main process
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        reader.join(2.0)
        if rc < 0:
            code, status, codename = 2, -rc, "killed"
            statustext = f"{-rc}/{SIGNAMES.get(-rc, str(-rc))}"
            clean = -rc in CLEAN_SIGNALS
        else:
            code, status, codename = 1, rc, "exited"
            statustext = f"{rc}/{'SUCCESS' if rc == 0 else 'FAILURE'}" if rc in (0, 1) else str(rc)
            clean = rc == 0
        with locked(unit):
            st = get_state(unit)
            if st["gen"] != gen:
                return 0
            stopping = st["stop"]
            if stopping:
                result = "timeout" if st["stop_timed_out"] else "success"
            else:
                result = "success" if clean else ("signal" if code == 2 else "exit-code")
            auto = not stopping and (d["restart"] == "always" or (d["restart"] == "on-failure" and result != "success"))
            st.update(MainPID=0, ExecMainCode=code, ExecMainStatus=status, ExecMainExitTimestamp=now, Result=result)
            if auto:
                st.update(ActiveState="activating", SubState="auto-restart")
            elif result == "success":
                st.update(ActiveState="inactive", SubState="dead", InactiveEnterTimestamp=now, manager=0)
            else:
                st.update(ActiveState="failed", SubState="failed", InactiveEnterTimestamp=now, manager=0)
            put_state(unit, st)
        if not clean:
            journal(unit, f"{unit}: Main process exited, code={codename}, status={statustext}")
        if result != "success":
            journal(unit, f"{unit}: Failed with result '{result}'.")
        else:
            journal(unit, f"{unit}: Deactivated successfully.")
        if stopping:
            journal(unit, f"Stopped {d['description']}.")
        if not auto:
            return 0
        deadline = time.time() + d["restart_sec"]
        while time.time() < deadline:
            time.sleep(0.05)
            if get_state(unit)["stop"] or get_state(unit)["gen"] != gen:
                break
        with locked(unit):
            st = get_state(unit)
            if st["gen"] != gen:
                return 0
            if st["stop"]:
                st.update(ActiveState="inactive", SubState="dead", InactiveEnterTimestamp=time.time(), manager=0)
                put_state(unit, st)
                return 0
            if not start_allowed(unit, st, d):
                return 0
            st["NRestarts"] += 1
            st.update(SubState="start")
            put_state(unit, st)
        journal(unit, f"{unit}: Scheduled restart job, restart counter is at {st['NRestarts']}.")


# ---------------------------------------------------------------- systemctl verbs
def start(unit: str, verb: str) -> int:
    d = load_unit(unit)
    if d is None:
        sys.stderr.write(f"Failed to {verb} {unit}: Unit {unit} not found.\n")
        return 5
    with locked(unit):
        st = get_state(unit)
        if st["ActiveState"] in ("active", "activating", "reloading") and pid_alive(st.get("manager")):
            return 0
        if not start_allowed(unit, st, d):
            sys.stderr.write(f"Job for {unit} failed because start of the service was attempted too often.\n"
                             f"See \"systemctl status {unit}\" and \"journalctl -xeu {unit}\" for details.\n"
                             f"To force a start use \"systemctl reset-failed {unit}\"\n"
                             f"followed by \"systemctl start {unit}\" again.\n")
            return 1
        gen = uuid.uuid4().hex
        if verb != "auto":
            st["NRestarts"] = 0  # a start by hand flushes the restart counter
        st.update(ActiveState="activating", SubState="start", gen=gen, stop=False, stop_timed_out=False)
        put_state(unit, st)
        me = os.path.abspath(__file__)
        p = subprocess.Popen([sys.executable, me, "--manager", unit, gen], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             close_fds=True)
        st["manager"] = p.pid
        put_state(unit, st)
    deadline = time.time() + 30
    while time.time() < deadline:  # Type=simple: the job is done once the main process is forked
        st = get_state(unit)
        if st["gen"] != gen:
            return 0
        if st["ActiveState"] == "active" or st["SubState"] == "auto-restart":
            return 0
        if st["ActiveState"] == "failed":
            sys.stderr.write(f"Job for {unit} failed because the control process exited with error code.\n"
                             f"See \"systemctl status {unit}\" and \"journalctl -xeu {unit}\" for details.\n")
            return 1
        if p.poll() is not None and st["ActiveState"] == "activating" and st["SubState"] == "start":
            sys.stderr.write(f"Job for {unit} failed.\n")
            return 1
        time.sleep(0.01)
    sys.stderr.write(f"Job for {unit} timed out.\n")
    return 1


def stop(unit: str, verb: str = "stop") -> int:
    d = load_unit(unit)
    if d is None:
        if verb == "stop":
            sys.stderr.write(f"Failed to stop {unit}: Unit {unit} not loaded.\n")
            return 5
        return 0
    with locked(unit):
        st = get_state(unit)
        if st["ActiveState"] in ("inactive", "failed") or not pid_alive(st.get("manager")):
            if st["ActiveState"] not in ("inactive", "failed"):
                st.update(ActiveState="inactive", SubState="dead", manager=0, MainPID=0)
                put_state(unit, st)
            return 0
        st.update(stop=True, ActiveState="deactivating", SubState="stop-sigterm")
        put_state(unit, st)
        gen, main = st["gen"], st.get("MainPID")
    if main:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if d["kill_mode"] == "control-group":
                os.killpg(main, signal.SIGTERM)
            else:  # mixed, process: SIGTERM to the main process only
                os.kill(main, signal.SIGTERM)

    def settled(until: float) -> bool:
        while time.time() < until:
            s = get_state(unit)
            if s["gen"] != gen or s["ActiveState"] in ("inactive", "failed"):
                return True
            time.sleep(0.02)
        return False

    if settled(time.time() + d["timeout_stop_sec"]):
        return 0
    journal(unit, f"{unit}: State 'stop-sigterm' timed out. Killing.")
    with locked(unit):
        st = get_state(unit)
        st.update(stop_timed_out=True, SubState="stop-sigkill")
        put_state(unit, st)
    if main:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if d["kill_mode"] == "process":
                os.kill(main, signal.SIGKILL)
            else:
                os.killpg(main, signal.SIGKILL)
    if settled(time.time() + 10):
        return 0
    sys.stderr.write(f"Job for {unit} failed: processes would not die.\n")
    return 1


def properties(unit: str) -> dict[str, str]:
    d = load_unit(unit)
    if d is None:
        return {"Id": unit, "Names": unit, "LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead",
                "Result": "success", "MainPID": "0", "ExecMainPID": "0", "ExecMainCode": "0",
                "ExecMainStatus": "0", "NRestarts": "0", "ExecMainStartTimestamp": "",
                "ExecMainExitTimestamp": "", "TimeoutStopUSec": "1min 30s", "Description": unit,
                "LoadError": f'org.freedesktop.systemd1.NoSuchUnit "Unit {unit} not found."'}
    st = check_vanished(unit)
    out = {"Id": unit, "Names": unit, "LoadState": "loaded", "Description": d["description"],
           "TimeoutStopUSec": "infinity" if d["timeout_stop_sec"] == float("inf") else fmt_span(d["timeout_stop_sec"]),
           "Restart": d["restart"], "KillMode": d["kill_mode"], "User": d["user"]}
    for k in ("ActiveState", "SubState", "Result", "MainPID", "ExecMainPID", "ExecMainCode", "ExecMainStatus",
              "NRestarts"):
        out[k] = str(st[k])
    out["InvocationID"] = st.get("InvocationID", "")
    for k in ("ExecMainStartTimestamp", "ExecMainExitTimestamp", "ActiveEnterTimestamp", "InactiveEnterTimestamp"):
        out[k] = fmt_ts(st.get(k))
    return out


def known_units() -> list[str]:
    names = set()
    with contextlib.suppress(OSError):
        names |= {n for n in os.listdir(path("units")) if "@." not in n}
    with contextlib.suppress(OSError):
        names |= {n[:-5] for n in os.listdir(path("run")) if n.endswith(".json")}
    return sorted(names)


def systemctl(args: list[str]) -> int:
    opts = {"host": None, "user": False, "props": [], "all": False, "quiet": False, "output": None,
            "legend": True, "value": False}
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a == "--":
            pos += args[i + 1:]
            break
        if a in ("-H", "--host"):
            opts["host"] = nxt
            i += 1
        elif a.startswith("--host="):
            opts["host"] = a.split("=", 1)[1]
        elif a.startswith("-H") and len(a) > 2:
            opts["host"] = a[2:]
        elif a == "--user":
            opts["user"] = True
        elif a == "--system":
            opts["user"] = False
        elif a in ("-p", "--property"):
            opts["props"] += (nxt or "").split(",")
            i += 1
        elif a.startswith("--property="):
            opts["props"] += a.split("=", 1)[1].split(",")
        elif a.startswith("-p") and len(a) > 2:
            opts["props"] += a[2:].split(",")
        elif a in ("-a", "--all"):
            opts["all"] = True
        elif a in ("-q", "--quiet"):
            opts["quiet"] = True
        elif a == "--value":
            opts["value"] = True
        elif a == "--no-legend":
            opts["legend"] = False
        elif a in ("-o", "--output"):
            opts["output"] = nxt
            i += 1
        elif a.startswith("--output="):
            opts["output"] = a.split("=", 1)[1]
        elif a in ("--plain", "--no-pager", "--no-block", "--no-ask-password", "--full", "-l") \
                or a.startswith(("--timestamp=", "--type=", "--state=")):
            pass
        elif a.startswith("-") and a != "-":
            sys.stderr.write(f"systemctl: unrecognized option '{a}'\n")
            return 1
        else:
            pos.append(a)
        i += 1
    verb = pos[0] if pos else "list-units"
    units = [mangle(u) for u in pos[1:]] if verb not in ("list-units",) else pos[1:]
    append_line(path("calls.jsonl"), {"prog": "systemctl", "argv": args, "host": opts["host"],
                                      "user": opts["user"], "verb": verb, "units": units, "t": time.time()})
    fail = read_json(path("fail.json"), {}) or {}
    rule = fail.get(verb) or fail.get("*")
    if rule:
        time.sleep(float(rule.get("sleep", 0)))
        sys.stdout.write(rule.get("stdout", ""))
        sys.stderr.write(rule.get("stderr", ""))
        if rule.get("rc") is not None:
            return int(rule["rc"])

    if verb in ("start", "restart", "stop"):
        if not units:
            sys.stderr.write("Too few arguments.\n")
            return 1
        rc = 0
        for u in units:
            if verb == "stop":
                rc = stop(u) or rc
                continue
            if load_unit(u) is None:
                sys.stderr.write(f"Failed to {verb} {u}: Unit {u} not found.\n")
                rc = 5
                continue
            if verb == "restart":
                r = stop(u, "restart")
                if r:
                    rc = r
                    continue
            rc = start(u, verb) or rc
        return rc
    if verb == "reset-failed":
        for u in units or known_units():
            with locked(u):
                st = get_state(u)
                st["starts"] = []
                if st["ActiveState"] == "failed":
                    st.update(ActiveState="inactive", SubState="dead", Result="success")
                put_state(u, st)
        return 0
    if verb == "show":
        blocks = []
        for u in units:
            props = properties(u)
            wanted = [p for p in opts["props"] if p] or list(props)  # without -p: every property
            if opts["value"]:
                blocks.append("\n".join(props.get(p, "") for p in wanted))
            else:
                blocks.append("\n".join(f"{p}={props[p]}" for p in wanted if p in props))
        sys.stdout.write("\n\n".join(blocks) + ("\n" if blocks else ""))
        return 0
    if verb in ("is-active", "is-failed"):
        if not units:
            sys.stderr.write("Too few arguments.\n")
            return 1
        hit = False
        for u in units:
            state = properties(u)["ActiveState"]
            hit = hit or state == ("active" if verb == "is-active" else "failed")
            if not opts["quiet"]:
                print(state)
        return 0 if hit else (3 if verb == "is-active" else 1)
    if verb == "list-units":
        rows = []
        for u in known_units():
            if units and not any(fnmatch.fnmatchcase(u, p) for p in units):
                continue
            p = properties(u)
            if not opts["all"] and p["ActiveState"] == "inactive":
                continue
            rows.append({"unit": u, "load": p["LoadState"], "active": p["ActiveState"], "sub": p["SubState"],
                         "description": p["Description"]})
        if opts["output"] == "json":
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['unit']} {r['load']} {r['active']} {r['sub']} {r['description']}")
            if opts["legend"]:
                print(f"\n{len(rows)} loaded units listed.")
        return 0
    sys.stderr.write(f"Unknown command verb {verb}.\n")
    return 1


# ---------------------------------------------------------------- journalctl
def journalctl(args: list[str]) -> int:
    units: list[str] = []
    n: int | None = None
    output = "short"
    quiet = False
    host = None
    user = False
    i = 0
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a in ("-u", "--unit"):
            units.append(mangle(nxt or ""))
            i += 1
        elif a.startswith("--unit="):
            units.append(mangle(a.split("=", 1)[1]))
        elif a.startswith("-u") and len(a) > 2:
            units.append(mangle(a[2:]))
        elif a in ("-n", "--lines"):
            n = int(nxt or "10")
            i += 1
        elif a.startswith("--lines="):
            n = int(a.split("=", 1)[1])
        elif a.startswith("-n") and len(a) > 2:
            n = int(a[2:])
        elif a in ("-o", "--output"):
            output = nxt or ""
            i += 1
        elif a.startswith("--output="):
            output = a.split("=", 1)[1]
        elif a in ("-q", "--quiet"):
            quiet = True
        elif a.startswith(("-H", "--host")):  # journalctl has no -H (remote logs go through ssh)
            sys.stderr.write(f"journalctl: invalid option -- '{a[1:2] if not a.startswith('--') else a}'\n")
            return 1
        elif a == "--user":
            user = True
        elif a in ("--no-pager", "--no-hostname", "-a", "--all", "-x", "--catalog", "-e", "--pager-end"):
            pass
        else:
            sys.stderr.write(f"journalctl: unrecognized option '{a}'\n")
            return 1
        i += 1
    append_line(path("calls.jsonl"), {"prog": "journalctl", "argv": args, "host": host, "user": user,
                                      "verb": "journalctl", "units": units, "t": time.time()})
    fail = (read_json(path("fail.json"), {}) or {}).get("journalctl")
    if fail:
        time.sleep(float(fail.get("sleep", 0)))
        sys.stderr.write(fail.get("stderr", ""))
        if fail.get("rc") is not None:
            return int(fail["rc"])
    if output not in ("short", "short-iso", "cat", "json"):
        sys.stderr.write(f"Unknown output format '{output}'.\n")
        return 1
    entries = []
    names = units or [n[:-6] for n in os.listdir(path("journal"))] if os.path.isdir(path("journal")) else units
    for u in names:
        try:
            with open(path("journal", f"{u}.jsonl"), encoding="utf-8") as f:
                entries += [dict(json.loads(line), unit=u) for line in f if line.strip()]
        except (OSError, ValueError):
            continue
    entries.sort(key=lambda e: e["t"])
    if n is not None:
        entries = entries[-n:] if n > 0 else []
    if not entries:
        if not quiet:
            print("-- No entries --")
        return 0
    hostname = socket.gethostname().split(".")[0]
    for e in entries:
        if output == "cat":
            print(e["msg"])
        elif output == "json":
            print(json.dumps({"MESSAGE": e["msg"], "_PID": str(e["pid"]), "SYSLOG_IDENTIFIER": e["ident"],
                              "_SYSTEMD_UNIT": e["unit"], "__REALTIME_TIMESTAMP": str(int(e["t"] * 1e6))}))
        else:
            if output == "short-iso":
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(e["t"]))
            else:
                stamp = time.strftime("%b %d %H:%M:%S", time.localtime(e["t"]))
            print(f"{stamp} {hostname} {e['ident']}[{e['pid']}]: {e['msg']}")
    return 0


# ---------------------------------------------------------------- ssh (runs the "remote" command here)
def ssh(args: list[str]) -> int:
    """ssh [-o OPT]... [-p PORT] [-T] [-x] [--] DEST COMMAND...: records the call and runs COMMAND
    with this machine's shell, as the remote host's would."""
    opts: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "--":
            i += 1
            break
        if args[i] in ("-o", "-p", "-l", "-i", "-F"):
            opts += args[i:i + 2]
            i += 2
        else:
            opts.append(args[i])
            i += 1
    if i >= len(args):
        sys.stderr.write("usage: ssh destination [command]\n")
        return 255
    dest, command = args[i], args[i + 1:]
    append_line(path("calls.jsonl"), {"prog": "ssh", "argv": args, "host": dest, "user": False, "verb": "ssh",
                                      "units": [], "options": opts, "command": command, "t": time.time()})
    fail = (read_json(path("fail.json"), {}) or {}).get("ssh")
    if fail:
        sys.stderr.write(fail.get("stderr", ""))
        return int(fail.get("rc", 255))
    return subprocess.call(["/bin/sh", "-c", " ".join(command)])


def main(prog: str, args: list[str]) -> int:
    if prog == "ssh":
        return ssh(args)
    if prog == "--manager":
        return manager(args[0], args[1])
    if prog == "journalctl":
        return journalctl(args)
    return systemctl(args)


if __name__ == "__main__":
    try:
        sys.stdout.flush()
        sys.exit(main(sys.argv[1], sys.argv[2:]))
    except BrokenPipeError:
        sys.exit(1)
