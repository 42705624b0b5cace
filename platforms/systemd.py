"""The ``systemd`` platform: each worker is a systemd unit, usually an instance of a template
(``celery-worker@w2.service`` runs ``celery ... worker -n w2@%H``, see ``systemd/celery-worker@.service``).

Everything goes through the ``systemctl`` and ``journalctl`` commands, locally or on another host
with ``-H user@host`` (``platforms.systemd.host``; systemctl itself then uses ssh), for the system
manager or, with ``platforms.systemd.user``, the user's own (``--user``):

- ``inventory``: one ``systemctl show -p ... UNIT...`` for all the units of a group's hostnames;
  systemd's view is mapped to a target state: active -> running; failed, or inactive after an exit
  -> crashed / exited (``since`` = ExecMainExitTimestamp); activating (auto-restart) -> restarting;
  deactivating -> stopping; LoadState not-found or masked -> missing.
- ``restart``: ``systemctl restart UNIT``, which waits for the unit's own TimeoutStopSec; a unit
  systemd is already restarting (Restart=on-failure, auto-restart) is left to it (in_progress); a
  failed unit gets ``systemctl reset-failed UNIT`` first (systemd's start limit counts our starts too).
- ``logs``: ``journalctl -u UNIT -n N --no-pager -q -o short-iso`` (journalctl has no ``-H``: on
  another host it runs through ``ssh -o BatchMode=yes``).

The unit name comes from ``restart.target`` (default ``celery-worker@{worker}.service``). A failing,
missing or hanging ``systemctl`` (or a host whose PID 1 is not systemd) is a PlatformError carrying
systemctl's own message; it never stops the loop.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable

from platforms import Platform, PlatformError, render
from supervisor import hostnames, redact
from supervisor.config import SystemdPlatform, SystemdRestart
from supervisor.model import RestartResult, Target

UNIT_SUFFIXES = (".service", ".scope", ".socket", ".target", ".timer", ".path", ".mount", ".slice")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")
INVENTORY_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "Result", "MainPID", "ExecMainCode",
                   "ExecMainStatus", "NRestarts", "ExecMainStartTimestamp", "ExecMainExitTimestamp",
                   "InactiveEnterTimestamp")
RESTART_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "Result", "NRestarts", "TimeoutStopUSec")
AFTER_RESTART_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "Result", "MainPID", "ExecMainCode",
                       "ExecMainStatus")
SHOW_CHUNK = 200  # units per `systemctl show` call
RESTART_SLACK = 15.0  # seconds a restart may take beyond the unit's stop timeout
NOT_BOOTED = "has not been booted with systemd"
_CLD = {"1": "exited", "2": "killed", "3": "dumped"}  # ExecMainCode (si_code of the main process's end)


# ---------------------------------------------------------------- pure helpers
def unit_name(template: str, hostname: str) -> str:
    """The unit serving a Celery hostname: the template filled, ".service" added when the result
    names no unit type (as systemctl itself does). PlatformError for an invalid unit name."""
    try:
        name = render(template, hostname)
    except (KeyError, IndexError, ValueError) as e:
        raise PlatformError(f"cannot build the unit name for {hostname}: {e}") from None
    if not name.endswith(UNIT_SUFFIXES):
        name += ".service"
    if not valid_unit(name):
        raise PlatformError(
            f"{hostnames.shown(hostname)}: the target template {template!r} gives {name!r}, which is not a "
            "valid unit name (letters, digits and :_.@- only; see systemd-escape)"
        )
    return name


def valid_unit(name: str) -> bool:
    """A unit name systemctl takes as one (never an option, a pattern or a path)."""
    return bool(_UNIT_NAME.match(name)) and len(name) <= 255 and not name.startswith("-")


def parse_show(text: str) -> list[dict[str, str]]:
    """`systemctl show` output: Key=Value lines, one block per unit, blocks separated by a blank line."""
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            cur[key] = value
    if cur:
        blocks.append(cur)
    return blocks


_TS = re.compile(r"^(?:[A-Za-z]{2,3} )?(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(\.\d+)?(?: (\S+))?$")


def parse_timestamp(value: str | None) -> float | None:
    """A systemd timestamp (``Tue 2024-01-16 10:23:45 UTC``, ``@1705400625``, empty, ``n/a``) as
    seconds since the epoch. The zone is the abbreviation systemctl printed: UTC/GMT, a zone name
    Python knows, else this machine's local time."""
    v = (value or "").strip()
    if not v or v == "n/a":
        return None
    if v.startswith("@"):
        try:
            return float(v[1:])
        except ValueError:
            return None
    m = _TS.match(v)
    if not m:
        return None
    try:
        dt = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    frac = float(m.group(2)) if m.group(2) else 0.0
    zone = m.group(3)
    if zone in ("UTC", "GMT", "Z", "UTC+0"):
        return dt.replace(tzinfo=_dt.timezone.utc).timestamp() + frac
    if zone and zone not in time.tzname:
        try:
            from zoneinfo import ZoneInfo

            return dt.replace(tzinfo=ZoneInfo(zone)).timestamp() + frac
        except Exception:  # an abbreviation such as CEST: assume our own local time
            pass
    return time.mktime((*dt.timetuple()[:8], -1)) + frac


