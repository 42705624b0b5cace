"""Local catchers for alert deliveries: an HTTP server and an SMTP server that tests start on free
ports and read back. Real sockets, real protocols: Apprise talks to them as it would to a real
Mattermost / webhook endpoint / mail relay.

    with HttpCatcher() as http:
        ...  # json://127.0.0.1:{http.port}/hook
        req = http.wait_for(lambda r: r.path == "/hook")
        req.json["title"]
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_port() -> int:
    """A port nothing listens on (connections are refused)."""
    return free_port()


# ---------------------------------------------------------------- HTTP
@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any  # the decoded JSON body, or None when it is not JSON
    at: float  # time.monotonic() on arrival
    status: int | None = None  # what the catcher answered; None while it hangs (or never answered)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class HttpCatcher:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) recording every request.

    ``fail_next(n, status)`` answers ``status`` to the next n requests; ``hang_next(seconds, n)``
    holds the next n requests for that long before answering 200 (``stop()`` releases them).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Condition()
        self.requests: list[HttpRequest] = []
        self._fail: list[int] = []  # statuses to answer next, in order
        self._hang: list[float] = []  # seconds to hang the next requests, in order
        self._release = threading.Event()
        self.hanging = 0  # requests being held right now
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    data = json.loads(body) if body else None
                except ValueError:
                    data = None
                req = HttpRequest(
                    method=self.command,
                    path=self.path,
                    headers={k: v for k, v in self.headers.items()},
                    body=body,
                    json=data,
                    at=time.monotonic(),
                )
                with catcher._lock:
                    catcher.requests.append(req)
                    status = catcher._fail.pop(0) if catcher._fail else 200
                    hang = catcher._hang.pop(0) if catcher._hang else 0.0
                    if hang:
                        catcher.hanging += 1
                    catcher._lock.notify_all()
                if hang:
                    catcher._release.wait(hang)
                    with catcher._lock:
                        catcher.hanging -= 1
                payload = b'{"ok": true}' if status < 400 else b'{"error": "catcher says no"}'
                # recorded before the answer is written: the client may read it (and the test look at
                # the record) before this thread runs again
                with catcher._lock:
                    req.status = status
                    catcher._lock.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up while we hung: it never got the answer
                    with catcher._lock:
                        req.status = None
                        catcher._lock.notify_all()

            do_POST = do_PUT = do_GET = _handle

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> HttpCatcher:
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"http-catcher-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # let hanging requests answer and finish
        self.server.shutdown()
        self.server.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> HttpCatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base(self) -> str:
        return f"{self.host}:{self.port}"

    # -- behaviour
    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def hang_next(self, seconds: float, n: int = 1) -> None:
        with self._lock:
            self._hang.extend([seconds] * n)

    # -- reading
    def received(self, path: str | None = None, answered: int | None = None) -> list[HttpRequest]:
        """Requests so far (to ``path`` if given; only those answered with status ``answered`` if given)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (path is None or r.path == path) and (answered is None or r.status == answered)
            ]

    def wait_for(
        self, pred: Callable[[HttpRequest], bool] = lambda r: True, count: int = 1, timeout: float = 30.0
    ) -> HttpRequest:
        """Wait until ``count`` requests match ``pred``; return the last of them. AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                hits = [r for r in self.requests if pred(r)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"HTTP catcher :{self.port}: {len(hits)} of {count} expected requests after "
                        f"{timeout}s; got {[(r.method, r.path, r.status) for r in self.requests]}"
                    )
                self._lock.wait(left)

    def wait_hanging(self, n: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.hanging < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"HTTP catcher :{self.port}: {self.hanging} hanging requests, expected {n}"
                    )
                self._lock.wait(left)


# ---------------------------------------------------------------- SMTP
class _DropLoginDataWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


@dataclass
class SmtpMessage:
    mail_from: str
    rcpt_tos: list[str]
    subject: str
    body: str  # the text/plain part (or the html part when there is no plain one)
    raw: bytes
    login: str | None  # the user the client authenticated as, if it did
    at: float = field(default_factory=time.monotonic)


class SmtpCatcher:
    """An aiosmtpd Controller on 127.0.0.1 (free port) recording every message. Plain SMTP (no TLS);
    AUTH PLAIN/LOGIN is offered without TLS and accepts any password (the user is recorded)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.host = host
        self.port = port or free_port()
        self.messages: list[SmtpMessage] = []
        self.logins: list[tuple[str, str]] = []  # (user, password) as the client sent them
        self._lock = threading.Condition()
        catcher = self
        # aiosmtpd warns about its own deprecated attribute on every AUTH: not our business
        mail_log = logging.getLogger("mail.log")
        if not any(isinstance(f, _DropLoginDataWarning) for f in mail_log.filters):
            mail_log.addFilter(_DropLoginDataWarning())

        def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ARG001
            user = getattr(auth_data, "login", b"") or b""
            pw = getattr(auth_data, "password", b"") or b""
            user = user.decode() if isinstance(user, bytes) else str(user)
            pw = pw.decode() if isinstance(pw, bytes) else str(pw)
            with catcher._lock:
                catcher.logins.append((user, pw))
            return AuthResult(success=True, auth_data=user)

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                raw = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
                msg = email.message_from_bytes(raw, policy=email.policy.default)
                part = msg.get_body(preferencelist=("plain", "html"))
                body = part.get_content() if part is not None else ""
                login = session.auth_data if isinstance(session.auth_data, str) else None
                rec = SmtpMessage(
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    subject=str(msg.get("Subject", "")),
                    body=body,
                    raw=raw,
                    login=login,
                )
                with catcher._lock:
                    catcher.messages.append(rec)
                    catcher._lock.notify_all()
                return "250 Message accepted for delivery"

        self.controller = Controller(
            Handler(),
            hostname=host,
            port=self.port,
            authenticator=authenticator,
            auth_require_tls=False,
            ready_timeout=10.0,
        )

    def start(self) -> SmtpCatcher:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SmtpCatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(
        self, pred: Callable[[SmtpMessage], bool] = lambda m: True, count: int = 1, timeout: float = 30.0
    ) -> SmtpMessage:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                hits = [m for m in self.messages if pred(m)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"SMTP catcher :{self.port}: {len(hits)} of {count} expected messages after {timeout}s; "
                        f"got subjects {[m.subject for m in self.messages]}"
                    )
                self._lock.wait(left)
