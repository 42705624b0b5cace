"""No secret marker appears anywhere a user or a monitoring system can read (issue 9).

A config holds marker secrets: a broker password with # / ? in it (a real password-protected
private redis-server), an Apprise json:// URL with a password and a token, a management URL
password, restart.env values (one secret by its name, one by default), a Cloud Foundry password and
client secret. A real worker prints its env values when it starts, is SIGKILLed, restarted by the
real daemon, and its last output is quoted in a real Apprise delivery. Then every command's output
(check-config, once --dry-run, once --json, nagios, status, status --json), the daemon's log,
/healthz, /status, /metrics, /, the alert bodies the catcher received and the state file's bytes
(SQLite db, -wal, -shm) are searched for each marker: raw, URL-encoded and base64.

The second test writes the broker password unencoded in the URL (redis://:pw#x/y?z@host), which a
URL parser misreads: every command and the daemon must still not print it, nor a piece of it.
"""

from __future__ import annotations

import base64
import json
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.support.brokers import free_port, private_redis
from tests.support.catchers import dead_port
from tests.support.cli import CliDaemon, run_cli
from tests.support.fleet import Fleet, pid_alive, wait_until
from tests.support.workers import APP_DIR, wait_ping

pytestmark = pytest.mark.redis

BROKER_PW = "Brk7Qz#Lmx4R/Xvq9T?Npz2W"  # # / ? unencoded would break a URL parser
APPRISE_PW = "ApPw-5Marker-Kq8"
APPRISE_TOKEN = "Apr9Tok3nMarkerQ7x"
MGMT_PW = "Mgm8-Pw-Marker-Zt3"
ENV_TOKEN = "EnvTok-Marker-8842x"  # restart.env API_TOKEN: a secret by its name
ENV_OPAQUE = "Opq3-env-Marker-v9"  # restart.env SOMETHING_SETTING: a secret by default
CF_PW = "CfPw-Marker-4417q"
CF_SECRET = "CfSec-Marker-9931z"
MARKERS = {
    "broker password": (BROKER_PW, ""),
    "apprise password": (APPRISE_PW, "hook"),
    "apprise token": (APPRISE_TOKEN, None),
    "management password": (MGMT_PW, "admin"),
    "restart.env API_TOKEN": (ENV_TOKEN, None),
    "restart.env SOMETHING_SETTING": (ENV_OPAQUE, None),
    "cf password": (CF_PW, "ops"),
    "cf client secret": (CF_SECRET, "ops-client"),
}


def forms(secret: str, user: str | None = None) -> set[str]:
    """How a secret may be written: raw, URL-encoded (path and form), base64 (standard and
    URL-safe, with and without padding), and the base64 of ``user:secret`` (HTTP Basic)."""
    out = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    for text in [secret] + ([f"{user}:{secret}"] if user is not None else []):
        for enc in (base64.b64encode(text.encode()), base64.urlsafe_b64encode(text.encode())):
            out |= {enc.decode(), enc.decode().rstrip("=")}
    return out


def find_leaks(where: dict[str, bytes | str], markers: dict[str, tuple[str, str | None]]) -> list[str]:
    found = []
    for place, blob in where.items():
        data = blob if isinstance(blob, bytes) else blob.encode("utf-8", "replace")
        for name, (secret, user) in markers.items():
            for form in forms(secret, user):
                if form.encode() in data:
                    found.append(f"{name} as {form!r} in {place}")
    return found


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            return r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.read().decode("utf-8", "replace")


