"""A real headless Chromium driven over its DevTools protocol (CDP), for the status page's tests.

Debian's `chromium` package (`apt-get install chromium`; .ci/run installs it), started with
`--headless=new --no-sandbox` (it runs as root here) and `--remote-debugging-port=0`: the port it
chose is read from DevToolsActivePort in its profile folder. The CDP client is websocket-client (a
test dependency). Stopped by PID (its process group)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.brokers import need


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, profile: Path, width: int = 1400, height: int = 1000):
        binary = chromium_binary()
        if binary is None:
            need("a Chromium browser (apt-get install chromium)")
        self.profile = profile
        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile / "chromium.log", "wb")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._ids = itertools.count(1)
        self.ws = None
        try:
            self._connect(time.monotonic() + 60)
        except BaseException:
            self.close()
            raise

    def _connect(self, deadline: float) -> None:
        import websocket

        port_file = self.profile / "DevToolsActivePort"
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()}): "
                                   f"{(self.profile / 'chromium.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromium shows no page target")
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")

    # ---- the protocol
    def call(self, method: str, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        """The value of a JavaScript expression (promises awaited); a thrown error raises."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def headers(self, headers: dict[str, str]) -> None:
        """Headers sent with every request of the page (e.g. Authorization)."""
        self.call("Network.enable")
        self.call("Network.setExtraHTTPHeaders", headers=headers)

    def open(self, url: str, timeout: float = 30) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    def wait(self, expression: str, timeout: float, what: str | None = None):
        deadline = time.monotonic() + timeout
        while True:
            v = self.eval(expression)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or expression}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.log.close()


def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots and measurements are kept: $SUPERVISOR_TEST_ARTIFACTS (.ci/run sets it), else
    the test's tmp folder."""
    d = Path(os.environ.get("SUPERVISOR_TEST_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def synthetic_status(n_workers: int, now: float, groups: int = 10, queues: int = 20) -> dict:
    """A /status document with n_workers workers (a few lost, some busy, some retired), for render times."""
    statuses = ["alive"] * 14 + ["busy", "lost", "retired", "starting"]
    workers = []
    for i in range(n_workers):
        st = statuses[i % len(statuses)]
        workers.append({
            "hostname": f"celery@web-{i:04d}", "group": f"group-{i % groups}", "alive": st in ("alive", "busy"),
            "status": st, "reason": "heartbeat 1.2s ago" if st == "alive" else f"{st} for a reason", "explicit": False,
            "last_heartbeat_age": 1.2 + (i % 7), "active": i % 4, "last_pong_age": None,
            "target": f"celery-worker@web-{i:04d}.service", "platform_state": "running", "pid": 10000 + i,
            "processed": i * 37, "processed_rate": (i % 9) / 3, "concurrency": 4, "last_task_age": 3.0,
            "stall": None, "stall_reason": None})
    return {
        "time": now, "loop_interval": 5.0, "leader": True, "severity": "critical", "exit_code": 2,
        "broker": {"url": "redis://127.0.0.1:6379/0", "ok": True, "error": None},
        "workers": workers,
        "queues": [{"name": f"queue-{q}", "length": q * 10, "ready": q * 10, "unacked": q, "consumers": 5,
                    "error": None, "drain_rate": 1.5, "saturated": q % 5 == 0} for q in range(queues)],
        "findings": [{"rule": "worker_lost", "subject": w["hostname"], "severity": "critical",
                      "summary": f"{w['hostname']} lost", "group": w["group"], "hostname": w["hostname"],
                      "state": "firing", "since": now - 60} for w in workers if w["status"] == "lost"][:50],
        "actions": [], "platform_errors": {}, "notes": {},
        "budgets": [], "recent_restarts": [
            {"at": now - 30 * i, "target": f"celery-worker@web-{i:04d}.service", "group": f"group-{i % groups}",
             "hostname": f"celery@web-{i:04d}", "reason": "lost", "outcome": "ok", "message": ""} for i in range(20)],
        "silences": [], "outbox": {},
    }
