"""The ``docker`` platform: workers run in containers, restarted through the Docker Engine API.

Driven by the ``docker`` SDK (``pip install 'celery-supervisor[docker]'``), against Docker or any
engine serving its API (podman's ``podman system service``). Connection: ``platforms.docker``
(``base_url``, else ``DOCKER_HOST``, else the local socket; ``timeout`` for one call).

Which containers serve a group (``groups[].restart``):

- ``target``: a container name template, ``"celery-{node}"``: the container of ``celery@web-1`` is
  ``celery-web-1``;
- ``selector``: container labels, ``{app: celery-worker}``: the engine lists the containers;
- either or both. A container serves the Celery hostname whose rendered ``target`` is its name, or
  whose node part (after ``@``) is the container's own hostname (``Config.Hostname``; a worker
  started with ``-n celery@%h`` inside it has exactly that node). A container no known hostname
  claims is given ``<worker>@<its hostname>`` when that matches the group's globs.

State, from ``docker inspect``: ``State.Running`` (never ``State.Status``, which podman shows as
"stopped" for a moment after a crash), ``Restarting``, ``ExitCode`` and ``FinishedAt`` (the time
of death, ``since``). A container whose restart policy the engine applies after a crash
(``always``, ``unless-stopped``, ``on-failure`` with retries left) is left to the engine for
``ENGINE_GRACE`` seconds after it died: podman restarts such a container 0.1 to 0.4 s after a
crash, Docker shows ``Restarting`` during its back-off. If it is still down after that, the engine
did not restart it (podman does not after a kill or stop through the API) and we do.

``restart`` is ``docker restart -t <stop_timeout>``: SIGTERM, SIGKILL after ``stop_timeout``, start
again. It is a no-op (``in_progress``) when the engine is restarting the container, or when the
container already runs again since the death we were told about.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import logging
import math
import os
import re
import shlex
import signal
import string
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import docker.utils
import requests.exceptions

from platforms import Platform, PlatformError, render, split_hostname
from supervisor import hostnames, redact
from supervisor.config import DockerPlatform, DockerRestart
from supervisor.model import DEAD_STATES, RestartResult, Target

if TYPE_CHECKING:
    from supervisor.config import Config, GroupConfig

log = logging.getLogger(__name__)
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
ENGINE_GRACE = 10.0  # a crashed container with an engine restart policy is the engine's for this long
LOG_MAX_CHARS = 16_000  # logs() keeps at most this much of the end of the output
_WILD = re.compile(r"[*?\[]")


# ---------------------------------------------------------------- pure helpers (unit-tested)
def parse_time(value: str | None) -> float | None:
    """An engine timestamp (RFC 3339, nanoseconds, ``Z`` or an offset) as epoch seconds; None for
    Go's zero time ("0001-01-01T00:00:00Z", never started / never finished) or garbage."""
    if not value or value.startswith("0001-"):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", value.strip())
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]  # Python keeps microseconds
    tz = m.group(3) or "Z"
    try:
        t = _dt.datetime.fromisoformat(m.group(1) + frac + ("+00:00" if tz == "Z" else tz))
    except ValueError:
        return None
    return t.timestamp()


def exit_detail(code: int | None, oom: bool = False, error: str = "") -> str:
    """"exit code 137 (SIGKILL)", plus OOM and the engine's own error."""
    if code is None:
        text = "exited"
    else:
        text = f"exit code {code}"
        if code > 128:
            try:
                text += f" ({signal.Signals(code - 128).name})"
            except ValueError:
                pass
    if oom:
        text += ", OOM killed"
    if error:
        text += f": {error}"
    return text


def engine_restarts(attrs: dict) -> str | None:
    """The restart policy under which the engine itself restarts this exited container, or None."""
    policy = ((attrs.get("HostConfig") or {}).get("RestartPolicy") or {})
    name = policy.get("Name") or ""
    if name in ("always", "unless-stopped"):
        return name
    if name == "on-failure":
        code = (attrs.get("State") or {}).get("ExitCode")
        most = policy.get("MaximumRetryCount") or 0
        if code not in (0, None) and (most == 0 or (attrs.get("RestartCount") or 0) < most):
            return f"on-failure (restart {(attrs.get('RestartCount') or 0) + 1}" + (f" of {most})" if most else ")")
    return None


