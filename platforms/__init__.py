"""Platform adapters: where workers run and how they are restarted.

One module per kind (``platforms/local.py``, ``platforms/docker.py`` ...), each
exposing a class named ``Adapter`` that implements ``Platform``. Modules are
imported only when a config uses their kind: the client libraries of docker,
kubernetes and Cloud Foundry each cost 0.1 to 0.25 s to import.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING

from supervisor.model import RestartResult, Target

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
    def inventory(self, group: GroupConfig, known: Iterable[str] = ()) -> list[Target]:
        """What the platform runs for a group, with its own state and, where known, the Celery
        hostname each target serves. ``known``: hostnames the supervisor has seen for the group
        (a template-based platform renders their targets)."""

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
