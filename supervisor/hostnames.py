"""Which Celery hostnames the supervisor accepts from the broker, and resource names built from them.

A hostname is data, never syntax: anyone who can publish to the broker can forge a worker event
under any hostname, and a glob such as ``celery@real*`` matches it. So a hostname that arrives in
an event (or any other message from the broker) is refused when it

- is not a string, is empty or longer than ``MAX_LENGTH`` characters;
- holds whitespace, a quote (``'`` ``"`` `````), a backslash, or a character that prints
  nothing (control and format characters such as NUL, newline, ESC, U+202E, lone surrogates);
- or has a worker name or node name (either side of ``@``) that starts with ``-``, which a
  command could read as an option.

``Refusals`` logs each refused hostname once (memory bounded). Config hostnames (``workers:``) are
trusted and not checked here; adapters still substitute them as data (see ``platforms.render_argv``)
and check every resource name they build (``resource_name_problem``).
"""

from __future__ import annotations

import logging
import re
import threading

MAX_LENGTH = 255
_QUOTES = frozenset("'\"`\\")
REMEMBER = 1000  # refused hostnames remembered (to log each once); beyond that, counted only


def problem(hostname: object) -> str | None:
    """Why ``hostname`` (from the broker) cannot be used as a Celery hostname; None when it can."""
    if not isinstance(hostname, str):
        return f"not a string ({type(hostname).__name__})"
    if not hostname:
        return "empty"
    if len(hostname) > MAX_LENGTH:
        return f"longer than {MAX_LENGTH} characters ({len(hostname)})"
    for c in hostname:
        if c.isspace():
            return "holds whitespace"
        if c in _QUOTES:
            return "holds a quote or a backslash"
        if not c.isprintable():
            return "holds a control or invisible character"
    worker, at, node = hostname.partition("@")
    if worker.startswith("-") or (at and node.startswith("-")):
        return "a part of it starts with '-' (it would read as an option)"
    return None


def shown(hostname: object, limit: int = 80) -> str:
    """A hostname fit for one log line: repr() (escapes control characters), cut to ``limit``."""
    text = repr(hostname)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f"({len(str(hostname))} chars)"


class Refusals:
    """Checks hostnames from one source and logs each refused one once."""

    def __init__(self, logger: logging.Logger, source: str):
        self.log = logger
        self.source = source
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.refused = 0  # events refused, all hostnames together

    def accept(self, hostname: object) -> bool:
        """True when the hostname may be used; otherwise False, logged the first time."""
        why = problem(hostname)
        if why is None:
            return True
        key = hostname if isinstance(hostname, str) else repr(hostname)
        if len(key) > 2 * MAX_LENGTH:  # remember a bounded key, whatever the size of the event
            key = f"{key[:2 * MAX_LENGTH]}...({len(key)})"
        with self._lock:
            self.refused += 1
            first = key not in self._seen and len(self._seen) < REMEMBER
            if first:
                self._seen.add(key)
            overflow = not first and key not in self._seen and self.refused % 1000 == 0
        if first:
            self.log.warning("ignored %s from hostname %s: %s (a Celery hostname is data, never syntax; "
                             "anyone who can publish to the broker can forge events)",
                             self.source, shown(hostname), why)
        elif overflow:
            self.log.warning("ignored %d %s with unacceptable hostnames so far (more than %d distinct)",
                             self.refused, self.source, REMEMBER)
        return False


# ---------------------------------------------------------------- names built from hostnames
_DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_CF_APP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

RULES = {
    # what the engine accepts as a container name (docker's own check)
    "docker container": (_DOCKER_NAME, 253, "letters, digits and _.- only, starting with a letter or digit"),
    # a pod name is a DNS subdomain (RFC 1123)
    "kubernetes pod": (_DNS_SUBDOMAIN, 253, "lowercase letters, digits, - and . only (a DNS subdomain)"),
    # an app name taken from a hostname: it goes into the API's `names` filter, where a comma separates
    "cloudfoundry app": (_CF_APP, 255, "letters, digits and _.- only, starting with a letter or digit"),
}


def resource_name_problem(kind: str, name: str) -> str | None:
    """Why ``name`` is not a valid name of a ``kind`` resource (a key of ``RULES``); None when it is."""
    regex, longest, what = RULES[kind]
    if not name:
        return f"an empty {kind} name"
    if len(name) > longest:
        return f"a {kind} name longer than {longest} characters"
    if not regex.fullmatch(name):
        return f"{name!r} is not a valid {kind} name ({what})"
    return None
