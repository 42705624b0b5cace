"""Real Celery workers as subprocesses, really killed, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).parent / "app"


def worker_env(broker_url: str, transport_options: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["CELERY_BROKER_URL"] = broker_url
    env["PYTHONPATH"] = str(APP_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if transport_options:
        env["CELERY_TRANSPORT_OPTIONS"] = json.dumps(transport_options)
    return env


def worker_argv(hostname: str, queues: str = "celery", pool: str = "solo", concurrency: int = 1,
                extra: tuple[str, ...] = ()) -> list[str]:
    """``extra``: more worker flags, e.g. ``("--without-heartbeat",)`` (no worker event at all)."""
    return [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", hostname, "-Q", queues,
            "--pool", pool, "--concurrency", str(concurrency), "--without-mingle", "--without-gossip",
            "-l", "WARNING", *extra]


def worker_command(hostname_template: str = "{hostname}", queues: str = "celery", pool: str = "solo") -> str:
    """The same worker as a command-line template for the local platform."""
    import shlex

    return " ".join(shlex.quote(a) for a in worker_argv("HOSTNAME", queues, pool)).replace("HOSTNAME", hostname_template)


class Worker:
    def __init__(self, broker_url: str, hostname: str, queues: str = "celery", pool: str = "solo",
                 concurrency: int = 1, transport_options: dict | None = None, log: Path | None = None,
                 extra: tuple[str, ...] = ()):
        self.hostname = hostname
        self.broker_url = broker_url
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(
            worker_argv(hostname, queues, pool, concurrency, extra), env=worker_env(broker_url, transport_options),
            cwd=str(APP_DIR), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def celery_app(broker_url: str, transport_options: dict | None = None):
    from celery import Celery

    app = Celery("tests-client", broker=broker_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    if transport_options:
        app.conf.broker_transport_options = transport_options
    return app


def wait_ping(app, hostname: str, timeout: float = 30.0) -> float:
    """Seconds until `hostname` answers a targeted ping; raises AssertionError after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if app.control.ping(destination=[hostname], timeout=0.5, limit=1):
                return time.monotonic() - t0
        except Exception:  # a pooled connection from before a broker restart: retry on a new one
            app.pool.force_close_all()
            time.sleep(0.2)
    raise AssertionError(f"{hostname} never answered ping within {timeout}s")
