"""The daemon's HTTP endpoints (off unless ``http.listen`` is set): stdlib ThreadingHTTPServer in a
daemon thread.

- ``GET /metrics``: Prometheus text format (OpenMetrics when the scraper asks for it), from the
  daemon's own registry (supervisor.metrics).
- ``GET /healthz``: ``200 ok ...`` when the last cycle completed less than
  ``healthz_bound(loop.interval)`` = max(3 x loop.interval, 30 s) ago AND reached the broker;
  else ``503`` with a one-line reason (no cycle yet, last cycle too old, broker unreachable).
- ``GET /status``: the JSON status document (supervisor.status.status_document), passed through
  ``redact.scrub`` as a last guard against a secret.

- ``GET /``: the status page (supervisor/page/: one HTML, one JS, one CSS file, served from the
  package; no build step, nothing fetched from elsewhere). It polls ``/status``.

``http.listen``: ``127.0.0.1:9811``, ``[::1]:9811``, ``localhost:9811``, or ``:9811`` for every
interface (IPv6 and IPv4 where the host allows both). With ``http.token`` set, every path but
``/healthz`` needs ``Authorization: Bearer TOKEN`` or HTTP basic auth with TOKEN as the password (any
user name; a browser asks for it), compared in constant time; else 401. config.py refuses a
non-loopback listen without a token unless ``http.allow_unauthenticated`` is true.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from supervisor import redact

log = logging.getLogger("supervisor")

HEALTHZ_MIN = 30.0  # seconds: the least staleness /healthz tolerates
HEALTHZ_INTERVALS = 3  # ... else this many loop intervals

# the page's files: URL path -> (file in supervisor/page/, content type)
PAGE = {"/": ("index.html", "text/html; charset=utf-8"),
        "/page/app.js": ("app.js", "text/javascript; charset=utf-8"),
        "/page/style.css": ("style.css", "text/css; charset=utf-8")}
# the page may be framed by nothing and runs only its own script
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
OPEN_PATHS = {"/healthz"}  # no token needed: liveness probes


def authorized(header: str | None, token: str | None) -> bool:
    """``Authorization: Bearer TOKEN`` or ``Basic base64(any-user:TOKEN)``; no token configured: all
    requests are. Compared with hmac.compare_digest (constant time in the token's content)."""
    if not token:
        return True
    if not header:
        return False
    scheme, _, cred = header.strip().partition(" ")
    cred = cred.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        given = cred.encode("utf-8", "surrogateescape")
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(cred.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return False
        given = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(given, token.encode("utf-8"))


def page_file(name: str) -> bytes:
    return resources.files("supervisor").joinpath("page", name).read_bytes()


class HttpError(Exception):
    """The server could not start (bad address, port in use, permission)."""


def healthz_bound(interval: float) -> float:
    return max(HEALTHZ_INTERVALS * interval, HEALTHZ_MIN)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); host "" means every interface; brackets removed from IPv6."""
    host, sep, port_s = listen.rpartition(":")
    if not sep:
        raise HttpError(f"http.listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9811")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise HttpError(f"http.listen {listen!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise HttpError(f"http.listen {listen!r}: port {port} is out of range (0-65535)")
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart does not wait for TIME_WAIT sockets
    dual_stack = False

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.dual_stack:
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        super().server_bind()


class HttpServer:
    """``health()`` -> (ok, one-line reason); ``status()`` -> the JSON document; ``registry``: the
    Prometheus registry to expose."""

    def __init__(self, listen: str, registry, health: Callable[[], tuple[bool, str]],
                 status: Callable[[], dict[str, Any]], token: Callable[[], str | None] = lambda: None):
        self.listen = listen
        self.registry = registry
        self.health = health
        self.status = status
        self.token = token  # called per request: a reload that changes http.token applies at once
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def start(self) -> HttpServer:
        host, port = parse_listen(self.listen)
        last: OSError | None = None
        for family, addr, dual in _candidates(host, port):
            cls = type("Server", (_Server,), {"address_family": family, "dual_stack": dual})
            try:
                self._server = cls(addr, _handler(self))
                break
            except OSError as e:
                last = e
        if self._server is None:
            why = last.strerror if last is not None and last.strerror else str(last)
            raise HttpError(f"http.listen {self.listen}: cannot listen there: {why}")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                         name="http", daemon=True)
        self._thread.start()
        log.info("serving the status page, /healthz /metrics /status on http://%s", _display(self._server))
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(2.0)
        self._server = None


def _candidates(host: str, port: int):
    """(family, address, dual-stack) to try in order."""
    if host in ("", "*"):
        return [(socket.AF_INET6, ("::", port), True), (socket.AF_INET, ("0.0.0.0", port), False)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HttpError(f"http.listen {host}:{port}: cannot resolve {host!r}: {e.strerror}") from None
    out = []
    for family, _, _, _, sockaddr in infos:
        item = (family, sockaddr[:2] if family == socket.AF_INET else sockaddr, False)
        if item not in out:
            out.append(item)
    return out


def _display(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _handler(owner: HttpServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "celery-supervisor"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if path not in OPEN_PATHS and not authorized(self.headers.get("Authorization"), owner.token()):
                    self._reply(401, "text/plain; charset=utf-8", b"unauthorized: http.token is set\n", body,
                                {"WWW-Authenticate": 'Basic realm="celery-supervisor", charset="UTF-8"'})
                elif path == "/metrics":
                    from prometheus_client.exposition import choose_encoder

                    encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                    self._reply(200, ctype, encoder(owner.registry), body)
                elif path == "/healthz":
                    ok, reason = owner.health()
                    self._reply(200 if ok else 503, "text/plain; charset=utf-8",
                                (redact.scrub(reason).replace("\n", " ") + "\n").encode(), body)
                elif path == "/status":
                    doc = json.dumps(owner.status(), indent=2, default=str)
                    self._reply(200, "application/json", redact.scrub(doc).encode(), body)
                elif path in PAGE:
                    name, ctype = PAGE[path]
                    self._reply(200, ctype, page_file(name), body, PAGE_HEADERS)
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"not found: try / /healthz /metrics /status\n",
                                body)
            except Exception as e:  # a broken endpoint answers 500, the server goes on
                log.warning("HTTP %s failed: %s", path, redact.scrub(e))
                try:
                    self._reply(500, "text/plain; charset=utf-8", f"internal error: {redact.scrub(e)}\n".encode(),
                                body)
                except OSError:
                    pass

        def _reply(self, code: int, ctype: str, data: bytes, body: bool, headers: dict | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            log.debug("http %s: %s", self.address_string(), redact.scrub(format % args))

    return Handler
