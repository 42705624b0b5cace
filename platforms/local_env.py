"""The environment a worker started by the local platform gets (for platforms.local).

A worker needs what the supervisor was given for it, the broker URL first of all (the README's
minimal config reads it from ``${CELERY_BROKER_URL}``: the worker reads the same variable). It must
not get what only the supervisor needs:

- variables whose value holds one of the supervisor's own secrets: an alert channel's Apprise URL
  or a part of one (a token, a password, the URL itself), the RabbitMQ management URL, the Cloud
  Foundry password or client secret, the HTTP token. A value that is (or holds only) the broker's
  URL or password stays: the worker connects to that broker;
- the supervisor's own settings and plumbing, by name: ``SUPERVISOR_*``, ``CELERY_SUPERVISOR_*``,
  systemd's ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``, ``LISTEN_FDS``, ``LISTEN_PID``,
  ``LISTEN_FDNAMES``, and the platform clients' ``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
  ``DOCKER_CERT_PATH``, ``DOCKER_CONTEXT``, ``DOCKER_CONFIG`` and ``KUBECONFIG``.

Everything else is inherited. ``restart.env`` is applied last and wins (it may put back anything).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from supervisor import redact

if TYPE_CHECKING:
    from supervisor.config import Config

OWN_NAMES = re.compile(
    r"(SUPERVISOR_.*|CELERY_SUPERVISOR_.*|NOTIFY_SOCKET|WATCHDOG_USEC|WATCHDOG_PID|LISTEN_FDS|LISTEN_PID"
    r"|LISTEN_FDNAMES|DOCKER_HOST|DOCKER_TLS_VERIFY|DOCKER_CERT_PATH|DOCKER_CONTEXT|DOCKER_CONFIG|KUBECONFIG)"
)
MIN_PART = 8  # a variable holding a piece of a secret URL this long (a hook token, a host) is the supervisor's


def _forms(value: str) -> set[str]:
    return {v for v in (value, quote(value, safe=""), unquote(value)) if len(v) >= 4}


def _secret(value: object) -> str | None:
    if value is None:
        return None
    get = getattr(value, "get_secret_value", None)
    s = get() if callable(get) else value
    return s if isinstance(s, str) and s else None


def _url_parts(url: str) -> set[str]:
    """A secret URL, its password and each token-like part of its path and query."""
    out = _forms(url)
    try:
        parts = urlsplit(url)
        if parts.password:
            out |= _forms(parts.password)
    except ValueError:
        return out
    for seg in re.split(r"[/?&=#]", f"{parts.path}?{parts.query}"):
        if redact.looks_like_token(seg):
            out |= _forms(seg)
    return out


def supervisor_secrets(cfg: Config) -> tuple[set[str], set[str], str]:
    """(secrets, whole secret values, broker URL): what a worker must not get, and the broker's URL
    (whose forms and password are the worker's, even where a supervisor secret shares them)."""
    broker = cfg.broker.url.get_secret_value()
    whole: set[str] = set()
    secrets: set[str] = set()
    for c in cfg.notify.channels:
        url = c.url.get_secret_value()
        whole.add(url)
        secrets |= _url_parts(url)
    if cfg.broker.management_url:
        url = cfg.broker.management_url.get_secret_value()
        whole.add(url)
        secrets |= _forms(url)
        try:
            pw = urlsplit(url).password
        except ValueError:
            pw = None
        if pw:
            secrets |= _forms(pw)
    cf = cfg.platforms.cloudfoundry
    others = [getattr(cf, "password", None), getattr(cf, "client_secret", None), getattr(cfg.http, "token", None)]
    for s in filter(None, map(_secret, others)):
        whole.add(s)
        secrets |= _forms(s)
    # the broker's own URL and password are the worker's, whoever else uses them
    mine = _forms(broker)
    try:
        bpw = urlsplit(broker).password
    except ValueError:
        bpw = None
    if bpw:
        mine |= _forms(bpw)
    secrets = {s for s in secrets if s not in mine and s not in broker}
    return secrets, whole, broker


def worker_environment(cfg: Config, environ: Mapping[str, str], extra: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment of a worker, and the names of the variables kept from it (sorted)."""
    secrets, whole, broker = supervisor_secrets(cfg)
    env: dict[str, str] = {}
    dropped: list[str] = []
    for k, v in environ.items():
        if OWN_NAMES.fullmatch(k) or _holds(v, secrets, whole, broker):
            dropped.append(k)
        else:
            env[k] = v
    env.update(extra)
    return env, sorted(set(dropped) - set(extra))


def _holds(value: str, secrets: set[str], whole: set[str], broker: str) -> bool:
    if any(s in value for s in secrets):
        return True
    # a piece of a secret URL that was not taken for a token (a lower-case hook id, a host name)
    return len(value) >= MIN_PART and value not in broker and any(value in w for w in whole)
