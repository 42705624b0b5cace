"""The worker setups the compatibility suite runs, per Celery version: pools, heartbeat flags,
setproctitle, and how the worker is started. Each is the command line a user would put in
`restart.target` for the local platform, with the worker venv's python or its `celery` script."""

from __future__ import annotations

import shlex
import socket
from dataclasses import dataclass

from tests.support.compat_venvs import WorkerVenv

# CloudAMQP's recommendation, used by readthedocs, sentry, tutor: no worker event at all
NO_HEARTBEAT = ("--without-heartbeat", "--without-gossip", "--without-mingle")


@dataclass(frozen=True)
class Scenario:
    name: str  # short, unique: part of the group name, the queue and the hostname
    pool: str
    concurrency: int | None = None
    flags: tuple[str, ...] = ()
    flavour: str = "plain"  # which venv: "plain" (with gevent) or "setproctitle"
    script: bool = False  # started by the venv's `celery` console script, not `python -m celery`
    named: bool = True  # `-n {hostname}`; False: celery's default hostname, celery@<this host>

    @property
    def busy_solo(self) -> bool:
        """A solo pool busy in a task sends no heartbeat and answers no ping."""
        return self.pool == "solo"

    def describe(self) -> str:
        parts = [f"--pool {self.pool}" + (f" -c {self.concurrency}" if self.concurrency else "")]
        if self.flags:
            parts.append("without heartbeat/gossip/mingle")
        if self.flavour == "setproctitle":
            parts.append("setproctitle")
        parts.append("celery script" if self.script else "python -m celery")
        if not self.named:
            parts.append("no -n")
        return ", ".join(parts)

    def hostname(self, tag: str, uid: str) -> str:
        return f"celery@{tag}-{self.name}-{uid}" if self.named else f"celery@{socket.gethostname()}"

    def command(self, venv: WorkerVenv, queue: str) -> str:
        """The `restart.target` template ({hostname} is filled by the supervisor)."""
        head = [venv.celery_script] if self.script else [venv.python, "-m", "celery"]
        argv = [*head, "-A", "tasks", "worker"]
        if self.named:
            argv += ["-n", "HOSTNAME"]
        argv += ["-Q", queue, "--pool", self.pool]
        if self.concurrency:
            argv += ["--concurrency", str(self.concurrency)]
        argv += [*self.flags, "-l", "INFO"]
        return " ".join(shlex.quote(a) for a in argv).replace("HOSTNAME", "{hostname}")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("prefork", pool="prefork", concurrency=2),
    Scenario("solo", pool="solo"),
    Scenario("threads", pool="threads", concurrency=2),
    Scenario("gevent", pool="gevent", concurrency=10),
    Scenario("nohb-solo", pool="solo", flags=NO_HEARTBEAT),
    Scenario("nohb-prefork", pool="prefork", concurrency=2, flags=NO_HEARTBEAT),
    Scenario("spt-solo", pool="solo", flavour="setproctitle", script=True),
    Scenario("spt-prefork", pool="prefork", concurrency=2, flavour="setproctitle", script=True),
    # only one such worker can exist per host (and per broker): its hostname is celery@<this host>
    Scenario("script-no-n", pool="solo", script=True, named=False),
)
BY_NAME = {s.name: s for s in SCENARIOS}
