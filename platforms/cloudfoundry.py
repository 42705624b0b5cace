"""The ``cloudfoundry`` platform: Celery workers run as instances of Cloud Foundry apps.

Talks to the Cloud Controller v3 API through the ``cloudfoundry-client`` library, logged in with
a user and password (UAA password grant) or a client id and secret (client credentials grant).

Which instance serves a Celery hostname: ``restart.instance`` is a pattern over the full hostname,
``*`` any text, ``{index}`` the CF instance index, ``{app}`` the app name. With the default
``*@{app}-{index}``, workers started with ``-n celery@my-worker-$CF_INSTANCE_INDEX`` map to
instance N of the app ``my-worker``; when ``restart.app`` is set (fixed or a template over
{hostname} {worker} {node}), ``{app}`` must read that name. Targets are ``app/index``.

Restart modes: ``instance`` (default) terminates the one instance (``cf restart-app-instance``:
``DELETE /v3/processes/:guid/instances/:index``; Diego starts a new one), ``app`` restarts the
whole app (``POST /v3/apps/:guid/actions/restart``, with downtime), ``rolling`` creates a rolling
deployment (``POST /v3/deployments``). A restart already under way (the instance STARTING, an
ACTIVE deployment, our own app restart within ``grace``) is reported as in progress.

Tokens: the library refreshes a user's token with its refresh token on a 401 CF-InvalidAuthToken;
client-credential tokens have none, and a refresh token may itself expire: on any remaining 401
the adapter logs in again once and retries the call. Every HTTP call has ``timeout``.

Recent logs come from log-cache (``GET /api/v1/read/:app_guid``, the root link ``log_cache``), as
`cf logs --recent` reads them: the library's doppler ``recent_logs`` uses the traffic controller's
recentlogs endpoint, removed in loggregator v107 (2022).
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from cloudfoundry_client.client import CloudFoundryClient, Info
from cloudfoundry_client.errors import InvalidStatusCode
from oauth2_client.credentials_manager import CredentialManager, OAuthError

from platforms import Platform, PlatformError, render
from supervisor import redact
from supervisor.config import CloudFoundryRestart
from supervisor.hostnames import resource_name_problem
from supervisor.hostnames import shown as shown_hostname
from supervisor.model import RestartResult, Target

if TYPE_CHECKING:
    from supervisor.config import Config, GroupConfig

log = logging.getLogger("supervisor.platforms.cloudfoundry")
T = TypeVar("T")

# CF process instance state -> (our state, detail)
STATES = {
    "RUNNING": "running",
    "CRASHED": "crashed",
    "DOWN": "exited",  # not running (crash backoff, lost cell, no room): dead for the core
    "STARTING": "restarting",
    "STOPPING": "stopping",
}
LOG_SOURCES = ("APP", "CELL", "API")  # log-cache sources worth showing (RTR access logs are noise)


class _Client(CloudFoundryClient):
    """The library's client with a timeout on every request (it sets none) and the root links kept."""

    def __init__(self, target_endpoint: str, *, timeout: float, **kwargs: Any):
        self._timeout = timeout
        self.root_links: dict = {}
        super().__init__(target_endpoint, **kwargs)

    def _get_info(self, target_endpoint: str, proxy: dict | None = None, verify: bool = True) -> Info:
        # as CloudFoundryClient._get_info, with a timeout
        response = requests.get(f"{target_endpoint}/", proxies=proxy if proxy is not None else {"http": "", "https": ""},
                                verify=verify, timeout=self._timeout)
        links = self._check_response(response).json()["links"]
        self.root_links = links

        def href(name: str) -> str | None:
            link = links.get(name)
            return link.get("href") if link else None

        return Info(href("cloud_controller_v2"), href("cloud_controller_v3"), self._resolve_login_endpoint(links),
                    target_endpoint, href("logging"), href("log_stream"))

    def _token_request(self, request_parameters: dict, refresh_token_mandatory: bool) -> None:
        # as CredentialManager._token_request, with a timeout
        headers = self._token_request_headers(request_parameters["grant_type"])
        if self.service_information.public_api:
            request_parameters["client_id"] = self.service_information.client_id
        else:
            headers["Authorization"] = self.service_information.authorization_header
        response = requests.post(self.service_information.token_service, data=request_parameters, headers=headers,
                                 proxies=self.proxies, verify=self.service_information.verify, timeout=self._timeout)
        if response.status_code != 200:
            CredentialManager._handle_bad_response(response)
        self._process_token_response(response.json(), refresh_token_mandatory)

    def _bearer_request(self, method: Callable, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super()._bearer_request(method, url, **kwargs)


@dataclass(frozen=True)
class _Resolved:
    app_guid: str
    process_guid: str
    process_type: str


def cf_message(e: BaseException) -> str:
    """The API's own words: status, CF-Title (code): detail; OAuth errors; network failures."""
    if isinstance(e, InvalidStatusCode):
        status = f"{e.status_code.value} {e.status_code.phrase}"
        body = e.body
        if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
            parts = [f"{err.get('title', '?')} ({err.get('code', '?')}): {err.get('detail', '')}"
                     for err in body["errors"] if isinstance(err, dict)]
            return f"{status}: {'; '.join(parts)}"
        if isinstance(body, dict) and "error" in body:
            return f"{status}: {body.get('error')}: {body.get('error_description', '')}"
        text = str(body).strip()
        return f"{status}: {text[:300]}" if text else status
    if isinstance(e, OAuthError):
        return f"{e.status_code.value} {e.error}: {e.error_description or ''}".rstrip(": ")
    if isinstance(e, requests.Timeout):
        return f"timed out ({e.__class__.__name__})"
    if isinstance(e, requests.ConnectionError):
        reason = str(e.args[0]) if e.args else str(e)
        m = re.search(r"\[Errno [-\d]+\] ([^')\]]+)", reason) or re.search(r"Caused by \w+\(['\"]?([^'\")]+)", reason)
        return f"unreachable ({m.group(1) if m else 'connection failed'})"
    return f"{type(e).__name__}: {e}"


def _status(e: BaseException) -> int | None:
    if isinstance(e, InvalidStatusCode):
        return e.status_code.value
    if isinstance(e, OAuthError):
        return e.status_code.value
    return None


class _Pattern:
    """restart.instance compiled for one app name (or with {app} captured)."""

    def __init__(self, pattern: str, app: str | None):
        out, self.renderable = [], "*" not in pattern
        for literal, name, _, _ in _formatter_parse(pattern):
            out.append(".*?".join(re.escape(x) for x in literal.split("*")))
            if name == "index":
                out.append(r"(?P<index>\d+)")
            elif name == "app":
                out.append(re.escape(app) if app is not None else r"(?P<app>[^@]+?)")
        self.regex = re.compile("".join(out))
        self.pattern = pattern
        self.app = app

    def match(self, hostname: str) -> tuple[str, int] | None:
        m = self.regex.fullmatch(hostname)
        if m is None:
            return None
        app = self.app if self.app is not None else m.group("app")
        return app, int(m.group("index"))

    def render(self, app: str, index: int) -> str | None:
        if not self.renderable:
            return None
        return self.pattern.replace("{{", "\0").replace("}}", "\1").replace("{app}", app).replace(
            "{index}", str(index)).replace("\0", "{").replace("\1", "}")


def _formatter_parse(pattern: str):
    import string

    return string.Formatter().parse(pattern)


class Adapter(Platform):
    kind = "cloudfoundry"

    def __init__(self, config: Config):
        super().__init__(config)
        cf = config.platforms.cloudfoundry
        if cf is None:
            raise PlatformError("platform cloudfoundry needs platforms.cloudfoundry (api_url and credentials)")
        self.cf = cf
        self.api_url = cf.api_url.rstrip("/")
        self.password = cf.password.get_secret_value() if cf.password else None
        self.client_secret = cf.client_secret.get_secret_value() if cf.client_secret else None
        for s in (self.password, self.client_secret):
            redact.register_secret(s)
        if cf.username and self.password is not None:
            self.grant = "password"
            self.who = f"user {cf.username!r}"
        elif cf.username or self.password is not None:
            raise PlatformError("platforms.cloudfoundry: username and password go together")
        elif cf.client_id and self.client_secret is not None:
            self.grant = "client_credentials"
            self.who = f"client {cf.client_id!r}"
        else:
            raise PlatformError("platforms.cloudfoundry needs username + password, or client_id + client_secret")
        # the library logs whole token responses (access and refresh tokens) at DEBUG
        for name in ("cloudfoundry_client", "oauth2_client"):
            lg = logging.getLogger(name)
            if lg.getEffectiveLevel() < logging.INFO:
                lg.setLevel(logging.INFO)
        self._lock = threading.RLock()
        self._client: _Client | None = None
        self._resolved: dict[str, _Resolved] = {}  # app name -> guids
        self._dead_since: dict[str, float] = {}  # "app/index" -> when we first saw it dead
        self._seen_alive: set[str] = set()  # "app/index" seen RUNNING/STARTING by this adapter
        self._app_restarts: dict[str, float] = {}  # app name -> when we restarted it (app/rolling modes)

    # ---------------------------------------------------------------- config and mapping (no I/O)
    def _restart_cfg(self, group: GroupConfig) -> CloudFoundryRestart:
        r = group.restart
        if not isinstance(r, CloudFoundryRestart):
            raise PlatformError(f"group {group.name!r} does not restart through Cloud Foundry")
        return r

    def _fixed_app(self, cfg: CloudFoundryRestart) -> str | None:
        if cfg.app is not None and not any(f"{{{p}}}" in cfg.app for p in ("hostname", "worker", "node")):
            return render(cfg.app, "x@y")
        return None

    def locate(self, group: GroupConfig, hostname: str) -> tuple[str, int]:
        """(app name, instance index) serving a Celery hostname, by restart.app and restart.instance."""
        cfg = self._restart_cfg(group)
        app = None
        if cfg.app is not None:
            try:
                app = render(cfg.app, hostname)
            except (KeyError, IndexError, ValueError) as e:
                raise PlatformError(f"cannot render restart.app for {hostname}: {e}") from None
        found = _Pattern(cfg.instance, app).match(hostname)
        if found is None:
            raise PlatformError(
                f"{hostname} does not match restart.instance {cfg.instance!r}"
                + (f" with app {app!r}" if app is not None else "")
                + ": start each worker with a hostname that does, {index} being $CF_INSTANCE_INDEX "
                "(e.g. -n celery@my-worker-$CF_INSTANCE_INDEX for \"*@{app}-{index}\")")
        if self._fixed_app(cfg) is None:  # the app name comes from the hostname: it is data, check it
            problem = resource_name_problem("cloudfoundry app", found[0])
            if problem:
                raise PlatformError(f"refused {shown_hostname(hostname)}: {problem}")
        return found

    @staticmethod
    def _parse_id(target: Target) -> tuple[str, int]:
        app, _, index = target.id.rpartition("/")
        if not app or not index.isdigit():
            raise PlatformError(f"{target.id!r} is not a Cloud Foundry target (app/index)")
        return app, int(index)

    def target_for(self, group: GroupConfig, hostname: str) -> Target:
        app, index = self.locate(group, hostname)
        return Target(id=f"{app}/{index}", group=group.name, hostname=hostname)

    def describe(self, target: Target) -> str:
        try:
            app, index = self._parse_id(target)
            cfg = self._restart_cfg(self.group(target.group))
        except (KeyError, PlatformError) as e:
            return redact.scrub(f"(no Cloud Foundry command: {e})")
        q = shlex.quote(app)
        if cfg.mode == "app":
            return f"cf restart {q}"
        if cfg.mode == "rolling":
            return f"cf restart {q} --strategy rolling"
        ptype = cfg.process or (self._resolved[app].process_type if app in self._resolved else "web")
        extra = f" --process {shlex.quote(ptype)}" if ptype != "web" else ""
        return f"cf restart-app-instance {q} {index}{extra}"

    # ---------------------------------------------------------------- the API
    def _login(self) -> _Client:
        cf = self.cf
        try:
            if self.grant == "password":
                client = _Client(self.api_url, timeout=cf.timeout, verify=cf.verify_ssl,
                                 client_id=cf.client_id or "cf", client_secret=self.client_secret or "")
                client.init_with_user_credentials(cf.username, self.password)
            else:
                client = _Client(self.api_url, timeout=cf.timeout, verify=cf.verify_ssl,
                                 client_id=cf.client_id, client_secret=self.client_secret)
                client.init_with_client_credentials()
        except (InvalidStatusCode, OAuthError, requests.RequestException, ValueError, KeyError) as e:
            raise PlatformError(redact.scrub(
                f"Cloud Foundry login to {redact.redact_url(self.api_url)} as {self.who} failed: {cf_message(e)}"
            )) from None
        log.debug("logged in to %s as %s", redact.redact_url(self.api_url), self.who)
        return client

    def _call(self, what: str, fn: Callable[[_Client], T]) -> T:
        """fn(client), logged in; on a 401 that the library's refresh did not cure, log in again once
        and retry. Every failure becomes a PlatformError with the API's own words, scrubbed."""
        with self._lock:
            relogged = False
            while True:
                if self._client is None:
                    self._client = self._login()
                    relogged = True
                client = self._client
                try:
                    return fn(client)
                except (InvalidStatusCode, OAuthError) as e:
                    if _status(e) == 401 and not relogged:
                        log.info("Cloud Foundry answered 401 (%s): logging in again", cf_message(e))
                        self._client = None
                        continue
                    raise PlatformError(redact.scrub(f"Cloud Foundry {what}: {cf_message(e)}")) from None
                except requests.RequestException as e:
                    raise PlatformError(redact.scrub(
                        f"Cloud Foundry {what}: API {redact.redact_url(self.api_url)} {cf_message(e)}")) from None
                except (ValueError, KeyError, TypeError) as e:
                    raise PlatformError(redact.scrub(f"Cloud Foundry {what}: unexpected answer ({e})")) from None

    def _get(self, what: str, path: str, params: dict | None = None) -> Any:
        def call(c: _Client) -> Any:
            base = c.info.api_v3_url.removesuffix("/v3") if c.info.api_v3_url else self.api_url
            return c.get(base + path, params=params).json()
        return self._call(what, call)

    def _resolve(self, cfg: CloudFoundryRestart, app: str, fresh: bool = False) -> _Resolved:
        """The app's guid and the guid of the process type the workers run as (cached)."""
        if not fresh and app in self._resolved:
            return self._resolved[app]
        params = {"names": app}
        if cfg.space_guid:
            params["space_guids"] = cfg.space_guid
        apps = self._get(f"app {app!r}", "/v3/apps", params).get("resources") or []
        if not apps:
            where = f" in space {cfg.space_guid}" if cfg.space_guid else ""
            raise PlatformError(f"Cloud Foundry: no app named {app!r}{where} visible to {self.who} "
                                "(wrong name, another space, or no role in its space)")
        if len(apps) > 1:
            raise PlatformError(f"Cloud Foundry: {len(apps)} apps named {app!r} in different spaces: "
                                "set restart.space_guid")
        guid = apps[0]["guid"]
        procs = self._get(f"processes of {app!r}", f"/v3/apps/{guid}/processes").get("resources") or []
        by_type = {p["type"]: p for p in procs}
        if cfg.process is not None:
            chosen = by_type.get(cfg.process)
            if chosen is None:
                raise PlatformError(f"Cloud Foundry: app {app!r} has no process type {cfg.process!r} "
                                    f"(it has {', '.join(sorted(by_type)) or 'none'})")
        else:
            scaled = [p for p in procs if p.get("instances", 0) > 0]
            chosen = (scaled[0] if len(scaled) == 1 else by_type.get("worker") or by_type.get("web"))
            if chosen is None:
                raise PlatformError(f"Cloud Foundry: which process of {app!r} runs the workers? set restart.process "
                                    f"(one of {', '.join(sorted(by_type)) or 'none'})")
        r = _Resolved(guid, chosen["guid"], chosen["type"])
        self._resolved[app] = r
        return r

    def _stats(self, cfg: CloudFoundryRestart, app: str) -> tuple[_Resolved, dict[int, dict]]:
        """index -> the stats entry of each instance (re-resolving once if the app went away)."""
        for attempt in (0, 1):
            r = self._resolve(cfg, app, fresh=attempt == 1)
            try:
                data = self._get(f"stats of {app!r}", f"/v3/processes/{r.process_guid}/stats")
            except PlatformError as e:
                if attempt == 0 and "CF-ResourceNotFound" in str(e):
                    self._resolved.pop(app, None)
                    continue
                raise
            return r, {int(s["index"]): s for s in data.get("resources") or [] if "index" in s}
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- inventory
    def inventory(self, group: GroupConfig, known: Iterable[str] = (), *, seen=None) -> list[Target]:
        cfg = self._restart_cfg(group)
        fixed = self._fixed_app(cfg)
        located: dict[str, tuple[str, int]] = {}
        for h in dict.fromkeys([*group.workers, *known]):
            try:
                located[h] = self.locate(group, h)
            except PlatformError as e:
                log.debug("%s", e)  # a worker of this group named otherwise: judged by heartbeats alone
        apps = list(dict.fromkeys([*([fixed] if fixed else []), *(a for a, _ in located.values())]))
        now = time.time()
        out: list[Target] = []
        for app in apps:
            _, stats = self._stats(cfg, app)
            hosts: dict[int, list[str]] = {}
            for h, (a, i) in located.items():
                if a == app:
                    hosts.setdefault(i, []).append(h)
            pattern = _Pattern(cfg.instance, app)
            for index in sorted(set(stats) | set(hosts)):
                tid = f"{app}/{index}"
                names = hosts.get(index) or [pattern.render(app, index)]
                s = stats.get(index)
                if s is None:
                    target = Target(tid, group.name, None, "missing",
                                    f"app {app} has {len(stats)} instance(s): no instance {index}")
                else:
                    target = self._target(tid, group.name, s, now)
                out += [Target(target.id, target.group, h, target.state, target.detail, target.since) for h in names]
        return out

    def _target(self, tid: str, group: str, s: dict, now: float) -> Target:
        cf_state = str(s.get("state", "")).upper()
        state = STATES.get(cf_state, "unknown")
        detail = cf_state or "no state"
        if s.get("details"):
            detail += f" ({s['details']})"
        since = None
        if state in ("running", "restarting"):
            self._seen_alive.add(tid)
            self._dead_since.pop(tid, None)
            up = s.get("uptime")
            if state == "running" and isinstance(up, (int, float)):
                since = now - up
                detail += f", up {int(up)}s"
        elif state in ("crashed", "exited"):
            if tid in self._dead_since:
                since = self._dead_since[tid]
            elif tid in self._seen_alive:  # we saw it run, and now dead: the death is witnessed
                since = self._dead_since[tid] = now
            # else: dead when we first looked: not witnessed (since None), the core confirms by ping
        return Target(tid, group, None, state, detail, since)

    # ---------------------------------------------------------------- restart
    def restart(self, target: Target, reason: str) -> RestartResult:
        try:
            app, index = self._parse_id(target)
            cfg = self._restart_cfg(self.group(target.group))
            if cfg.mode == "instance":
                return self._restart_instance(cfg, app, index)
            return self._restart_app(cfg, app, reason)
        except KeyError:
            return RestartResult(False, f"unknown group {target.group!r}")
        except PlatformError as e:
            return RestartResult(False, redact.scrub(e))

    def _restart_instance(self, cfg: CloudFoundryRestart, app: str, index: int) -> RestartResult:
        r, stats = self._stats(cfg, app)
        s = stats.get(index)
        if s is None:
            return RestartResult(False, f"app {app} has {len(stats)} instance(s) of {r.process_type}: "
                                 f"no instance {index} to restart")
        state = str(s.get("state", "")).upper()
        if state == "STARTING":
            return RestartResult(True, f"instance {index} of {app} is already STARTING", in_progress=True)

        def delete(c: _Client) -> None:
            base = c.info.api_v3_url.removesuffix("/v3")
            c.delete(f"{base}/v3/processes/{r.process_guid}/instances/{index}")

        self._call(f"restart of instance {index} of {app!r}", delete)
        tid = f"{app}/{index}"
        self._seen_alive.add(tid)  # the next death of the new instance is witnessed
        self._dead_since.pop(tid, None)
        return RestartResult(True, f"terminated instance {index} of {app} ({r.process_type}, was {state or '?'}); "
                             "Cloud Foundry starts a new one")

    def _restart_app(self, cfg: CloudFoundryRestart, app: str, reason: str) -> RestartResult:
        r = self._resolve(cfg, app)
        at = self._app_restarts.get(app)
        if at is not None and time.time() - at < cfg.grace:
            return RestartResult(True, f"{app} was restarted {time.time() - at:.0f}s ago: in progress",
                                 in_progress=True)
        active = self._get(f"deployments of {app!r}", "/v3/deployments",
                           {"app_guids": r.app_guid, "status_values": "ACTIVE"}).get("resources") or []
        if active:
            d = active[0]
            why = (d.get("status") or {}).get("reason") or d.get("state") or "ACTIVE"
            return RestartResult(True, f"a deployment of {app} is in progress ({why}, {d.get('guid')})",
                                 in_progress=True)
        if cfg.mode == "app":
            def restart(c: _Client) -> None:
                c.v3.apps.restart(r.app_guid)
            self._call(f"restart of {app!r}", restart)
            msg = f"restarted app {app} (all instances, with downtime)"
        else:
            body = {"strategy": "rolling", "relationships": {"app": {"data": {"guid": r.app_guid}}},
                    "metadata": {"annotations": {"celery-supervisor/reason": reason[:250]}}}

            def deploy(c: _Client) -> dict:
                base = c.info.api_v3_url.removesuffix("/v3")
                return c.post(f"{base}/v3/deployments", json=body).json()
            d = self._call(f"rolling deployment of {app!r}", deploy)
            msg = f"started a rolling deployment of {app} ({d.get('guid', '?')})"
        self._app_restarts[app] = time.time()
        return RestartResult(True, msg)

    # ---------------------------------------------------------------- logs
    def logs(self, target: Target, lines: int = 50) -> str:
        if lines <= 0:
            return ""
        try:
            app, index = self._parse_id(target)
            cfg = self._restart_cfg(self.group(target.group))
            r = self._resolve(cfg, app)
            base = self._log_cache_url()
            if base is None:
                log.debug("no recent logs for %s: the API announces no log_cache", target.id)
                return ""
            params = {"envelope_types": "LOG", "descending": "true", "limit": str(min(1000, max(100, lines * 5)))}
            data = self._call(f"recent logs of {app!r}",
                              lambda c: c.get(f"{base}/api/v1/read/{r.app_guid}", params=params).json())
        except (KeyError, PlatformError) as e:
            log.debug("no recent logs for %s: %s", target.id, redact.scrub(e))
            return ""
        out = []
        for env in (data.get("envelopes") or {}).get("batch") or []:
            line = _log_line(env, index)
            if line is not None:
                out.append(line)
        out.reverse()  # log-cache answered newest first
        return redact.scrub("\n".join(out[-lines:]))

    def _log_cache_url(self) -> str | None:
        def links(c: _Client) -> dict:
            return c.root_links
        link = self._call("root links", links).get("log_cache")
        href = link.get("href") if isinstance(link, dict) else None
        return href.rstrip("/") if href else None

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        session = getattr(client, "_session", None) if client is not None else None
        if session is not None:
            session.close()


def _log_line(env: dict, index: int) -> str | None:
    """One log-cache envelope as `cf logs` prints it; None when it is not about this instance."""
    entry = env.get("log")
    if not isinstance(entry, dict):
        return None
    source = str((env.get("tags") or {}).get("source_type", ""))
    instance = str(env.get("instance_id", ""))
    kind = source.split("/", 1)[0]
    if kind not in LOG_SOURCES:
        return None
    if kind in ("APP", "CELL") and instance != str(index):
        return None
    try:
        text = base64.b64decode(entry.get("payload") or "").decode("utf-8", "replace").rstrip("\n")
    except (ValueError, TypeError):
        return None
    try:
        when = _dt.datetime.fromtimestamp(int(env.get("timestamp", 0)) / 1e9, _dt.timezone.utc)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-4] + "+0000"
    except (ValueError, OverflowError, OSError):
        stamp = "?"
    return f"{stamp} [{source}/{instance}] {entry.get('type', 'OUT')} {text}"
