"""sd_notify(3) without libsystemd: one datagram per state change to ``$NOTIFY_SOCKET``.

systemd (``Type=notify``) passes the path of a ``SOCK_DGRAM`` unix socket in ``$NOTIFY_SOCKET``; a
leading ``@`` names a socket in the abstract namespace (the ``@`` stands for a NUL byte). Each
message is newline-separated ``KEY=value`` pairs. Without ``$NOTIFY_SOCKET`` (not started by
systemd) every call is a no-op that returns False.

What the daemon sends (see daemon.py):

- ``READY=1`` + ``STATUS=...`` after the FIRST COMPLETE cycle, never before: ``systemctl start``
  returns once the supervisor has observed the fleet once (or told why it could not);
- ``WATCHDOG=1`` + ``STATUS=...`` after every later completed cycle. A cycle that raises sends
  nothing, so systemd's ``WatchdogSec=`` restarts a supervisor whose loop fails or hangs. WATCHDOG=1
  is sent only when ``$WATCHDOG_USEC`` is set (and ``$WATCHDOG_PID``, when set, is our PID), as
  sd_watchdog_enabled(3) does; without it only the ``STATUS=`` line goes out;
- ``RELOADING=1`` + ``MONOTONIC_USEC=...`` on SIGHUP, then ``READY=1`` once the new config is in
  use (or was rejected and the old one kept);
- ``STOPPING=1`` on SIGTERM / SIGINT.

The variables are read once and removed from ``os.environ`` so that the processes the supervisor
starts (local workers, systemctl) do not inherit them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

from supervisor import redact

log = logging.getLogger("supervisor")

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str | None) -> str | bytes | None:
    """The address to sendto() for a ``$NOTIFY_SOCKET`` value (None: not set or unusable)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and relative paths are not for us


def watchdog_usec(env: Mapping[str, str], pid: int | None = None) -> int | None:
    """The watchdog interval systemd asks for, in microseconds (None: no watchdog for this process)."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    want_pid = env.get("WATCHDOG_PID")
    if want_pid and want_pid.strip() != str(pid if pid is not None else os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec if usec > 0 else None


class SdNotify:
    """Messages to systemd's notification socket. Thread-safe; never raises."""

    def __init__(self, env: MutableMapping[str, str] | None = None, unset_environment: bool = True):
        env = os.environ if env is None else env
        self.raw_address = env.get("NOTIFY_SOCKET") or None
        self.address = socket_address(self.raw_address)
        self.watchdog_usec = watchdog_usec(env)
        if self.raw_address and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path: no notifications to systemd", self.raw_address)
        if unset_environment:
            for k in ENV_VARS:
                env.pop(k, None)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self.watchdog_usec is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram. True when sent."""
        if self.address is None or not fields:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError as e:
                if not self._warned:  # once: systemd may be gone (shutdown) or the path wrong
                    log.warning("cannot notify systemd at %s: %s", self.raw_address, e)
                    self._warned = True
                self._close_locked()
                return False

    # ---- the messages the daemon sends
    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def watchdog(self, status: str | None = None) -> bool:
        if self.watchdog_usec is None:
            return self.send(*_status(status))
        return self.send("WATCHDOG=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.send(*_status(status))

    def reloading(self, status: str | None = "reloading the config") -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = "stopping") -> bool:
        return self.send("STOPPING=1", *_status(status))

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    line = " ".join(redact.scrub(text).split())
    return (f"STATUS={line[:400]}",)
