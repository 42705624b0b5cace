"""A local Cloud Foundry for the tests: the Cloud Controller v3 API, the UAA token endpoint and
log-cache's read endpoint, served over real HTTP on 127.0.0.1 (one ThreadingHTTPServer).

Modelled on the CF v3 API documentation (v3-apidocs.cloudfoundry.org): resources, pagination,
and error bodies ``{"errors": [{"code": 10010, "title": "CF-ResourceNotFound", "detail": ...}]}``;
UAA's ``/oauth/token`` (password, client_credentials and refresh_token grants; client-credential
tokens carry no refresh token; errors ``{"error": ..., "error_description": ...}``); log-cache's
``GET /api/v1/read/:source_id`` (what `cf logs --recent` reads since loggregator v107 removed the
traffic controller's recentlogs endpoint).

An instance is either a plain state the test sets (``RUNNING``, ``CRASHED``, ``DOWN``,
``STARTING``) or backed by a real process that a ``launch(app, index)`` callable starts: it reads
RUNNING while the process lives, CRASHED once it has died (no automatic restart: like an instance
in Diego's crash backoff), STARTING for ``starting_for`` seconds after a (re)start. The process's
output becomes the instance's log envelopes. Terminating an instance
(``DELETE /v3/processes/:guid/instances/:index``), restarting the app or a rolling deployment
stops the process (SIGKILL to its process group) and launches a new one, as Diego would.

    with CfApi(users={"admin": "pw"}) as cf:
        app = cf.add_app("myapp", instances=3, launch=start_worker)
        ... cf.requests, cf.wait_request("DELETE", "/v3/processes/.../instances/2")
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ROLE_DEVELOPER = "SpaceDeveloper"
ROLE_AUDITOR = "SpaceAuditor"  # read-only: may list apps, read stats and logs; may not restart

# the Cloud Controller's own error codes and titles (errors.yml of cloud_controller_ng)
ERRORS = {
    "InvalidAuthToken": (401, 1000, "Invalid Auth Token"),
    "NotAuthenticated": (401, 10002, "Authentication error"),
    "NotAuthorized": (403, 10003, "You are not authorized to perform the requested action"),
    "ResourceNotFound": (404, 10010, "Resource not found"),
    "UnprocessableEntity": (422, 10008, "The request is semantically invalid"),
    "ServiceUnavailable": (503, 10015, "The service is unavailable"),
}


def cf_error(name: str, detail: str | None = None) -> tuple[int, dict]:
    status, code, default = ERRORS[name]
    return status, {"errors": [{"code": code, "title": f"CF-{name}", "detail": detail or default}]}


@dataclass
class Request:
    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival
    status: int = 0
    who: str | None = None  # the user or client the token belongs to

    @property
    def raw(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Envelope:
    timestamp: int  # ns
    instance_id: str
    source_type: str  # APP/PROC/WEB, CELL, API, RTR, ...
    text: str
    stream: str = "OUT"


@dataclass
class Instance:
    index: int
    state: str = "RUNNING"  # for instances without a process
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    crash_logged: bool = False
    restarts: int = 0  # times the platform (re)started it after its first start


@dataclass
class Process:
    guid: str
    type: str
    instances: list[Instance]


@dataclass
class App:
    guid: str
    name: str
    space_guid: str
    processes: dict[str, Process]
    launch: Callable[[App, int], subprocess.Popen] | None = None
    state: str = "STARTED"

    def process(self, type_: str = "web") -> Process:
        return self.processes[type_]


@dataclass
class Deployment:
    guid: str
    app_guid: str
    strategy: str
    value: str = "ACTIVE"  # ACTIVE -> FINALIZED
    reason: str = "DEPLOYING"  # DEPLOYING -> DEPLOYED / CANCELED / SUPERSEDED
    created: float = field(default_factory=time.time)


class CfApi:
    def __init__(self, users: dict[str, str] | None = None, clients: dict[str, str] | None = None,
                 roles: dict[str, str] | None = None, starting_for: float = 0.5, deploy_for: float = 1.0,
                 space_guid: str | None = None):
        """``users``: user -> password; ``clients``: client id -> secret (the `cf` client with an empty
        secret is always there, as on a real UAA); ``roles``: user or client -> ROLE_* (default
        SpaceDeveloper)."""
        self.users = dict(users or {})
        self.clients = {"cf": "", **(clients or {})}
        self.roles = dict(roles or {})
        self.starting_for = starting_for
        self.deploy_for = deploy_for
        self.space_guid = space_guid or str(uuid.uuid4())
        self.apps: dict[str, App] = {}  # guid -> app
        self.deployments: list[Deployment] = []
        self.logs: dict[str, list[Envelope]] = {}  # app guid -> envelopes
        self.requests: list[Request] = []
        self.tokens: dict[str, tuple[str, float]] = {}  # access token -> (who, expires at)
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self.issued: list[str] = []  # every token handed out (tests check none leaks)
        self._fail: list[tuple[str, str, int, dict]] = []  # (method, path regex, status, body)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closing = False
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                ctype = self.headers.get("Content-Type", "")
                if "x-www-form-urlencoded" in ctype:
                    body: Any = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
                else:
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        body = raw.decode("utf-8", "replace")
                req = Request(self.command, unquote(parts.path), parse_qs(parts.query), dict(self.headers.items()),
                              body, time.monotonic())
                try:
                    status, payload, headers = api._route(req)
                except Exception as e:  # a bug in this server: say so as CF would (500 with an error body)
                    status, payload, headers = 500, {"errors": [{"code": 10001, "title": "CF-ServerError",
                                                                 "detail": f"{type(e).__name__}: {e}"}]}, {}
                data = b"" if payload is None else json.dumps(payload).encode()
                with api._cond:  # recorded before the answer leaves: what a client saw is in the log
                    req.status = status
                    api.requests.append(req)
                    api._cond.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                    self.send_header("X-Vcap-Request-Id", str(uuid.uuid4()))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> CfApi:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"cfapi-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and kill every process this platform launched."""
        self._closing = True
        self.server.shutdown()
        self.server.server_close()
        if self._thread:
            self._thread.join(5)
        for app in list(self.apps.values()):
            for p in app.processes.values():
                for inst in p.instances:
                    _kill(inst.proc)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> CfApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the platform's contents
    def add_app(self, name: str, instances: int = 1, process_type: str = "web",
                launch: Callable[[App, int], subprocess.Popen] | None = None,
                space_guid: str | None = None, extra_types: tuple[str, ...] = ()) -> App:
        """An app with one process type (its guid is the app's, as CF does for web) and N instances;
        with ``launch``, every instance is started now as a real process."""
        guid = str(uuid.uuid4())
        procs = {process_type: Process(guid if process_type == "web" else str(uuid.uuid4()), process_type,
                                       [Instance(i) for i in range(instances)])}
        for t in extra_types:
            procs[t] = Process(str(uuid.uuid4()), t, [])  # scaled to 0, as `web` of a worker app often is
        app = App(guid, name, space_guid or self.space_guid, procs, launch)
        with self._cond:
            self.apps[guid] = app
            self.logs[guid] = []
        if launch is not None:
            for inst in procs[process_type].instances:
                self._launch(app, procs[process_type], inst, first=True)
        return app

    def app(self, name: str) -> App:
        return next(a for a in self.apps.values() if a.name == name)

    def set_state(self, app: App, index: int, state: str, process_type: str | None = None) -> None:
        p = app.process(process_type) if process_type else next(iter(app.processes.values()))
        with self._cond:
            p.instances[index].state = state

    def state_of(self, app: App, index: int, process_type: str | None = None) -> str:
        p = app.process(process_type) if process_type else next(iter(app.processes.values()))
        with self._cond:
            return self._state(app, p, p.instances[index])

    def add_log(self, app: App, index: int | str, text: str, source_type: str = "APP/PROC/WEB",
                stream: str = "OUT") -> None:
        with self._cond:
            self.logs[app.guid].append(Envelope(time.time_ns(), str(index), source_type, text, stream))

    def expire_tokens(self) -> None:
        """Every access token handed out so far is now expired (a 401 CF-InvalidAuthToken next)."""
        with self._cond:
            self.tokens = {t: (who, 0.0) for t, (who, _) in self.tokens.items()}

    def revoke_refresh_tokens(self) -> None:
        with self._cond:
            self.refresh_tokens.clear()

    def fail_next(self, method: str, path_regex: str, status: int, body: dict | None = None, n: int = 1) -> None:
        """Answer the next n requests matching with this status and CF error body."""
        if body is None:
            name = next(k for k, v in ERRORS.items() if v[0] == status)
            body = cf_error(name)[1]
        with self._cond:
            self._fail.extend([(method, path_regex, status, body)] * n)

    # ------------------------------------------------------------ reading the request log
    def received(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Requests answered so far; ``path`` is a regex matched against the whole path."""
        with self._cond:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path is None or re.fullmatch(path, r.path))]

    def wait_request(self, method: str, path: str, timeout: float = 30.0, count: int = 1) -> Request:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"CF API: {len(hits)} of {count} {method} {path} after {timeout}s; got "
                                         f"{[(r.method, r.path, r.status) for r in self.requests][-30:]}")
                self._cond.wait(min(left, 0.2))

    def wait_state(self, app: App, index: int, state: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state_of(app, index) != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"instance {app.name}/{index} is {self.state_of(app, index)}, not {state}")
            time.sleep(0.05)

    # ------------------------------------------------------------ instances and processes
    def _state(self, app: App, p: Process, inst: Instance) -> str:
        if app.launch is None:
            return inst.state
        if inst.proc is None:
            return "DOWN" if inst.state != "STARTING" else "STARTING"
        rc = inst.proc.poll()
        if rc is not None:
            if not inst.crash_logged:
                inst.crash_logged = True
                self._crash_logs(app, p, inst, rc)
            return "CRASHED"
        if time.time() - inst.started < self.starting_for:
            return "STARTING"
        return "RUNNING"

    def _crash_logs(self, app: App, p: Process, inst: Instance, rc: int) -> None:
        status = 128 - rc if rc < 0 else rc
        now = time.time_ns()
        src = f"APP/PROC/{p.type.upper()}"
        log = self.logs[app.guid]
        log.append(Envelope(now, str(inst.index), src, f"Exit status {status}"))
        log.append(Envelope(now + 1, str(inst.index), "CELL",
                            f"Cell cell-1 stopping instance {uuid.uuid5(uuid.NAMESPACE_OID, app.guid + str(inst.index))}"))
        log.append(Envelope(now + 2, "0", "API", f'Process has crashed with type: "{p.type}"'))
        log.append(Envelope(now + 3, "0", "API",
                            f'App instance exited with guid {app.guid} payload: {{"instance"=>"", "index"=>{inst.index}, '
                            f'"cell_id"=>"cell-1", "reason"=>"CRASHED", "exit_description"=>"{src}: Exited with '
                            f'status {status}", "crash_count"=>1}}'))

    def _launch(self, app: App, p: Process, inst: Instance, first: bool = False) -> None:
        """Start the instance's process (killing the old one first); its output becomes log envelopes."""
        with self._cond:
            old, inst.proc = inst.proc, None
            inst.state = "STARTING"
        _kill(old)
        if not first:
            self.add_log(app, inst.index, "Cell cell-1 creating container for instance", "CELL")
        proc = app.launch(app, inst.index)
        with self._cond:
            inst.proc = proc
            inst.started = time.time()
            inst.crash_logged = False
            inst.state = "RUNNING"
            if not first:
                inst.restarts += 1
        if proc.stdout is not None:
            src = f"APP/PROC/{p.type.upper()}"
            t = threading.Thread(target=self._pump, args=(app, inst.index, src, proc), daemon=True,
                                 name=f"cfapi-log-{app.name}-{inst.index}")
            t.start()
            self._threads.append(t)

    def _pump(self, app: App, index: int, src: str, proc: subprocess.Popen) -> None:
        for line in iter(proc.stdout.readline, b""):
            self.add_log(app, index, line.decode("utf-8", "replace").rstrip("\n"), src)
        proc.stdout.close()

    def _restart_instance(self, app: App, p: Process, inst: Instance) -> None:
        if app.launch is not None:
            self.add_log(app, inst.index, f"Cell cell-1 stopping instance {inst.index}", "CELL")
            self._background(self._launch, app, p, inst)
        else:
            with self._cond:
                inst.state = "STARTING"
                inst.restarts += 1
            self._background(self._finish_start, inst)

    def _finish_start(self, inst: Instance) -> None:
        time.sleep(self.starting_for)
        with self._cond:
            if inst.state == "STARTING":
                inst.state = "RUNNING"

    def _background(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _deploy(self, d: Deployment, app: App) -> None:
        """Replace the instances one by one (rolling), then finalize."""
        for p in app.processes.values():
            for inst in p.instances:
                if d.value != "ACTIVE":
                    return
                self._restart_instance(app, p, inst)
                time.sleep(self.deploy_for / max(1, len(p.instances)))
        with self._cond:
            if d.value == "ACTIVE":
                d.value, d.reason = "FINALIZED", "DEPLOYED"

    # ------------------------------------------------------------ HTTP
    def _who(self, req: Request) -> tuple[str | None, tuple[int, dict] | None]:
        auth = req.headers.get("Authorization") or req.headers.get("authorization") or ""
        if not auth.lower().startswith("bearer "):
            return None, cf_error("NotAuthenticated")
        token = auth[7:].strip()
        with self._cond:
            entry = self.tokens.get(token)
        if entry is None or entry[1] < time.time():
            return None, cf_error("InvalidAuthToken")
        return entry[0], None

    def _route(self, req: Request) -> tuple[int, Any, dict]:
        path, m = req.path.rstrip("/") or "/", req.method
        with self._cond:
            for i, (fm, fp, status, body) in enumerate(self._fail):
                if fm == m and re.fullmatch(fp, path):
                    del self._fail[i]
                    return status, body, {}
        if path == "/" and m == "GET":
            return 200, self._root(), {}
        if path == "/oauth/token" and m == "POST":
            return self._token(req)
        who, err = self._who(req)
        req.who = who
        if err is not None:
            return (*err, {})
        if path.startswith("/api/v1/read/") and m == "GET":
            return self._read_logs(path.rsplit("/", 1)[1], req)
        writer = self.roles.get(who, ROLE_DEVELOPER) == ROLE_DEVELOPER
        with self._cond:
            return self._v3(req, path, m, writer)

    def _root(self) -> dict:
        u = self.url
        ws = u.replace("http://", "ws://")
        return {"links": {
            "self": {"href": u},
            "bits_service": None,
            "cloud_controller_v2": None,  # v2 is switched off on new foundations
            "cloud_controller_v3": {"href": f"{u}/v3", "meta": {"version": "3.180.0"}},
            "network_policy_v0": {"href": f"{u}/networking/v0/external"},
            "network_policy_v1": {"href": f"{u}/networking/v1/external"},
            "login": {"href": u},
            "uaa": {"href": u},
            "credhub": None,
            "routing": {"href": f"{u}/routing"},
            "logging": {"href": f"{ws}/doppler"},
            "log_cache": {"href": u},
            "log_stream": {"href": f"{u}/log-stream"},
            "app_ssh": {"href": "127.0.0.1:2222", "meta": {"host_key_fingerprint": "x", "oauth_client": "ssh-proxy"}},
        }}

    def _token(self, req: Request) -> tuple[int, Any, dict]:
        form = req.body if isinstance(req.body, dict) else {}
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                client_id = None
        if client_id not in self.clients or self.clients[client_id] != (client_secret or ""):
            return 401, {"error": "unauthorized", "error_description": "Bad credentials"}, {}
        grant = form.get("grant_type")
        refresh = None
        if grant == "password":
            user = form.get("username")
            if user not in self.users or self.users[user] != form.get("password"):
                return 401, {"error": "unauthorized", "error_description": "Bad credentials"}, {}
            who = user
            refresh = "rt-" + secrets.token_hex(12)
        elif grant == "client_credentials":
            if client_id == "cf":
                return 401, {"error": "invalid_client", "error_description": "Unauthorized grant type: client_credentials"}, {}
            who = client_id
        elif grant == "refresh_token":
            with self._cond:
                who = self.refresh_tokens.get(form.get("refresh_token", ""))
            if who is None:
                return 401, {"error": "invalid_token", "error_description": "Invalid refresh token (expired)"}, {}
            refresh = form["refresh_token"]
        else:
            return 400, {"error": "unsupported_grant_type", "error_description": f"Unsupported grant type: {grant}"}, {}
        token = "at-" + secrets.token_hex(16)
        with self._cond:
            self.tokens[token] = (who, time.time() + 599)
            self.issued.append(token)
            if refresh:
                self.refresh_tokens[refresh] = who
                self.issued.append(refresh)
        body = {"access_token": token, "token_type": "bearer", "expires_in": 599,
                "scope": "cloud_controller.read cloud_controller.write", "jti": secrets.token_hex(8)}
        if refresh:
            body["refresh_token"] = refresh
        return 200, body, {}

    def _read_logs(self, source_id: str, req: Request) -> tuple[int, Any, dict]:
        q = {k: v[0] for k, v in req.query.items()}
        with self._cond:
            envs = list(self.logs.get(source_id, []))
        if q.get("envelope_types", "LOG") not in ("LOG", "ANY"):
            envs = []
        envs.sort(key=lambda e: e.timestamp, reverse=q.get("descending") == "true")
        envs = envs[: min(int(q.get("limit", 100)), 1000)]
        batch = [{"timestamp": str(e.timestamp), "source_id": source_id, "instance_id": e.instance_id,
                  "tags": {"source_type": e.source_type},
                  "log": {"payload": base64.b64encode(e.text.encode()).decode(), "type": e.stream}}
                 for e in envs]
        return 200, {"envelopes": {"batch": batch}}, {}

    # the v3 endpoints (called with the lock held)
    def _v3(self, req: Request, path: str, m: str, writer: bool) -> tuple[int, Any, dict]:
        u = self.url
        denied = (*cf_error("NotAuthorized"), {})
        if path == "/v3/apps" and m == "GET":
            names = set(",".join(req.query.get("names", [])).split(",")) - {""}
            spaces = set(",".join(req.query.get("space_guids", [])).split(",")) - {""}
            found = [a for a in self.apps.values() if (not names or a.name in names)
                     and (not spaces or a.space_guid in spaces)]
            return 200, _page(f"{u}/v3/apps", [self._app_json(a) for a in found]), {}
        mt = re.fullmatch(r"/v3/apps/([^/]+)(/processes|/actions/restart)?", path)
        if mt:
            app = self.apps.get(mt.group(1))
            if app is None:
                return (*cf_error("ResourceNotFound", "App not found"), {})
            if mt.group(2) is None and m == "GET":
                return 200, self._app_json(app), {}
            if mt.group(2) == "/processes" and m == "GET":
                return 200, _page(f"{u}/v3/apps/{app.guid}/processes",
                                  [self._process_json(app, p) for p in app.processes.values()]), {}
            if mt.group(2) == "/actions/restart" and m == "POST":
                if not writer:
                    return denied
                for p in app.processes.values():
                    for inst in p.instances:
                        self._restart_instance(app, p, inst)
                self.logs[app.guid].append(Envelope(time.time_ns(), "0", "API", f"Restarted app with guid {app.guid}"))
                return 200, self._app_json(app), {}
        mt = re.fullmatch(r"/v3/processes/([^/]+)(/stats|/instances/(\d+))?", path)
        if mt:
            found = [(a, p) for a in self.apps.values() for p in a.processes.values() if p.guid == mt.group(1)]
            if not found:
                return (*cf_error("ResourceNotFound", "Process not found"), {})
            app, p = found[0]
            if mt.group(2) is None and m == "GET":
                return 200, self._process_json(app, p), {}
            if mt.group(2) == "/stats" and m == "GET":
                return 200, {"resources": [self._stats_json(app, p, i) for i in p.instances]}, {}
            if mt.group(3) is not None and m == "DELETE":
                if not writer:
                    return denied
                index = int(mt.group(3))
                if index >= len(p.instances):
                    return (*cf_error("ResourceNotFound", "Instance not found"), {})
                self._restart_instance(app, p, p.instances[index])
                return 204, None, {}
        if path == "/v3/deployments" and m == "GET":
            apps = set(",".join(req.query.get("app_guids", [])).split(",")) - {""}
            values = set(",".join(req.query.get("status_values", [])).split(",")) - {""}
            found = [d for d in self.deployments if (not apps or d.app_guid in apps)
                     and (not values or d.value in values)]
            return 200, _page(f"{u}/v3/deployments", [self._deployment_json(d) for d in found]), {}
        if path == "/v3/deployments" and m == "POST":
            body = req.body if isinstance(req.body, dict) else {}
            try:
                app_guid = body["relationships"]["app"]["data"]["guid"]
            except (KeyError, TypeError):
                return (*cf_error("UnprocessableEntity", "App is required"), {})
            app = self.apps.get(app_guid)
            if app is None:
                return (*cf_error("UnprocessableEntity", "Unable to use app. Ensure that the app exists and "
                                  "you have access to it."), {})
            if not writer:
                return denied
            strategy = body.get("strategy", "rolling")
            if strategy not in ("rolling", "canary"):
                return (*cf_error("UnprocessableEntity", f"Strategy '{strategy}' is not a supported deployment "
                                  "strategy"), {})
            for old in self.deployments:  # a new deployment supersedes the one in flight, as CF does
                if old.app_guid == app_guid and old.value == "ACTIVE":
                    old.value, old.reason = "FINALIZED", "SUPERSEDED"
            d = Deployment(str(uuid.uuid4()), app_guid, strategy)
            self.deployments.append(d)
            self._background(self._deploy, d, app)
            return 201, self._deployment_json(d), {}
        return (*cf_error("ResourceNotFound", "Unknown request"), {})

    def _app_json(self, a: App) -> dict:
        u = self.url
        return {"guid": a.guid, "name": a.name, "state": a.state, "created_at": "2024-01-01T00:00:00Z",
                "updated_at": "2024-01-01T00:00:00Z", "lifecycle": {"type": "buildpack", "data": {}},
                "relationships": {"space": {"data": {"guid": a.space_guid}}},
                "metadata": {"labels": {}, "annotations": {}},
                "links": {"self": {"href": f"{u}/v3/apps/{a.guid}"},
                          "processes": {"href": f"{u}/v3/apps/{a.guid}/processes"},
                          "space": {"href": f"{u}/v3/spaces/{a.space_guid}"},
                          "restart": {"href": f"{u}/v3/apps/{a.guid}/actions/restart", "method": "POST"}}}

    def _process_json(self, a: App, p: Process) -> dict:
        u = self.url
        return {"guid": p.guid, "type": p.type, "command": "[PRIVATE DATA HIDDEN IN LISTS]",
                "instances": len(p.instances), "memory_in_mb": 256, "disk_in_mb": 1024,
                "health_check": {"type": "process", "data": {"timeout": None}},
                "relationships": {"app": {"data": {"guid": a.guid}}, "revision": None},
                "metadata": {"labels": {}, "annotations": {}},
                "links": {"self": {"href": f"{u}/v3/processes/{p.guid}"},
                          "scale": {"href": f"{u}/v3/processes/{p.guid}/actions/scale", "method": "POST"},
                          "app": {"href": f"{u}/v3/apps/{a.guid}"},
                          "stats": {"href": f"{u}/v3/processes/{p.guid}/stats"}}}

    def _stats_json(self, a: App, p: Process, inst: Instance) -> dict:
        state = self._state(a, p, inst)
        up = state in ("RUNNING", "STARTING")
        return {"type": p.type, "index": inst.index, "state": state,
                "routable": state == "RUNNING", "host": "10.0.0.1" if up else "",
                "uptime": int(time.time() - inst.started) if up else 0,
                "mem_quota": 268435456, "disk_quota": 1073741824, "fds_quota": 16384,
                "isolation_segment": None, "details": "insufficient resources" if state == "DOWN" else None,
                "instance_ports": [], "usage": {"time": "2024-01-01T00:00:00Z", "cpu": 0.01, "mem": 1000, "disk": 1000}}

    def _deployment_json(self, d: Deployment) -> dict:
        u = self.url
        return {"guid": d.guid, "state": "DEPLOYING" if d.value == "ACTIVE" else "DEPLOYED",
                "status": {"value": d.value, "reason": d.reason, "details": {}},
                "strategy": d.strategy, "relationships": {"app": {"data": {"guid": d.app_guid}}},
                "links": {"self": {"href": f"{u}/v3/deployments/{d.guid}"},
                          "app": {"href": f"{u}/v3/apps/{d.app_guid}"}}}


def _page(base: str, resources: list[dict]) -> dict:
    return {"pagination": {"total_results": len(resources), "total_pages": 1,
                           "first": {"href": f"{base}?page=1&per_page=50"},
                           "last": {"href": f"{base}?page=1&per_page=50"}, "next": None, "previous": None},
            "resources": resources}


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    for kill in (os.killpg, os.kill):
        try:
            kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
