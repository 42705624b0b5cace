"""The fake systemd of tests/support/fake_systemd/ for one test: a state directory, unit files,
the environment that puts the fake ``systemctl`` / ``journalctl`` first on PATH, and a cleanup that
stops every unit it ran and kills what is left, by PID.

    with FakeSystemd(tmp_path) as sd:
        sd.install_worker_unit(redis_url, node="n1")      # celery-worker@.service: -n %i@n1
        sd.systemctl("start", "celery-worker@w2.service")
        env = sd.env()                                     # for `supervisor run` / the adapter
        sd.calls("restart")                                # what the supervisor ran
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.workers import APP_DIR, worker_argv

FAKE_BIN = Path(__file__).parent / "fake_systemd"


def unit_quote(argv: list[str]) -> str:
    """A command line for ExecStart= (shell-like quoting; % is a specifier there, so doubled)."""
    return " ".join(shlex.quote(a).replace("%", "%%") for a in argv)


class FakeSystemd:
    def __init__(self, root: Path):
        self.dir = root / "fake-systemd"
        (self.dir / "units").mkdir(parents=True, exist_ok=True)
        self.bin = FAKE_BIN

    # ---- environment
    def env(self, base: dict[str, str] | None = None, path_first: bool = True) -> dict[str, str]:
        """``base`` (default os.environ) with the fake first on PATH and its state dir set."""
        env = dict(os.environ if base is None else base)
        env["FAKE_SYSTEMD_DIR"] = str(self.dir)
        env["FAKE_SYSTEMD_PYTHON"] = sys.executable
        if path_first:
            env["PATH"] = str(self.bin) + os.pathsep + env.get("PATH", os.defpath)
        return env

    @contextlib.contextmanager
    def on_path(self):
        """This process's own environment with the fake first (for an adapter used in-process)."""
        saved = dict(os.environ)
        os.environ.update(self.env())
        try:
            yield self
        finally:
            os.environ.clear()
            os.environ.update(saved)

    # ---- units
    def install(self, name: str, text: str) -> Path:
        p = self.dir / "units" / name
        p.write_text(text, encoding="utf-8")
        return p

    def install_worker_unit(self, broker_url: str, node: str, queues: str = "celery",
                            name: str = "celery-worker@.service", restart: str = "no", restart_sec: str = "100ms",
                            timeout_stop: str = "10s", kill_mode: str = "mixed", loglevel: str = "WARNING") -> Path:
        """A templated unit running a real Celery worker of tests/support/app as ``%i@<node>``."""
        argv = worker_argv("HOST", queues=queues)
        argv[argv.index("-l") + 1] = loglevel
        exec_start = unit_quote(argv).replace("HOST", "%i@" + node)
        return self.install(name, f"""[Unit]
Description=Celery worker %i (test)

[Service]
Type=simple
WorkingDirectory={APP_DIR}
Environment="CELERY_BROKER_URL={broker_url}" "PYTHONPATH={APP_DIR}" PYTHONUNBUFFERED=1
ExecStart={exec_start}
Restart={restart}
RestartSec={restart_sec}
KillMode={kill_mode}
TimeoutStopSec={timeout_stop}
""")

    # ---- running the fake, as a user would
    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.bin / "systemctl"), *args], env=self.env(), capture_output=True, text=True,
                           timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"systemctl {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    def journalctl(self, *args: str) -> str:
        return subprocess.run([str(self.bin / "journalctl"), *args], env=self.env(), capture_output=True,
                              text=True, timeout=60, check=True).stdout

    def show(self, unit: str) -> dict[str, str]:
        out = self.systemctl("show", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit).get("MainPID") or 0)

    # ---- what was run
    def calls(self, verb: str | None = None, prog: str = "systemctl") -> list[dict]:
        try:
            lines = (self.dir / "calls.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = [json.loads(x) for x in lines if x.strip()]
        return [c for c in out if c["prog"] == prog and (verb is None or c["verb"] == verb)]

    def fail(self, verb: str, rc: int | None = 1, stderr: str = "", sleep: float = 0.0) -> None:
        """Make ``systemctl VERB`` ("*": any verb; "journalctl") fail, or hang ``sleep`` seconds."""
        p = self.dir / "fail.json"
        rules = json.loads(p.read_text()) if p.exists() else {}
        rules[verb] = {"rc": rc, "stderr": stderr, "sleep": sleep}
        p.write_text(json.dumps(rules))

    def heal(self) -> None:
        with contextlib.suppress(OSError):
            (self.dir / "fail.json").unlink()

    # ---- cleanup
    def states(self) -> dict[str, dict]:
        out = {}
        for p in (self.dir / "run").glob("*.json") if (self.dir / "run").is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                out[p.name[:-5]] = json.loads(p.read_text())
        return out

    def cleanup(self) -> None:
        self.heal()
        for unit, st in self.states().items():
            if st.get("ActiveState") not in ("inactive", "failed"):
                with contextlib.suppress(Exception):
                    subprocess.run([str(self.bin / "systemctl"), "stop", unit], env=self.env(), timeout=30,
                                   capture_output=True)
        pids = []  # only processes proven to be ours: a recorded PID may have been reused since
        for st in self.states().values():
            if st.get("MainPID") and st.get("InvocationID") and \
                    _environ_has(int(st["MainPID"]), f"INVOCATION_ID={st['InvocationID']}"):
                pids.append(int(st["MainPID"]))
            if st.get("manager") and _environ_has(int(st["manager"]), f"FAKE_SYSTEMD_DIR={self.dir}"):
                pids.append(int(st["manager"]))
        for pid in pids:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)

    def __enter__(self) -> FakeSystemd:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


def _environ_has(pid: int, item: str) -> bool:
    try:
        return item.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
