"""The daemon's HTTP endpoints for real: `supervisor run` as a subprocess with http.listen, a Redis
with a password, real local workers (one really SIGKILLed and restarted), real Apprise deliveries,
/metrics parsed with prometheus_client's own parser, /healthz through a real broker outage,
/status, and a secret that must appear in none of them.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from supervisor.http import HttpError, HttpServer, healthz_bound, parse_listen
from tests.support.brokers import free_port, need, private_redis
from tests.support.cli import run_cli, write_config
from tests.support.fleet import Fleet, local_restart, pid_alive, wait_until
from tests.support.workers import wait_ping

PASSWORD = "s3cret-Broker-pw-4711"
TOKEN = "Tk9xQhookTokenZ42"  # a token in the Apprise URL's path


# ---------------------------------------------------------------- helpers
def get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def metrics(base: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, parsed by prometheus_client's parser: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text, headers = get(f"{base}/metrics")
    assert code == 200, text
    assert headers["Content-Type"].startswith("text/plain; version="), headers
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(m: dict, name: str, **labels) -> float | None:
    return m.get((name, frozenset(labels.items())))


@pytest.fixture
def pw_redis():
    yield from private_redis(PASSWORD)




# ---------------------------------------------------------------- the three endpoints, a real fleet
def test_metrics_status_and_healthz_of_a_real_fleet(pw_redis, tmp_path, uid, catcher, fleets):
    url = f"{pw_redis.url}/0"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    hosts = [f"celery@{uid}-1", f"celery@{uid}-2"]
    backlog = f"{uid}-backlog"
    f = Fleet(tmp_path, {
        "broker": {"url": url},
        "notify": {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/hook/{TOKEN}",
                                 "severities": ["warning", "critical"]}], "retry": ["200ms"]},
        "groups": [{"name": "g", "workers": hosts, "min_workers": 2, "heartbeat_timeout": "6s",
                    "restart": local_restart(url, queues=f"{uid}-q")}],
        "queues": [{"name": backlog, "warning": 1000}],
        "http": {"listen": f"127.0.0.1:{port}"},
        "ha": {"lease": "off"},
    })
    fleets.append(f)
    app = f.start_workers(*hosts)
    for i in range(7):  # nobody consumes this queue
        app.send_task("tasks.add", args=[i, i], queue=backlog)
    f.run()

    wait_until(lambda: _status(base) == 200, 60, what="/healthz 200")
    code, body, _ = get(f"{base}/healthz")
    assert body.startswith("ok: last cycle") and "broker reachable" in body

    def steady():
        m = metrics(base)
        return (sample(m, "celery_supervisor_workers", group="g", status="alive") == 2
                and sample(m, "celery_supervisor_queue_length", queue=backlog) == 7 and m)

    m = wait_until(steady, 30, what="2 workers alive and 7 messages in /metrics")
    assert sample(m, "celery_supervisor_workers", group="g", status="lost") == 0
    assert sample(m, "celery_supervisor_broker_up") == 1
    assert sample(m, "celery_supervisor_leader") == 1
    assert sample(m, "celery_supervisor_restarts_total", group="g", outcome="ok") == 0
    assert sample(m, "celery_supervisor_cycles_total", outcome="ok") >= 1
    assert sample(m, "celery_supervisor_cycle_duration_seconds_count") >= 1
    assert abs(sample(m, "celery_supervisor_last_cycle_timestamp_seconds") - time.time()) < 60

    doc = json.loads(get(f"{base}/status")[1])
    assert {"workers", "queues", "findings", "actions"} <= set(doc)
    assert sorted(w["hostname"] for w in doc["workers"] if w["alive"]) == hosts
    assert [q["length"] for q in doc["queues"] if q["name"] == backlog] == [7]
    # the daemon keeps each queue's last 15 minutes for the status page (not the page: it may open later)
    [trend] = [q["trend"] for q in doc["queues"] if q["name"] == backlog]
    assert trend and trend[-1][1] == 7 and all(t <= doc["time"] + 1 for t, _ in trend), trend

    # a worker SIGKILLed: restarted through the local platform, counted, alerted
    old = f.kill(hosts[1])
    wait_until(lambda: (p := f.pid(hosts[1])) != old and p, 30, what="the restart")
    wait_ping(app, hosts[1], 30)

    def restarted_and_told():
        m = metrics(base)
        return (sample(m, "celery_supervisor_restarts_total", group="g", outcome="ok") == 1
                and (sample(m, "celery_supervisor_alerts_total", channel="test", outcome="delivered") or 0) >= 1
                and sample(m, "celery_supervisor_workers", group="g", status="alive") == 2 and m)

    m = wait_until(restarted_and_told, 60, what="the restart and its alert counted, both workers alive")
    assert sample(m, "celery_supervisor_restarts_total", group="g", outcome="failed") == 0
    assert sample(m, "celery_supervisor_alerts_total", channel="test", outcome="failed") == 0
    assert not pid_alive(old)
    # the finding fired and was counted; it resolved since, and its series stays at 0
    assert sample(m, "celery_supervisor_findings", rule="worker_lost", state="firing") is not None
    delivered = [r for r in catcher.received() if r.json]
    assert any("worker_lost" in r.json["title"] for r in delivered)
    doc = json.loads(get(f"{base}/status")[1])
    assert doc["actions"] is not None and doc["findings"] is not None

    # no secret anywhere: every endpoint, every format
    bodies = [get(f"{base}{p}")[1] for p in ("/metrics", "/healthz", "/status", "/", "/nope")]
    bodies.append(get(f"{base}/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})[1])
    for b in bodies:
        assert PASSWORD not in b and TOKEN not in b, b[:2000]
    assert PASSWORD not in f.output() and TOKEN not in f.output()
    assert f.stop() == 0


def _status(base: str) -> int | None:
    try:
        return get(f"{base}/healthz")[0]
    except OSError:
        return None


# ---------------------------------------------------------------- /healthz through a broker outage
def test_healthz_is_503_while_the_broker_is_down(own_redis, tmp_path, uid, fleets):
    url = f"{own_redis.url}/0"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    f = Fleet(tmp_path, {
        "broker": {"url": url, "connect_timeout": "1s"},
        "groups": [{"name": "g", "hostnames": [f"celery@{uid}-*"]}],
        "http": {"listen": f"127.0.0.1:{port}"},
        "ha": {"lease": "off"},
    })
    fleets.append(f)
    f.run()
    wait_until(lambda: _status(base) == 200, 60, what="/healthz 200")

    own_redis.stop()
    wait_until(lambda: _status(base) == 503, 30, what="/healthz 503 with the broker down")
    code, body, _ = get(f"{base}/healthz")
    assert code == 503 and body.startswith("broker unreachable in the last cycle"), body
    assert body.count("\n") == 1  # one line
    assert sample(metrics(base), "celery_supervisor_broker_up") == 0

    own_redis.start()
    wait_until(lambda: _status(base) == 200, 60, what="/healthz 200 again")
    assert sample(metrics(base), "celery_supervisor_broker_up") == 1
    assert f.stop() == 0


# ---------------------------------------------------------------- a port in use
def test_a_port_in_use_exits_2_naming_http_listen(tmp_path, redis_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "config.yaml", {
            "broker": {"url": redis_url}, "loop": {"state_path": str(tmp_path / "state.db")},
            "http": {"listen": f"127.0.0.1:{port}"}, "ha": {"lease": "off"},
        })
        r = run_cli("run", "-c", cfg, timeout=60)
    assert r.rc == 2, str(r)
    assert f"http.listen 127.0.0.1:{port}" in r.err and "in use" in r.err, str(r)
    assert "Traceback" not in r.output, str(r)


# ---------------------------------------------------------------- the server alone: addresses, paths
def _serve(listen: str, health=(True, "ok: fine"), doc=None) -> HttpServer:
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    Gauge("celery_supervisor_probe", "probe", registry=reg).set(3)
    return HttpServer(listen, reg, lambda: health, lambda: doc or {"workers": []}).start()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("form", ["127.0.0.1", "[::1]", "", "localhost"])
def test_listen_forms(form):
    if form in ("[::1]", "") and not _has_ipv6():
        need("IPv6 on the loopback interface")
    port = free_port()
    srv = _serve(f"{form}:{port}")
    try:
        hosts = {"127.0.0.1": ["127.0.0.1"], "[::1]": ["[::1]"], "": ["127.0.0.1", "[::1]"],
                 "localhost": ["localhost"]}[form]
        for h in hosts:
            code, text, _ = get(f"http://{h}:{port}/metrics")
            assert code == 200 and "celery_supervisor_probe 3.0" in text, text
    finally:
        srv.stop()
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1" if form != "[::1]" else "::1", port), timeout=2).close()


def test_paths_methods_and_scrubbing():
    from supervisor import redact

    redact.register_secret("hunter2-very-secret")
    port = free_port()
    srv = _serve(f"127.0.0.1:{port}", health=(False, "broker unreachable: redis://u:hunter2-very-secret@h\nx"),
                 doc={"workers": [], "note": "password hunter2-very-secret"})
    try:
        base = f"http://127.0.0.1:{port}"
        code, body, _ = get(f"{base}/healthz")
        assert code == 503 and "hunter2" not in body and body.count("\n") == 1, body
        code, body, headers = get(f"{base}/status")
        assert code == 200 and headers["Content-Type"] == "application/json" and "hunter2" not in body
        assert json.loads(body)["note"] == "password ****"
        assert get(f"{base}/nope")[0] == 404
        req = urllib.request.Request(f"{base}/healthz", method="HEAD")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 503
        code, text, headers = get(f"{base}/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers["Content-Type"].startswith("application/openmetrics-text") and text.endswith("# EOF\n")
    finally:
        srv.stop()


def test_listen_errors_and_bound():
    assert parse_listen("[::1]:9811") == ("::1", 9811)
    assert parse_listen(":9811") == ("", 9811)
    with pytest.raises(HttpError, match="http.listen"):
        parse_listen("127.0.0.1:99999")
    with pytest.raises(HttpError, match="cannot resolve"):
        HttpServer("no-such-host.invalid:9811", None, lambda: (True, ""), dict).start()
    assert healthz_bound(1.0) == 30.0 and healthz_bound(20.0) == 60.0
