"""Busy and silent workers on real fleets (issue 14, findings 2, 5 and 6): `supervisor run` as a
subprocess, real brokers, real Celery workers, real Apprise deliveries to a local HTTP catcher.

- A worker started with `--without-heartbeat --without-gossip --without-mingle` (CloudAMQP's
  recommendation) sends no worker event at all: it is judged by its replies to pings, and a solo
  pool busy for longer than heartbeat_timeout is neither restarted nor paged for.
- Two solo workers busy in long tasks: nothing pages, `once` and `nagios` exit 0.
- Workers that are down and stay down are re-checked at a bounded rate, off the tick's path.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import statistics
import threading
import time

import pytest

from tests.support.catchers import HttpCatcher
from tests.support.cli import run_cli
from tests.support.fleet import Fleet, local_restart, pid_alive
from tests.support.workers import Worker, celery_app, wait_ping

NO_EVENTS = ("--without-heartbeat",)  # worker_argv already has --without-gossip --without-mingle


def titles(catcher: HttpCatcher) -> list[str]:
    return [r.json["title"] for r in catcher.received() if r.json]


def channel(catcher: HttpCatcher) -> dict:
    return {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts",
                          "severities": ["info", "warning", "critical"]}], "retry": ["200ms", "500ms"]}


def statuses(f: Fleet) -> dict[str, str]:
    """What `supervisor status --json` says of each worker (the daemon's last cycle)."""
    doc = run_cli("status", "-c", str(f.path), "--json", timeout=30).json
    return {w["hostname"]: w["status"] for w in doc.get("workers", [])}


class Watch:
    """Polls `supervisor status` in the background: every status each worker was seen in."""

    def __init__(self, f: Fleet):
        self.f, self.seen, self._stop = f, {}, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                for h, s in statuses(self.f).items():
                    self.seen.setdefault(h, set()).add(s)
            except Exception:  # noqa: S110 (a poll that fails is just a missed sample)
                pass
            self._stop.wait(0.5)

    def stop(self) -> dict[str, set[str]]:
        self._stop.set()
        self._t.join(35)
        return self.seen


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_without_heartbeats_busy_past_heartbeat_timeout_is_neither_restarted_nor_paged(
        broker, request, tmp_path, uid, catcher, fleets):
    url = request.getfixturevalue("redis_url" if broker == "redis" else "rabbitmq_url")
    host, queue = f"celery@{uid}-quiet", f"{uid}-q"
    f = Fleet(tmp_path, {
        "broker": {"url": url},
        "notify": channel(catcher),
        # hung_timeout shorter than the healthy period: the old loop counted this worker's silence
        # from when it started listening, so its first missed ping restarted it at once
        "groups": [{"name": "g", "workers": [host], "min_workers": 1, "heartbeat_timeout": "4s",
                    "hung_timeout": "20s",
                    "restart": local_restart(url, pool="solo", queues=queue, extra=NO_EVENTS)}],
    })
    fleets.append(f)
    app = f.start_workers(host)
    pid = f.pid(host)
    f.run()
    watch = Watch(f)
    time.sleep(28)  # healthy: it sends no heartbeat, it answers pings
    assert titles(catcher) == [], titles(catcher)
    assert f.starts(host) == 1

    app.send_task("tasks.sleep", args=[7], queue=queue)  # heartbeat_timeout + 3 s, < hung_timeout
    time.sleep(7 + 2)
    wait_ping(app, host, 30)  # it answers again once its task is done
    time.sleep(6)  # the supervisor hears it again
    seen = watch.stop()

    assert f.starts(host) == 1, "restarted although busy for less than hung_timeout"
    assert f.pid(host) == pid and pid_alive(pid)
    assert titles(catcher) == [], titles(catcher)
    assert "busy" in seen.get(host, set()), seen  # judged busy while running its task...
    assert not seen[host] & {"lost", "dead", "unresponsive", "starting"}, seen
    assert statuses(f)[host] == "alive"  # ... and alive again after it
    assert f.stop() == 0


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_two_busy_solo_workers_page_nobody_and_checks_exit_0(broker, request, tmp_path, uid, catcher, fleets):
    url = request.getfixturevalue("redis_url" if broker == "redis" else "rabbitmq_url")
    hosts = [f"celery@{uid}-s1", f"celery@{uid}-s2"]
    shared = f"{uid}-q"
    f = Fleet(tmp_path, {
        "broker": {"url": url},
        "notify": channel(catcher),
        "groups": [{"name": "g", "workers": hosts, "min_workers": 2, "heartbeat_timeout": "4s",
                    "hung_timeout": "90s",
                    # each worker consumes the shared queue and one of its own (to give each a task)
                    "restart": local_restart(url, pool="solo", queues=f"{shared},{uid}-{{node}}")}],
        "queues": [{"name": shared, "min_consumers": 1}],
    })
    fleets.append(f)
    app = f.start_workers(*hosts)
    f.run()
    time.sleep(8)  # steady state: heard, pinged by nobody, their queues known
    assert titles(catcher) == [], titles(catcher)

    for h in hosts:
        app.send_task("tasks.sleep", args=[28], queue=f"{uid}-{h.split('@')[1]}")
    for _ in range(3):
        app.send_task("tasks.add", args=[1, 2], queue=shared)  # a backlog behind the busy workers
    time.sleep(4 + 4)  # past heartbeat_timeout: both silent, no pong, no active_queues reply
    once = run_cli("once", "-c", str(f.path), "--json", timeout=60)
    nagios = run_cli("nagios", "-c", str(f.path), timeout=60)
    doc = once.json
    busy = statuses(f)

    assert once.rc == 0, once.output
    assert nagios.rc == 0, nagios.output
    assert nagios.out.startswith("CELERY OK"), nagios.out
    assert {w["hostname"]: w["alive"] for w in doc["workers"]} == dict.fromkeys(hosts, True), doc["workers"]
    q = next(q for q in doc["queues"] if q["name"] == shared)
    assert q["consumers"] in (2, None), q  # counted from what they last said, or unknown: never a false 0
    assert set(busy.values()) == {"busy"}, busy  # the daemon: busy, counted as alive

    for h in hosts:
        wait_ping(app, h, 60)  # their tasks ended
    time.sleep(4)
    assert titles(catcher) == [], "nothing pages for workers busy within hung_timeout"
    assert [f.starts(h) for h in hosts] == [1, 1]
    assert f.stop() == 0


def test_workers_that_stay_down_cost_the_tick_nothing(redis_url, tmp_path, uid, fleets):
    """4 workers, 3 SIGKILLed and left down (an alert-only group): the loop neither waits
    ping_timeout on every tick nor pings each dead worker on every tick."""
    db = int(redis_url.rsplit("/", 1)[1])
    hosts = [f"celery@{uid}-d{i}" for i in range(1, 5)]
    f = Fleet(tmp_path, {
        "broker": {"url": redis_url},
        "loop": {"interval": "1s", "ping_timeout": "1s"},
        "groups": [{"name": "g", "hostnames": [f"celery@{uid}-d*"], "heartbeat_timeout": "4s"}],
    })
    fleets.append(f)
    workers = [Worker(redis_url, h, queues=f"{uid}-q", log=tmp_path / f"{h}.log") for h in hosts]
    try:
        app = celery_app(redis_url)
        for h in hosts:
            wait_ping(app, h, 60)
        pings = PidboxPings(redis_url, db)
        f.run()
        time.sleep(8)
        for w in workers[1:]:
            w.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        pings.reset()
        time.sleep(30)
        window = time.monotonic() - killed_at
        counts = pings.stop()
        out = f.output()
        assert f.stop() == 0
    finally:
        for w in workers:
            w.stop()

    # the durations of the ticks the daemon logged once the three were judged lost
    down = [float(x) for x in re.findall(r"tick \d+: 1/4 workers alive[^\n]*?, ([0-9.]+)s\n", out)]
    assert len(down) >= 10, out[-3000:]
    assert statistics.median(down) < 0.5, f"ticks wait for pings: {down}"  # the old loop: >= 1 s each
    for h in hosts[1:]:
        # a first confirmation, then about one re-check per heartbeat_timeout (the old loop: every tick)
        assert 1 <= counts.get(h, 0) <= window / 4 + 3, (h, counts)
    assert counts.get(hosts[0], 0) == 0, counts  # the healthy worker heartbeats: never pinged


class PidboxPings:
    """Counts the pings the broker carries to each hostname: subscribes to Redis's pidbox fanout
    channel and decodes each control message (what the supervisor costs the broker)."""

    def __init__(self, url: str, db: int):
        import redis

        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(f"/{db}.celery.pidbox")
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            m = self.pubsub.get_message(timeout=0.2)
            if not m or m["type"] != "message":
                continue
            try:
                body = json.loads(base64.b64decode(json.loads(m["data"])["body"]))
            except (ValueError, KeyError, TypeError):
                continue
            if body.get("method") == "ping":
                with self._lock:
                    for h in body.get("destination") or ["*"]:
                        self.counts[h] = self.counts.get(h, 0) + 1

    def reset(self):
        with self._lock:
            self.counts = {}

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join(5)
        self.pubsub.close()
        self.client.close()
        with self._lock:
            return dict(self.counts)