def parse_span(value: str | None) -> float | None:
    """A systemd time span (``1min 30s``, ``90s``, ``500ms``, ``infinity``) in seconds (inf), or None."""
    v = (value or "").strip()
    if not v:
        return None
    if v == "infinity":
        return math.inf
    units = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0,
             "h": 3600.0, "hr": 3600.0, "d": 86400.0, "w": 604800.0, "month": 2629800.0, "M": 2629800.0,
             "y": 31557600.0}
    total, found = 0.0, False
    for num, unit in re.findall(r"([\d.]+)\s*([A-Za-z]*)", v):
        if unit and unit not in units:
            return None
        total += float(num) * units[unit or "s"]
        found = True
    return total if found else None


def exit_text(props: dict[str, str]) -> str:
    """``code=killed, status=9/KILL`` as systemctl status writes it ("" when nothing exited)."""
    code = _CLD.get(props.get("ExecMainCode", ""), "")
    status = props.get("ExecMainStatus", "")
    if not code:
        return ""
    if code in ("killed", "dumped") and status.isdigit():
        try:
            status = f"{status}/{signal.Signals(int(status)).name.removeprefix('SIG')}"
        except ValueError:
            pass
    return f"code={code}, status={status}"


def target_state(props: dict[str, str]) -> tuple[str, str, float | None]:
    """(state, detail, since) of a unit from its `systemctl show` properties."""
    load = props.get("LoadState", "")
    active = props.get("ActiveState", "")
    sub = props.get("SubState", "")
    result = props.get("Result", "")
    restarts = props.get("NRestarts", "0")
    exited = exit_text(props)
    if load == "not-found":
        return "missing", "unit not found (LoadState=not-found)", None
    if load == "masked":
        return "missing", "unit is masked", None
    if load and load not in ("loaded", "stub", "merged"):
        return "unknown", f"unit cannot be loaded (LoadState={load})", None
    if active in ("active", "reloading"):
        detail = f"{active} ({sub}), pid {props.get('MainPID', '?')}"
        if restarts not in ("", "0"):
            detail += f", restarted {restarts} time(s) by systemd"
        return "running", detail, parse_timestamp(props.get("ExecMainStartTimestamp"))
    if active == "activating":
        detail = f"activating ({sub})"
        if sub == "auto-restart":
            detail += f": systemd restarts it itself (restart counter {restarts}"
            detail += f"; last exit: {result}, {exited})" if exited else ")"
        return "restarting", detail, parse_timestamp(props.get("ExecMainExitTimestamp"))
    if active == "deactivating":
        return "stopping", f"deactivating ({sub})", None
    if active in ("failed", "inactive"):
        ended = parse_timestamp(props.get("ExecMainExitTimestamp"))
        started = parse_timestamp(props.get("ExecMainStartTimestamp"))
        if ended is None and started is None:
            return "exited", f"{active} ({sub}): not started since the unit was loaded", None
        since = ended if ended is not None else parse_timestamp(props.get("InactiveEnterTimestamp"))
        how = f"result {result}" + (f", {exited}" if exited else "")
        if active == "failed" or result not in ("", "success"):
            return "crashed", f"{active} ({how})", since
        return "exited", f"inactive, stopped ({how})", since
    return "unknown", f"{active or '?'} ({sub or '?'})", None


