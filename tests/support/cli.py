"""Running the `supervisor` command for real, as a subprocess, and cleaning up after it.

    r = run_cli("once", "-c", cfg, "--json")
    r.rc, r.out, r.err, r.elapsed, r.json

Every child runs in a session of its own and is killed by its process group when it outlives its
timeout (a hung command is a test failure with its output so far, never a hung test run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def cli_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The test process's environment without SUPERVISOR_CONFIG (a stray one would change every
    command), plus ``extra``, minus ``drop``."""
    env = dict(os.environ)
    env.pop("SUPERVISOR_CONFIG", None)
    for k in drop:
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", *map(str, args)]


@dataclass
class CliResult:
    args: tuple[str, ...]
    rc: int
    out: str
    err: str
    elapsed: float

    @property
    def output(self) -> str:
        return self.out + self.err

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except ValueError as e:
            raise AssertionError(f"`supervisor {' '.join(self.args)}` printed no JSON ({e}):\n{self}") from None

    def __str__(self) -> str:
        return (f"$ supervisor {' '.join(self.args)}  -> exit {self.rc} after {self.elapsed:.1f}s\n"
                f"--- stdout\n{self.out}--- stderr\n{self.err}---")


def _killpg(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            cwd: str | os.PathLike | None = None) -> CliResult:
    """Run `python -m supervisor ARGS` to its end. AssertionError (with the output so far) when it
    runs longer than ``timeout``: the process group is killed first."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        # by default a fresh directory: a config's relative loop.state_path must not be shared by tests
        cli_argv(*args), env=env if env is not None else cli_env(), cwd=str(cwd or tempfile.mkdtemp(prefix="sv-cli-")),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        out, err = proc.communicate()
        res = CliResult(tuple(map(str, args)), -9, out or "", err or "", time.monotonic() - t0)
        raise AssertionError(f"`supervisor {' '.join(res.args)}` still running after {timeout}s (killed):\n{res}") from None
    return CliResult(tuple(map(str, args)), proc.returncode, out, err, time.monotonic() - t0)


def write_config(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class CliDaemon:
    """`supervisor run ...` in the background; stdout and stderr go to files (never a full pipe)."""

    def __init__(self, *args: str, log_dir: Path, env: dict[str, str] | None = None, name: str = "run"):
        self.args = tuple(map(str, args))
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 (closed in stop)
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cli_argv(*args), env=env if env is not None else cli_env(), cwd=str(REPO),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.out + self.err:
                return
            if not self.alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"`supervisor {' '.join(self.args)}` never printed {text!r} "
                             f"(running: {self.alive()}):\n--- stdout\n{self.out}--- stderr\n{self.err}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            _killpg(self.proc.pid)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self._out, self._err):
            f.close()

    def __str__(self) -> str:
        return f"$ supervisor {' '.join(self.args)}\n--- stdout\n{self.out}--- stderr\n{self.err}---"


def pidfile_pids(run_dir: Path) -> list[int]:
    """PIDs named by the local platform's pid files in ``run_dir``."""
    pids = []
    for p in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        try:
            pids.append(int(json.loads(p.read_text())["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return pids


def kill_pids(pids: list[int], wait: float = 10.0) -> None:
    """SIGKILL each PID and its process group (local workers run in sessions of their own)."""
    for pid in pids:
        _killpg(pid)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


def pids_with_arg(arg: str) -> list[int]:
    """Live processes one of whose argv items equals ``arg`` (e.g. a worker's -n hostname)."""
    out = []
    needle = arg.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv and pid_alive(int(name)):
            out.append(int(name))
    return out
