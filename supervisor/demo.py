"""`supervisor demo`: an embedded Redis, real local workers, the real loop, a SIGKILL, a restart.

Everything it starts (redis-server, workers, an alert catcher) is stopped by PID at the end,
whatever happens in between.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from supervisor.durations import format_duration as fd


class _Catcher(BaseHTTPRequestHandler):
    """Receives the demo channel's Apprise json:// posts."""

    inbox: queue.Queue = queue.Queue()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self.inbox.put(json.loads(body))
        except ValueError:
            self.inbox.put({"title": "?", "message": body.decode(errors="replace")})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Narrator:
    def __init__(self):
        self.t0 = time.monotonic()
        self.mark: float | None = None
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            if self.mark is None:
                print(f"  [{time.monotonic() - self.t0:6.2f}s] {text}", flush=True)
            else:
                print(f"  t+{time.monotonic() - self.mark:5.2f}s  {text}", flush=True)

    def since_kill(self) -> float:
        return time.monotonic() - (self.mark or self.t0)


def run_demo(workers: int = 3, keep_dir: bool = False) -> int:
    import logging

    from supervisor.config import parse_config
    from supervisor.daemon import Daemon
    from supervisor.embedded_redis import RedisServer

    logging.basicConfig(level=logging.ERROR, format="  log %(levelname)s %(name)s: %(message)s")  # the narration says the rest
    say = Narrator()
    print("celery-supervisor demo: real Redis, real Celery workers, a real SIGKILL\n", flush=True)
    tmp = tempfile.mkdtemp(prefix="supervisor-demo-")
    redis = RedisServer()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Catcher)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    daemon = None
    adapter = None
    targets = []
    try:
        redis.start()
        say.say(f"embedded Redis on {redis.url} ({redis.binary})")
        say.say(f"alert channel 'demo': Apprise json:// to a local catcher on port {http.server_address[1]}")
        hosts = [f"celery@demo-{i}" for i in range(1, workers + 1)]
        cfg = parse_config({
            "broker": {"url": f"{redis.url}/0"},
            "loop": {"interval": "1s", "state_path": os.path.join(tmp, "state.db"), "ping_timeout": "500ms"},
            "notify": {"channels": [{"name": "demo", "url": f"json://127.0.0.1:{http.server_address[1]}/alerts",
                                     "severities": ["info", "warning", "critical"]}],
                       "retry": ["500ms", "1s"]},
            "groups": [{
                "name": "demo", "workers": hosts, "min_workers": workers, "heartbeat_timeout": "6s",
                "restart": {
                    "platform": "local",
                    "target": f"{sys.executable} -m celery -A supervisor.demo_app worker -n {{hostname}} "
                              "--pool solo --without-mingle --without-gossip -l INFO",
                    "env": {"CELERY_BROKER_URL": f"{redis.url}/0"},
                    "max_restarts": 3, "window": "10m", "backoff": "5s", "grace": "30s", "stop_timeout": "5s",
                },
            }],
        }, env={})
        from platforms import load_adapter
        from supervisor.observe.celeryapp import make_app

        adapter = load_adapter("local", cfg)
        group = cfg.groups[0]
        targets = [adapter.target_for(group, h) for h in hosts]
        for t in targets:
            r = adapter.restart(t, "demo start")
            if not r.ok:
                say.say(f"could not start {t.hostname}: {r.message}")
                return 1
        pids = {t.hostname: _pid(adapter, group, t.hostname) for t in adapter.inventory(group, hosts)}
        say.say("started " + ", ".join(f"{h} (pid {p})" for h, p in pids.items()) + " through the local platform")
        app = make_app(cfg.broker)
        deadline = time.monotonic() + 60
        waiting = set(hosts)
        while waiting and time.monotonic() < deadline:
            replies = app.control.ping(destination=sorted(waiting), timeout=0.5, limit=len(waiting))
            waiting -= {h for reply in replies for h in reply}
        if waiting:
            say.say(f"workers did not answer ping within 60s: {sorted(waiting)}; see {tmp}")
            return 1
        say.say(f"all {workers} workers answer ping")

        events: queue.Queue = queue.Queue()
        daemon = Daemon(cfg, on_tick=events.put)
        daemon.start()
        say.say(f"supervisor loop running every {fd(cfg.loop.interval)} (heartbeat_timeout {fd(group.heartbeat_timeout)})")
        _wait_for(events, lambda r: sum(v.status == "alive" for v in r.decision.verdicts) == workers, 30)
        say.say(f"supervisor sees {workers}/{workers} workers alive")
        _drain(_Catcher.inbox)

        victim = hosts[len(hosts) // 2]
        pid = _pid(adapter, group, victim)
        print(f"\n  --- killing {victim} (pid {pid}) with SIGKILL ---", flush=True)
        say.mark = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        say.say(f"SIGKILL sent to {victim}")
        timings: dict[str, float] = {}
        _follow(events, victim, say, timings)
        time.sleep(0.1)  # let the firing alert reach the catcher
        _alerts(say)
        t_ping = _wait_ping(app, victim, 60)
        if t_ping is not None:
            timings["ping"] = say.since_kill()
            say.say(f"{victim} answers ping again (new pid {_pid(adapter, group, victim)})")
        _follow(events, victim, say, timings, until="back", timeout=30)
        time.sleep(0.5)
        _alerts(say)
        print("\n  summary: " + ", ".join(f"{k} {fd(v)}" for k, v in (
            ("detected", timings.get("detected")), ("restart issued", timings.get("restart")),
            ("answers ping", timings.get("ping")), ("supervisor sees it back", timings.get("back"))) if v is not None),
            flush=True)
        ok = all(k in timings for k in ("detected", "restart", "ping", "back"))
        print(f"  result: {'the worker was detected, restarted and is back' if ok else 'INCOMPLETE: see above'}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\n  interrupted")
        return 130
    finally:
        print("\n  cleaning up:", end=" ", flush=True)
        if daemon is not None:
            daemon.stop()
            print("loop stopped;", end=" ", flush=True)
        if adapter is not None:
            n = sum(bool(_stop(adapter, t)) for t in targets)
            print(f"{n} worker(s) stopped;", end=" ", flush=True)
        redis.close()
        http.shutdown()
        print("Redis stopped.", flush=True)
        if keep_dir:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _alerts(say: Narrator) -> None:
    for msg in _drain(_Catcher.inbox):
        say.say(f"alert delivered to channel 'demo': {msg.get('title')}")


def _pid(adapter, group, hostname: str) -> int | None:
    return adapter.pid_of(adapter.target_for(group, hostname))


def _stop(adapter, target) -> bool:
    return adapter.stop(target)


def _wait_for(events: queue.Queue, pred, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = events.get(timeout=0.2)
        except queue.Empty:
            continue
        if pred(r):
            return r
    raise TimeoutError("the supervisor did not reach the expected state")


def _follow(events: queue.Queue, victim: str, say: Narrator, timings: dict, until: str = "restart",
            timeout: float = 30) -> None:
    """Narrate the supervisor's ticks about the victim until `until` happened."""
    deadline = time.monotonic() + timeout
    while until not in timings and time.monotonic() < deadline:
        try:
            r = events.get(timeout=0.2)
        except queue.Empty:
            continue
        v = next((v for v in r.decision.verdicts if v.hostname == victim), None)
        if v is None:
            continue
        if "detected" not in timings and v.status in ("dead", "lost", "unresponsive"):
            timings["detected"] = say.since_kill()
            say.say(f"detected: {v.status}: {v.reason}")
            if v.status == "dead":
                say.say("confirmed by the platform itself (the process exited): no need to wait for heartbeat_timeout")
        for a in r.actions:
            if a.kind == "restart" and a.hostname == victim and "restart" not in timings:
                timings["restart"] = say.since_kill()
                say.say(f"restart issued ({a.result}); {a.budget_left} restart(s) left in the window")
                say.say(f"  by hand this would be: {a.command}")
        _alerts(say)
        if "restart" in timings and "back" not in timings and v.status == "alive":
            timings["back"] = say.since_kill()
            say.say(f"supervisor sees {victim} alive again ({v.reason}); finding resolved")


def _wait_ping(app, hostname: str, timeout: float) -> float | None:
    """Targeted pings, each on a fresh connection (a reused one reports a new worker up to ~1 s late)."""
    from supervisor.observe import control

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if control.ping(app, [hostname], 0.5):
                return time.monotonic() - t0
        except Exception:
            time.sleep(0.2)
    return None


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
