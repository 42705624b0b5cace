"""A real fleet for loop tests: local workers started through the local platform, and
`supervisor run` as a subprocess reading a config written to disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.support.workers import APP_DIR, worker_argv


def local_restart(broker_url: str, pool: str = "solo", queues: str = "celery", extra: tuple[str, ...] = (),
                  **over) -> dict:
    """A `restart:` section running tests/support/app workers through the local platform (``extra``:
    more worker flags, e.g. ``("--without-heartbeat",)``)."""
    import shlex

    argv = worker_argv("HOSTNAME", queues=queues, pool=pool, extra=extra)
    target = " ".join(shlex.quote(a) for a in argv).replace("HOSTNAME", "{hostname}")
    section = {"platform": "local", "target": target, "cwd": str(APP_DIR),
               "env": {"CELERY_BROKER_URL": broker_url, "PYTHONPATH": str(APP_DIR)},
               "max_restarts": 3, "window": "10m", "backoff": "1s", "grace": "20s", "stop_timeout": "5s"}
    section.update(over)
    return section


class Fleet:
    """Config + local workers + a `supervisor run` subprocess, all in one tmp folder."""

    def __init__(self, tmp: Path, config: dict):
        self.tmp = tmp
        config.setdefault("loop", {}).setdefault("state_path", str(tmp / "state.db"))
        config["loop"].setdefault("interval", "1s")
        self.config = config
        self.path = tmp / "supervisor.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.run_dir = tmp / "supervisor-local"
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "supervisor.log"
        from supervisor.config import load_config

        self.cfg = load_config(self.path)

    # ---- workers, through the same adapter the supervisor uses
    def adapter(self):
        from platforms import load_adapter

        return load_adapter("local", self.cfg)

    def target(self, hostname: str, group: str | None = None):
        g = self.cfg.group_of(hostname) if group is None else next(x for x in self.cfg.groups if x.name == group)
        return self.adapter().target_for(g, hostname)

    def start_worker(self, hostname: str) -> int:
        a = self.adapter()
        r = a.restart(self.target(hostname), "test start")
        assert r.ok, r.message
        return self.pid(hostname)

    def start_workers(self, *hostnames: str):
        """Start workers through the local platform and wait until each answers ping; the Celery
        app used to ping them (for the test's own pings and tasks)."""
        from tests.support.workers import celery_app, wait_ping

        for h in hostnames:
            self.start_worker(h)
        app = celery_app(self.cfg.broker.url.get_secret_value())
        for h in hostnames:
            wait_ping(app, h)
        return app

    def pid(self, hostname: str) -> int | None:
        t = self.target(hostname)
        try:
            return json.loads((self.run_dir / f"{t.id}.pid").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def starts(self, hostname: str) -> int:
        """How many times a worker was started (each start writes one line to its log)."""
        t = self.target(hostname)
        try:
            text = (self.run_dir / f"{t.id}.log").read_text(errors="replace")
        except OSError:
            return 0
        return text.count("celery-supervisor starts")

    def kill(self, hostname: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(hostname)
        os.kill(pid, sig)
        return pid

    # ---- the supervisor
    def run(self, *extra: str, env: dict[str, str] | None = None) -> Fleet:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "-c", str(self.path), "--log-level", "DEBUG", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        elif self.proc is not None:
            rc = self.proc.returncode
        if self.proc is not None:
            self.log.close()
        self.proc = None
        return rc

    def cleanup(self) -> None:
        self.stop()
        if self.run_dir.exists():
            a = self.adapter()
            for pf in self.run_dir.glob("*.pid"):
                try:
                    data = json.loads(pf.read_text())
                    g = self.cfg.group_of(data["hostname"])
                    if g is not None:
                        a.stop(a.target_for(g, data["hostname"]), timeout=1.0)
                    else:
                        os.kill(data["pid"], signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