def container_state(attrs: dict, now: float) -> tuple[str, str, float | None]:
    """(state, detail, since) of one ``docker inspect`` document, ``since`` on our clock (an engine
    clock ahead of ours never yields a time in our future)."""
    st = attrs.get("State") or {}
    if st.get("Restarting"):
        return "restarting", f"the engine is restarting it (restart count {attrs.get('RestartCount') or 0})", None
    if st.get("Running"):
        started = parse_time(st.get("StartedAt"))
        started = min(started, now) if started is not None else None
        parts = ["paused" if st.get("Paused") else "running"]
        health = (st.get("Health") or {}).get("Status")
        if health:
            parts.append(f"health {health}")
        if attrs.get("RestartCount"):
            parts.append(f"restarted {attrs['RestartCount']} time(s) by the engine")
        return "running", ", ".join(parts), started
    status = (st.get("Status") or "").lower()
    if status == "created":
        return "exited", "created, never started", None
    if status == "removing":
        return "stopping", "being removed", None
    finished = parse_time(st.get("FinishedAt"))
    finished = min(finished, now) if finished is not None else None
    detail = exit_detail(st.get("ExitCode"), bool(st.get("OOMKilled")), st.get("Error") or "")
    policy = engine_restarts(attrs)
    if policy:
        if finished is None or now - finished < ENGINE_GRACE:
            return "restarting", f"{detail}; left to the engine (restart policy {policy})", None
        detail += f"; restart policy {policy.split(' ')[0]} did not bring it back within {ENGINE_GRACE:g}s"
    return "exited", detail, finished


def container_name(summary: dict) -> str:
    """The name of a container in a ``docker ps`` (list) row or an inspect document."""
    names = summary.get("Names")
    if names:
        return names[0].lstrip("/")
    return (summary.get("Name") or "").lstrip("/") or (summary.get("Id") or "")[:12]


def template_regex(template: str) -> re.Pattern[str]:
    """A regex matching the names a target template renders; named groups for its placeholders."""
    out, seen = [], set()
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is None:
            continue
        if field in seen:
            out.append(f"(?P={field})")
        else:
            seen.add(field)
            out.append({"hostname": r"(?P<hostname>[^@]+@.+?)", "worker": r"(?P<worker>[^@]+?)"}
                       .get(field, rf"(?P<{field}>.+?)"))
    return re.compile("".join(out))


def literal_workers(group: GroupConfig) -> list[str]:
    """Worker names (before @) the group's explicit workers and glob patterns name literally."""
    out = [split_hostname(h)[0] for h in group.workers]
    for g in group.hostnames:
        worker, at, _ = g.partition("@")
        if at and not _WILD.search(worker):
            out.append(worker)
    return list(dict.fromkeys(out))


def _rank(t: Target, attrs: dict) -> tuple:
    """Which of several containers serving one hostname stands for it: running, then restarting,
    then the most recently started."""
    order = {"running": 0, "restarting": 1, "stopping": 2}.get(t.state, 3)
    started = parse_time((attrs.get("State") or {}).get("StartedAt")) or 0.0
    return (order, -started)