# ---------------------------------------------------------------- the adapter
class Adapter(Platform):
    kind = "systemd"

    def __init__(self, config):
        super().__init__(config)
        sd = config.platforms.systemd or SystemdPlatform()
        self.host = sd.host
        self.user = sd.user
        self.timeout = sd.timeout

    # ---- commands (no I/O)
    def _options(self) -> list[str]:
        opts = []
        if self.host:
            opts += ["-H", self.host]
        if self.user:
            opts.append("--user")
        return opts

    def _restart_cfg(self, group) -> SystemdRestart:
        r = group.restart
        if not isinstance(r, SystemdRestart):
            raise PlatformError(f"group {group.name!r} does not restart through the systemd platform")
        return r

    def target_for(self, group, hostname: str) -> Target:
        return Target(id=unit_name(self._restart_cfg(group).target, hostname), group=group.name, hostname=hostname)

    def describe(self, target: Target) -> str:
        return " ".join(shlex.quote(a) for a in ["systemctl", *self._options(), "restart", target.id])

    # ---- running systemctl / journalctl
    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run a command to its end; PlatformError when it cannot start or outlives ``timeout``
        (its whole process group is killed: with -H, systemctl's ssh goes too)."""
        env = dict(os.environ)
        env.pop("LC_ALL", None)
        env.update(LC_TIME="C", SYSTEMD_PAGER="", PAGER="cat", SYSTEMD_COLORS="0", SYSTEMD_URLIFY="0")
        shown = " ".join(shlex.quote(a) for a in argv)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True)
        except FileNotFoundError:
            raise PlatformError(f"{argv[0]} not found on PATH ({env.get('PATH', '')}): "
                                f"is this a systemd host? (`{shown}`)") from None
        except OSError as e:
            raise PlatformError(f"cannot run `{shown}`: {e.strerror or e}") from None
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise PlatformError(f"`{shown}` did not finish within {timeout:g}s (killed)") from None
        res = subprocess.CompletedProcess(argv, proc.returncode, out.decode("utf-8", "replace"),
                                          err.decode("utf-8", "replace"))
        if NOT_BOOTED in res.stderr:
            where = f"on {self.host}" if self.host else "here"
            raise PlatformError(f"{_first_lines(res.stderr)} (`{shown}`: systemd is not the init system {where})")
        return res

    def _systemctl(self, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        return self._run(["systemctl", *self._options(), *args], self.timeout if timeout is None else timeout)

    def _show(self, units: list[str], props: Iterable[str]) -> dict[str, dict[str, str]]:
        """unit -> its properties, in one call per SHOW_CHUNK units."""
        out: dict[str, dict[str, str]] = {}
        for i in range(0, len(units), SHOW_CHUNK):
            chunk = units[i : i + SHOW_CHUNK]
            res = self._systemctl(["show", "-p", ",".join(props), "--", *chunk])
            if res.returncode != 0:
                raise PlatformError(f"systemctl show failed (exit {res.returncode}): "
                                    f"{_first_lines(res.stderr or res.stdout) or 'no message'}")
            blocks = parse_show(res.stdout)
            by_id = {b.get("Id"): b for b in blocks if b.get("Id")}
            for n, unit in enumerate(chunk):
                block = by_id.get(unit)
                if block is None and len(blocks) == len(chunk):
                    block = blocks[n]  # systemctl prints the blocks in the order of its arguments
                if block is None:
                    raise PlatformError(f"systemctl show printed no properties for {unit}")
                out[unit] = block
        return out

    # ---- the platform interface
    def inventory(self, group, known: Iterable[str] = (), *, seen=None) -> list[Target]:
        cfg = self._restart_cfg(group)
        hostnames = list(dict.fromkeys([*group.workers, *known]))
        units: dict[str, str] = {}
        bad: dict[str, str] = {}
        for h in hostnames:
            try:
                units[h] = unit_name(cfg.target, h)
            except PlatformError as e:
                bad[h] = str(e)
        props = self._show(list(dict.fromkeys(units.values())), INVENTORY_PROPS) if units else {}
        targets = []
        for h in hostnames:
            if h in bad:
                targets.append(Target(id=render_or_template(cfg.target, h), group=group.name, hostname=h,
                                      state="unknown", detail=bad[h]))
                continue
            state, detail, since = target_state(props[units[h]])
            targets.append(Target(units[h], group.name, h, state, detail, since))
        return targets

    def restart(self, target: Target, reason: str) -> RestartResult:
        unit = target.id
        if not valid_unit(unit):  # built from a hostname no unit can be named after: refuse, never run
            return RestartResult(False, f"refused: {unit!r} is not a valid unit name")
        try:
            group = self.group(target.group)
            cfg = self._restart_cfg(group)
            before = self._show([unit], RESTART_PROPS)[unit]
        except KeyError:
            return RestartResult(False, f"unknown group {target.group!r}")
        except PlatformError as e:
            return RestartResult(False, redact.scrub(e))
        if before.get("ActiveState") == "activating":
            sub = before.get("SubState", "")
            what = "restarting it itself" if sub == "auto-restart" else "starting it"
            return RestartResult(True, f"systemd is already {what} ({unit}: activating ({sub}), restart counter "
                                       f"{before.get('NRestarts', '?')}): nothing done", in_progress=True)
        # `systemctl restart` waits for the stop (the unit's TimeoutStopSec, then SIGKILL) and the start
        stop_span = parse_span(before.get("TimeoutStopUSec"))
        timeout = max(self.timeout, cfg.stop_timeout + RESTART_SLACK)
        if stop_span is not None and math.isfinite(stop_span):
            timeout = max(timeout, stop_span + RESTART_SLACK)
        notes = ""
        try:
            if before.get("ActiveState") == "failed" or before.get("Result") == "start-limit-hit":
                # systemd counts every start against the unit's StartLimitBurst=, ours too; past it, it
                # refuses them ("Start request repeated too quickly") until StartLimitIntervalSec passes,
                # and a unit that was already failed keeps its old Result (signal, exit-code): a real
                # systemd 252 says start-limit-hit only for a unit it was starting itself. Our budget
                # allows this restart: reset-failed clears the failed state and systemd's start counter.
                res = self._systemctl(["--no-ask-password", "reset-failed", "--", unit])
                if res.returncode != 0:
                    msg = _first_lines(res.stderr or res.stdout) or "no message"
                    return RestartResult(False, redact.scrub(f"systemctl reset-failed {unit} failed "
                                                             f"(exit {res.returncode}): {msg}"))
                if before.get("Result") == "start-limit-hit":
                    notes = " (after reset-failed: systemd had hit its start limit)"
            res = self._systemctl(["--no-ask-password", "restart", "--", unit], timeout)
        except PlatformError as e:
            return RestartResult(False, redact.scrub(f"{e}; the restart job may still be running in systemd"))
        if res.returncode != 0:
            msg = _first_lines(res.stderr or res.stdout) or "no message"
            return RestartResult(False, redact.scrub(f"systemctl restart {unit} failed (exit {res.returncode}): {msg}"))
        try:
            after = self._show([unit], AFTER_RESTART_PROPS)[unit]
        except PlatformError as e:
            return RestartResult(True, redact.scrub(f"restarted {unit} (state unknown afterwards: {e})"))
        state, detail, _ = target_state(after)
        if state in ("crashed", "exited", "missing"):
            return RestartResult(False, redact.scrub(f"{unit} is not running right after its restart: {detail}"))
        return RestartResult(True, redact.scrub(f"restarted {unit}{notes}: {detail}"))

    def journal_argv(self, unit: str, lines: int) -> list[str]:
        """journalctl has no -H: on another host it runs through ssh (as systemctl -H does itself),
        with the same [user@]host[:port][/container]."""
        jargs = ["journalctl"]
        if self.user:
            jargs.append("--user")
        jargs += ["-u", unit, "-n", str(int(lines)), "--no-pager", "-q", "-o", "short-iso"]
        if not self.host:
            return jargs
        m = re.fullmatch(r"(.*?)(?::(\d+))?(?:/([^/]+))?", self.host)
        dest, port, container = m.group(1), m.group(2), m.group(3)
        if container:
            jargs[1:1] = ["-M", container]
        ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(min(self.timeout, 30)))}", "-T", "-x"]
        if port:
            ssh += ["-p", port]
        return [*ssh, "--", dest, " ".join(shlex.quote(a) for a in jargs)]

    def logs(self, target: Target, lines: int = 50) -> str:
        if lines <= 0:
            return ""
        if not valid_unit(target.id):
            raise PlatformError(f"refused: {target.id!r} is not a valid unit name")
        res = self._run(self.journal_argv(target.id, lines), self.timeout)
        if res.returncode != 0:
            raise PlatformError(f"{res.args[0]} failed (exit {res.returncode}): "
                                f"{_first_lines(res.stderr or res.stdout) or 'no message'}")
        return redact.scrub(res.stdout.rstrip("\n"))


def render_or_template(template: str, hostname: str) -> str:
    try:
        return render(template, hostname)
    except (KeyError, IndexError, ValueError):
        return template


def _first_lines(text: str, n: int = 5) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return redact.scrub(" ".join(lines[:n]))