def healthz_code(base: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.fixture
def pw_redis():
    yield from private_redis(BROKER_PW)


def worker_target(queue: str) -> str:
    """The test app's worker, started through a python -c that first prints its env values (raw,
    URL-encoded, base64), as a worker that dumps its environment when it crashes would."""
    code = ("import base64,os,runpy,sys,urllib.parse as u; t=os.environ['API_TOKEN']; o=os.environ['SOMETHING_SETTING'];"
            " print('API_TOKEN=' + t, 'SOMETHING_SETTING=' + o, u.quote(t), base64.b64encode(t.encode()).decode(),"
            " flush=True); sys.argv = ['celery'] + sys.argv[1:]; runpy.run_module('celery', run_name='__main__',"
            " alter_sys=True)")
    argv = [sys.executable, "-c", code, "-A", "tasks", "worker", "-n", "HOSTNAME", "-Q", queue, "--pool", "solo",
            "--concurrency", "1", "--without-mingle", "--without-gossip", "-l", "WARNING"]
    return shlex.join(argv).replace("HOSTNAME", "{hostname}")


def secret_config(broker_url: str, catcher_port: int, uid: str, http_port: int) -> dict:
    return {
        "broker": {"url": broker_url, "management_url": f"http://admin:{MGMT_PW}@127.0.0.1:{dead_port()}/",
                   "connect_timeout": "2s"},
        "notify": {"channels": [{"name": "hook", "severities": ["info", "warning", "critical"],
                                 "url": f"json://hook:{APPRISE_PW}@127.0.0.1:{catcher_port}/hook/{APPRISE_TOKEN}"}],
                   "retry": ["200ms"]},
        "platforms": {"cloudfoundry": {"api_url": f"http://127.0.0.1:{dead_port()}", "username": "ops",
                                       "password": CF_PW, "client_id": "ops-client", "client_secret": CF_SECRET,
                                       "timeout": "2s"}},
        "groups": [
            {"name": "g", "workers": [f"celery@sec-{uid}-1"], "heartbeat_timeout": "4s",
             "restart": {"platform": "local", "target": worker_target(f"{uid}-q"), "cwd": str(APP_DIR),
                         "env": {"CELERY_BROKER_URL": broker_url, "PYTHONPATH": str(APP_DIR),
                                 "API_TOKEN": ENV_TOKEN, "SOMETHING_SETTING": ENV_OPAQUE},
                         "max_restarts": 3, "window": "10m", "backoff": "1s", "grace": "10s",
                         "stop_timeout": "5s"}},
            {"name": "cf", "hostnames": [f"celery@cf-{uid}-*"],
             "restart": {"platform": "cloudfoundry", "app": f"cf-{uid}"}},
        ],
        "http": {"listen": f"127.0.0.1:{http_port}"},
    }


COMMANDS = [("check-config",), ("once", "--dry-run"), ("once", "--json"), ("nagios",), ("status",),
            ("status", "--json")]


def run_commands(cfg: Path) -> dict[str, str]:
    out = {}
    for args in COMMANDS:
        r = run_cli(*args, "-c", str(cfg), timeout=120)
        out[f"supervisor {' '.join(args)} (exit {r.rc})"] = r.output
    return out


def state_files(state: Path) -> dict[str, bytes]:
    return {f"state file {p.name}": p.read_bytes() for p in sorted(state.parent.glob(state.name + "*"))}


def test_no_secret_marker_anywhere(pw_redis, tmp_path, uid, catcher, fleets):
    url = f"redis://:{quote(BROKER_PW, safe='')}@127.0.0.1:{pw_redis.port}/1"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    f = Fleet(tmp_path, secret_config(url, catcher.port, uid, port))
    fleets.append(f)
    host = f"celery@sec-{uid}-1"
    app = f.start_workers(host)
    first = f.pid(host)
    f.run()
    wait_until(lambda: healthz_code(base) is not None, 60, what="the HTTP server")
    wait_until(lambda: "listening to worker heartbeats" in f.output(), 60, what="the event stream")

    f.kill(host)
    wait_until(lambda: (p := f.pid(host)) != first and p and pid_alive(p), 60, what="the restart")
    wait_ping(app, host, 30)
    alert = catcher.wait_for(lambda r: b"API_TOKEN=" in r.body, timeout=60)
    body = alert.json["message"] if alert.json else alert.text
    # the worker's last output is quoted in the alert, every env value it printed masked
    assert "API_TOKEN=**** SOMETHING_SETTING=**** **** ****" in body, body

    places: dict[str, bytes | str] = run_commands(f.path)
    for path in ("/healthz", "/status", "/metrics", "/"):
        places[f"GET {path}"] = get(base + path)
    assert json.loads(places["GET /status"])["workers"], places["GET /status"]
    assert "supervisor check-config (exit 0)" in places and "supervisor status --json (exit 0)" in places, list(places)
    assert f.stop() == 0
    places["the daemon's log"] = f.output()
    for i, r in enumerate(catcher.received()):
        places[f"alert body {i}"] = r.body
    places.update(state_files(Path(f.config["loop"]["state_path"])))
    assert any(k.startswith("state file") and v for k, v in places.items())
    assert len([k for k in places if k.startswith("alert body")]) >= 1

    leaks = find_leaks(places, MARKERS)
    assert leaks == [], "\n".join(leaks)


def test_an_unencoded_broker_password_is_never_printed(pw_redis, tmp_path, uid, catcher):
    """redis://:Brk7Qz#Lmx4R/Xvq9T?Npz2W@host: a URL parser cuts it at the #, takes "Brk7Qz" for a
    port and the rest for a fragment. Before the fix: check-config OK, then `Port could not be cast
    to integer value as 'Brk7Qz'` on the nagios line, in the logs and in /healthz."""
    url = f"redis://:{BROKER_PW}@127.0.0.1:{pw_redis.port}/2"
    pieces = {f"piece {p!r}": (p, None) for p in ("Brk7Qz", "Lmx4R", "Xvq9T", "Npz2W")}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = secret_config(url, catcher.port, uid, port)
    config["loop"] = {"state_path": str(tmp_path / "state.db"), "interval": "1s"}
    config["groups"] = [{"name": "g", "hostnames": [f"celery@sec-{uid}-*"]}]
    config["ha"] = {"lease": "off"}
    import yaml

    cfg = tmp_path / "supervisor.yaml"
    cfg.write_text(yaml.safe_dump(config))
    places: dict[str, bytes | str] = run_commands(cfg)
    daemon = CliDaemon("run", "-c", str(cfg), "--log-level", "DEBUG", log_dir=tmp_path)
    try:
        wait_until(lambda: healthz_code(base) is not None or not daemon.alive(), 60, what="the daemon's HTTP server")
        if daemon.alive():
            wait_until(lambda: "cycle" in get(base + "/healthz") or not daemon.alive(), 30, what="a cycle")
            for path in ("/healthz", "/status", "/metrics", "/"):
                places[f"GET {path}"] = get(base + path)
    finally:
        daemon.signal(15)
        daemon.wait(20)
        daemon.kill()
    places["the daemon's stdout"] = daemon.out
    places["the daemon's stderr"] = daemon.err
    places.update(state_files(tmp_path / "state.db"))
    leaks = find_leaks(places, {"broker password": (BROKER_PW, ""), **pieces})
    assert leaks == [], "\n".join(leaks)