# ---------------------------------------------------------------- the adapter
class Adapter(Platform):
    kind = "docker"

    def __init__(self, config: Config):
        super().__init__(config)
        self.settings = config.platforms.docker or DockerPlatform()
        self.base_url = self.settings.base_url
        redact.register_url(self.base_url)
        self._client_obj: Any = None
        self._lock = threading.Lock()
        self._events_stop = threading.Event()
        self._events_stream: Any = None  # the open events stream (closed by close())
        self._events_thread: threading.Thread | None = None

    # ---- connection
    @property
    def engine(self) -> str:
        """Where we talk to, fit to print."""
        url = self.base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        return redact.redact_url(url) if "://" in url else redact.scrub(url)

    def _client(self):
        with self._lock:
            if self._client_obj is None:
                env = dict(os.environ)
                if self.base_url:
                    env["DOCKER_HOST"] = self.base_url
                try:
                    # DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH as the docker CLI reads them;
                    # version None: ask the engine which API version it speaks (podman 4.3: 1.41)
                    params = docker.utils.kwargs_from_env(environment=env)
                    self._client_obj = docker.DockerClient(timeout=self.settings.timeout, version=None, **params)
                except Exception as e:
                    raise PlatformError(f"cannot reach the Docker engine at {self.engine}: {self._reason(e)}") from None
            return self._client_obj

    def _drop_client(self) -> None:
        with self._lock:
            c, self._client_obj = self._client_obj, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

    @staticmethod
    def _reason(e: BaseException) -> str:
        """The engine's own message, or the innermost OS-level cause of a connection failure."""
        if isinstance(e, docker.errors.APIError):
            msg = e.explanation or str(e)
            if isinstance(msg, bytes):
                msg = msg.decode("utf-8", "replace")
            code = e.status_code
            return redact.scrub(f"{msg} (HTTP {code})" if code else msg)
        if isinstance(e, requests.exceptions.Timeout):
            return redact.scrub(f"no answer in time ({e.__class__.__name__})")
        seen: set[int] = set()
        todo: list[BaseException] = [e]
        while todo:  # the innermost OSError with a strerror: "No such file or directory", "Connection refused"
            x = todo.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            if isinstance(x, OSError) and x.strerror and not isinstance(x, requests.exceptions.RequestException):
                return redact.scrub(x.strerror)
            todo += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
            todo += [c for c in (x.__cause__, x.__context__) if c is not None]
            reason = getattr(x, "reason", None)
            if isinstance(reason, BaseException):
                todo.append(reason)
        return redact.scrub(str(e) or type(e).__name__)

    def _call(self, what: str, fn, *args, **kw):
        """One API call; every failure becomes a PlatformError (NotFound stays NotFound)."""
        api = self._client().api
        try:
            return fn(api, *args, **kw)
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as e:
            raise PlatformError(f"docker {what}: {self._reason(e)}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as e:
            if not isinstance(e, requests.exceptions.Timeout):
                self._drop_client()  # reconnect (and re-detect the API version) on the next call
            raise PlatformError(f"docker {what}: cannot reach the Docker engine at {self.engine}: "
                                f"{self._reason(e)}") from None

    # ---- config
    def _restart_cfg(self, group: GroupConfig) -> DockerRestart:
        r = group.restart
        if not isinstance(r, DockerRestart):
            raise PlatformError(f"group {group.name!r} does not restart through the docker platform")
        return r

    def _name_for(self, cfg: DockerRestart, hostname: str) -> str | None:
        """The container name the target template gives a hostname; None without a template, or
        when the name it gives is no valid container name (never sent to the engine)."""
        return None if self._name_problem(cfg, hostname) else self._render(cfg, hostname)

    @staticmethod
    def _render(cfg: DockerRestart, hostname: str) -> str | None:
        if not cfg.target:
            return None
        try:
            return render(cfg.target, hostname)
        except (KeyError, IndexError, ValueError):
            return None

    def _name_problem(self, cfg: DockerRestart, hostname: str) -> str | None:
        """Why the template cannot name a container for this hostname (None: it can, or no template)."""
        if not cfg.target:
            return None
        name = self._render(cfg, hostname)
        if name is None:
            return f"the target template {cfg.target!r} cannot be filled for {hostnames.shown(hostname)}"
        return hostnames.resource_name_problem("docker container", name)

    @staticmethod
    def _placeholder(hostname: str) -> str:
        """The id of a selector-only target whose container is not known yet (no container name
        has angle brackets)."""
        return f"<{hostname}>"

    def target_for(self, group: GroupConfig, hostname: str) -> Target:
        cfg = self._restart_cfg(group)
        return Target(self._name_for(cfg, hostname) or self._placeholder(hostname), group.name, hostname)

    # ---- inventory
    def _list(self, cfg: DockerRestart) -> list[dict]:
        filters = {"label": [f"{k}={v}" for k, v in cfg.selector.items()]} if cfg.selector else None
        return self._call("ps", lambda api: api.containers(all=True, filters=filters))

    def _inspect(self, name: str) -> dict | None:
        try:
            return self._call("inspect", lambda api: api.inspect_container(name))
        except docker.errors.NotFound:
            return None

    def _hostname_of(self, group: GroupConfig, cfg: DockerRestart, name: str, attrs: dict,
                     by_name: dict[str, str], by_node: dict[str, list[str]]) -> str | None:
        if name in by_name:
            return by_name[name]
        node = (attrs.get("Config") or {}).get("Hostname") or ""
        mine = [h for h in by_node.get(node, []) if self._name_problem(cfg, h) is None
                and self._name_for(cfg, h) in (None, name)] if node else []
        if mine:
            return mine[0]
        if cfg.target:
            m = template_regex(cfg.target).fullmatch(name)
            if m:
                g = m.groupdict()
                if g.get("hostname"):
                    return g["hostname"]
                if g.get("worker") and g.get("node"):
                    return f"{g['worker']}@{g['node']}"
                node = g.get("node") or node
        for worker in literal_workers(group):
            h = f"{worker}@{node}"
            if node and group.matches(h) and self._name_for(cfg, h) in (None, name):
                return h
        return None

    @staticmethod
    def _could_be_ours(group: GroupConfig, pattern: re.Pattern[str] | None, name: str) -> bool:
        """A name the template makes for some hostname of this group (checked before any inspect)."""
        m = pattern.fullmatch(name) if pattern else None
        if m is None:
            return False
        g = m.groupdict()
        if g.get("hostname"):
            return group.matches(g["hostname"])
        if g.get("worker") and g.get("node"):
            return group.matches(f"{g['worker']}@{g['node']}")
        if g.get("node"):  # the worker name may come from the container: keep it if any glob allows the node
            return any(group.matches(f"{w}@{g['node']}") for w in literal_workers(group)) or \
                any(fnmatch.fnmatchcase(g["node"], h.partition("@")[2]) for h in group.hostnames if "@" in h)
        return True

    def inventory(self, group: GroupConfig, known: Iterable[str] = (), *, seen=None) -> list[Target]:
        cfg = self._restart_cfg(group)
        hostnames = list(dict.fromkeys([*group.workers, *known]))
        by_name = {n: h for h in hostnames if (n := self._name_for(cfg, h))}
        by_node: dict[str, list[str]] = {}
        for h in hostnames:
            by_node.setdefault(split_hostname(h)[1], []).append(h)
        pattern = template_regex(cfg.target) if cfg.target else None
        rows = self._list(cfg)
        now = time.time()
        found: dict[str, tuple[Target, dict]] = {}  # hostname -> best container
        others: list[Target] = []
        for row in rows:
            name = container_name(row)
            if not cfg.selector and name not in by_name and not self._could_be_ours(group, pattern, name):
                continue  # a name template alone: only containers it could have named for this group
            attrs = self._inspect(row.get("Id") or name)
            if attrs is None:  # removed between the list and the inspect
                continue
            name = container_name(attrs) or name
            h = self._hostname_of(group, cfg, name, attrs, by_name, by_node)
            state, detail, since = container_state(attrs, now)
            t = Target(name, group.name, h, state, detail, since)
            if h is None:
                if cfg.selector:
                    others.append(t)  # in the group's selector, serving no hostname we can name
                continue
            if h not in found or _rank(t, attrs) < _rank(*found[h]):
                found[h] = (t, attrs)
        out: list[Target] = []
        for h in hostnames:
            if h in found:
                out.append(found.pop(h)[0])
            elif (problem := self._name_problem(cfg, h)) is not None:
                # a hostname no container can be named after: nothing is asked of the engine for it
                out.append(Target(self._placeholder(h), group.name, h, "unknown", f"refused: {problem}"))
            else:
                name = self._name_for(cfg, h)
                where = f"no container named {name}" if name else \
                    f"no container with hostname {split_hostname(h)[1]} and labels {self._labels(cfg)}"
                out.append(Target(name or self._placeholder(h), group.name, h, "missing", where))
        out += [t for t, _ in found.values()]
        return out + others

    @staticmethod
    def _labels(cfg: DockerRestart) -> str:
        return ",".join(f"{k}={v}" for k, v in cfg.selector.items())

    # ---- resolving a target to a container
    def _resolve(self, target: Target) -> tuple[str, dict]:
        """(container name, inspect document) for a target; PlatformError when there is none."""
        name = target.id
        if not name.startswith("<"):
            problem = hostnames.resource_name_problem("docker container", name)
            if problem:
                raise PlatformError(f"refused: {problem}")
            attrs = self._inspect(name)
            if attrs is None:
                raise PlatformError(f"no container named {name!r} on the Docker engine at {self.engine}")
            return container_name(attrs) or name, attrs
        group = self.group(target.group)
        cfg = self._restart_cfg(group)
        if not target.hostname:
            raise PlatformError(f"target {target.id!r} names no Celery hostname")
        problem = self._name_problem(cfg, target.hostname)
        if problem:
            raise PlatformError(f"refused: {problem}")
        for t in self.inventory(group, [target.hostname]):
            if t.hostname == target.hostname and t.state != "missing":
                attrs = self._inspect(t.id)
                if attrs is not None:
                    return t.id, attrs
        raise PlatformError(f"no container serves {target.hostname} (labels {self._labels(cfg)}, "
                            f"hostname {split_hostname(target.hostname)[1]}) on the Docker engine at {self.engine}")

    # ---- restart
    def restart(self, target: Target, reason: str) -> RestartResult:
        try:
            cfg = self._restart_cfg(self.group(target.group))
        except KeyError:
            return RestartResult(False, f"unknown group {target.group!r}")
        except PlatformError as e:
            return RestartResult(False, str(e))
        try:
            name, attrs = self._resolve(target)
            st = attrs.get("State") or {}
            now = time.time()
            state, detail, _ = container_state(attrs, now)
            if st.get("Restarting") or (state == "restarting" and not st.get("Running")):
                return RestartResult(True, f"{name}: {detail}; not restarting it ourselves", in_progress=True)
            started = parse_time(st.get("StartedAt"))
            if st.get("Running") and target.state in (*DEAD_STATES, "restarting") and started is not None \
                    and (target.since is None or started > target.since):
                # it died, and something (its restart policy, a person) started it again since
                return RestartResult(True, f"{name} is running again (started {now - min(started, now):.1f}s ago); "
                                           "not restarting it twice", in_progress=True)
            t = max(0, math.ceil(cfg.stop_timeout))
            # the SDK waits the client timeout plus t for the answer: the engine may take t to stop it
            self._call("restart", lambda api: api.restart(name, timeout=t))
            after = self._inspect(name)
        except docker.errors.NotFound:
            return RestartResult(False, f"no container named {target.id!r} on the Docker engine at {self.engine}")
        except PlatformError as e:
            return RestartResult(False, redact.scrub(e))
        was = f" (was {detail})" if detail else ""
        if after is None:
            return RestartResult(False, f"{name} disappeared during its restart")
        if not (after.get("State") or {}).get("Running"):
            _, now_detail, _ = container_state(after, time.time())
            return RestartResult(False, redact.scrub(f"{name} is not running right after its restart: {now_detail}"))
        return RestartResult(True, redact.scrub(f"restarted container {name}{was}"))

    # ---- logs
    def logs(self, target: Target, lines: int = 50) -> str:
        try:
            name = self._resolve(target)[0] if target.id.startswith("<") or \
                hostnames.resource_name_problem("docker container", target.id) else target.id
            raw = self._call("logs", lambda api: api.logs(name, stdout=True, stderr=True, tail=max(1, lines)))
        except docker.errors.NotFound:
            raise PlatformError(f"no container named {target.id!r} on the Docker engine at {self.engine}") from None
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        if len(text) > LOG_MAX_CHARS:
            cut = text[-LOG_MAX_CHARS:]
            nl = cut.find("\n")
            text = cut[nl + 1:] if 0 <= nl < 200 else cut
        return redact.scrub(text)

    # ---- describe
    def describe(self, target: Target) -> str:
        try:
            cfg = self._restart_cfg(self.group(target.group))
        except (KeyError, PlatformError):
            return f"(group {target.group!r} does not restart through docker)"
        host = ""
        if self.base_url and self.base_url.rstrip("/") not in (DEFAULT_SOCKET, "unix://var/run/docker.sock"):
            host = f"-H {shlex.quote(self.engine)} "
        t = max(0, math.ceil(cfg.stop_timeout))
        if target.id.startswith("<"):
            node = split_hostname(target.hostname or "")[1]
            what = f"<the container with labels {self._labels(cfg)} and hostname {node}: docker {host}ps -a " \
                   f"--filter label={' --filter label='.join(f'{k}={v}' for k, v in cfg.selector.items())}>"
            return redact.scrub(f"docker {host}restart -t {t} {what}")
        return redact.scrub(f"docker {host}restart -t {t} {shlex.quote(target.id)}")

    # ---- deaths wake the loop (supervisor/wake.py)
    EVENT_FILTERS = {"type": ["container"], "event": ["die", "died", "oom"]}  # podman matches "died" only

    def watch(self, wake) -> None:
        """Follow the engine's events stream (die / oom of containers) in a thread of its own, with a
        client of its own (no read timeout: it waits for events), reconnecting with a capped backoff;
        a container of one of our groups dying calls ``wake`` at once."""
        if self._events_thread is not None:
            return
        self._events_thread = threading.Thread(target=self._follow_events, args=(wake,), name="docker:events",
                                               daemon=True)
        self._events_thread.start()

    def _ours(self, name: str, labels: dict) -> bool:
        for g in self.config.groups:
            r = g.restart
            if not isinstance(r, DockerRestart):
                continue
            if r.selector and all(labels.get(k) == v for k, v in r.selector.items()):
                return True
            if r.target and template_regex(r.target).fullmatch(name):
                return True
        return False

    def _follow_events(self, wake) -> None:
        backoff = 0.5
        while not self._events_stop.is_set():
            client = None
            try:
                env = dict(os.environ)
                if self.base_url:
                    env["DOCKER_HOST"] = self.base_url
                client = docker.DockerClient(timeout=None, version=None, **docker.utils.kwargs_from_env(environment=env))
                stream = client.api.events(decode=True, filters=self.EVENT_FILTERS)
                self._events_stream = stream
                if self._events_stop.is_set():
                    break
                backoff = 0.5
                for ev in stream:
                    if not isinstance(ev, dict):
                        continue
                    actor = ev.get("Actor") or {}
                    attrs = actor.get("Attributes") or {}
                    name = str(attrs.get("name") or "")
                    if self._ours(name, attrs):
                        wake(f"docker: container {redact.scrub(name)} {ev.get('Action') or ev.get('status') or 'died'}")
            except Exception as e:  # the engine went away, a proxy closed the stream: follow again
                if not self._events_stop.is_set():
                    log.debug("docker events stream: %s; reconnecting", self._reason(e))
            finally:
                self._events_stream = None
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
            if self._events_stop.wait(backoff):
                break
            backoff = min(backoff * 2, 10.0)

    def close(self) -> None:
        self._events_stop.set()
        stream = self._events_stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass
        t = self._events_thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)
        self._drop_client()
