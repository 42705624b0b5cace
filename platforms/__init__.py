"""Platform adapters: where workers run and how they are restarted.

One module per kind (``platforms/local.py``, ``platforms/docker.py`` ...), each
exposing a class named ``Adapter`` that implements ``Platform``. Modules are
imported only when a config uses their kind: the client libraries of docker,
kubernetes and Cloud Foundry each cost 0.1 to 0.25 s to import.
"""

from __future__ import annotations

import importlib
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from supervisor.model import RestartResult, Target, WorkerSeen

if TYPE_CHECKING:
    from supervisor.config import Config, GroupConfig

KINDS = ("cloudfoundry", "docker", "kubernetes", "systemd", "local")


class PlatformError(Exception):
    """The platform could not be asked or could not act (its API's own message, secrets scrubbed)."""


def split_hostname(hostname: str) -> tuple[str, str]:
    """celery@web-1 -> ("celery", "web-1"); a hostname without @ is all worker name."""
    worker, _, node = hostname.partition("@")
    return worker, node


def render(template: str, hostname: str) -> str:
    """Fill {hostname} (celery@web-1), {worker} (celery) and {node} (web-1)."""
    worker, node = split_hostname(hostname)
    return template.format(hostname=hostname, worker=worker, node=node)


def render_argv(template: str, hostname: str) -> list[str]:
    """A command-line template as an argv for a hostname: the template is split first (shlex, no
    shell), then each word is filled. The hostname is data: whitespace or quotes in it never split
    or join words. ValueError when the template does not split (an unbalanced quote) or a word
    cannot be filled, or when a filled word would start with "-" only because of the hostname
    (``{node}`` alone as a word, and a node named ``--logfile=...``: an injected option)."""
    worker, node = split_hostname(hostname)
    out = []
    for word in shlex.split(template):
        filled = word.format(hostname=hostname, worker=worker, node=node)
        if "\0" in filled:
            raise ValueError(f"the hostname {hostname!r} holds a NUL character")
        if filled.startswith("-") and not word.startswith("-"):
            raise ValueError(f"the hostname {hostname!r} would make the word {word!r} an option ({filled!r})")
        out.append(filled)
    return out


class Platform(ABC):
    """What every adapter offers the loop. Every call may raise PlatformError; none may hang."""

    kind: str = ""

    def __init__(self, config: Config):
        self.config = config

    def group(self, name: str) -> GroupConfig:
        g = self.config.group(name)
        if g is None:
            raise KeyError(name)
        return g

    @abstractmethod
    def inventory(self, group: GroupConfig, known: Iterable[str] = (), *,
                  seen: Mapping[str, WorkerSeen] | None = None) -> list[Target]:
        """What the platform runs for a group, with its own state and, where known, the Celery
        hostname each target serves. ``known``: hostnames the supervisor has seen for the group
        (a template-based platform renders their targets). ``seen``: what the heartbeats said of
        them (hostname -> WorkerSeen: the pid each worker reports, when it was last heard); an
        adapter that cannot use it ignores it (the local one tells its processes by it)."""

    @abstractmethod
    def target_for(self, group: GroupConfig, hostname: str) -> Target:
        """The target serving a hostname, without asking the platform (state "unknown")."""

    @abstractmethod
    def restart(self, target: Target, reason: str) -> RestartResult:
        """Restart one target; idempotent with respect to a restart already in progress."""

    def logs(self, target: Target, lines: int = 50) -> str:
        """The last lines of the target's output ("" when the platform keeps none)."""
        return ""

    @abstractmethod
    def describe(self, target: Target) -> str:
        """How a person would do the restart by hand. Makes no platform call."""

    def watch(self, wake: Callable[[str], None]) -> None:
        """Optional: call ``wake(reason)`` from any thread as soon as the platform reports that a
        worker died (a local process exited, a docker die event, a pod watch event), so that the loop
        looks at once instead of at its next tick. Must return at once (a thread of its own) and stop
        in ``close()``. The default watches nothing: the loop polls every loop.interval."""

    def close(self) -> None:
        """Release connections and threads."""


def load_adapter(kind: str, config: Config) -> Platform:
    """Import platforms.<kind> (only now) and build its adapter."""
    if kind not in KINDS:
        raise PlatformError(f"unknown platform {kind!r}")
    try:
        module = importlib.import_module(f"platforms.{kind}")
    except ImportError as e:
        raise PlatformError(
            f"the {kind} adapter cannot be imported ({e}); pip install 'celery-supervisor[{kind}]'"
        ) from None
    return module.Adapter(config)
