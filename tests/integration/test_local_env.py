"""What a worker restarted by the local platform inherits: the broker URL the supervisor watches
(it is the worker's too), not the supervisor's own secrets (alert channel URLs, platform
credentials) nor its settings (SUPERVISOR_*, NOTIFY_SOCKET ...).

Finding 3: with the README's minimal config (`url: ${CELERY_BROKER_URL}`) and a password in that
variable, the restarted worker lost the variable, fell back to amqp://guest@localhost// and never
came back. Here: a password-protected private Redis, `supervisor run` as a subprocess, a real
SIGKILL, the restarted worker's real environment read back from the kernel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from platforms.local import MARKER
from supervisor.config import parse_config
from tests.support.brokers import private_redis
from tests.support.fleet import Fleet, pid_alive, wait_until
from tests.support.workers import APP_DIR, celery_app, wait_ping

pytestmark = pytest.mark.redis
PASSWORD = "s3cret-Broker-pw-4711"
TOKEN = "Tk9xQhookTokenZ42"  # in the path of one channel's Apprise URL


@pytest.fixture
def pw_redis():
    yield from private_redis(PASSWORD)


def test_readme_minimal_config_restarted_worker_gets_the_broker_not_the_alert_urls(
        pw_redis, tmp_path, uid, catcher, fleets, monkeypatch):
    url = f"{pw_redis.url}/0"
    host, queue = f"celery@{uid}-env", f"{uid}-q"
    alert_url = f"json://127.0.0.1:{catcher.port}/ops/{uid}Zz9"
    supervisor_env = {
        "CELERY_BROKER_URL": url,                          # the README's ${CELERY_BROKER_URL}
        "HOOK_TOKEN": TOKEN,                               # a token inside a channel URL
        "ALERT_URL": alert_url,                            # a whole channel URL
        "SUPERVISOR_API_KEY": "sup-only-key-123",          # the supervisor's own setting
        "REDIS_PASSWORD": PASSWORD,                        # the broker's password alone: the worker's
        "DATABASE_URL": "postgres://app:db-pw-9876@db.internal/app",  # not the supervisor's: inherited
    }
    for k, v in supervisor_env.items():
        monkeypatch.setenv(k, v)
    config = {
        "broker": {"url": "${CELERY_BROKER_URL}"},
        "loop": {"interval": "1s", "state_path": str(tmp_path / "state.db")},
        "notify": {"channels": [
            {"name": "ops", "url": f"json://127.0.0.1:{catcher.port}/hook/${{HOOK_TOKEN}}",
             "severities": ["warning", "critical"]},
            {"name": "second", "url": "${ALERT_URL}", "severities": ["critical"]},
        ], "retry": ["200ms"]},
        "groups": [{"name": "default", "workers": [host], "heartbeat_timeout": "3s", "restart": {
            "platform": "local",
            "target": f"{sys.executable} -m celery -A tasks worker -n {{hostname}} -Q {queue} --pool solo "
                      "--without-mingle --without-gossip -l WARNING",
            "cwd": str(APP_DIR), "max_restarts": 3, "window": "10m", "backoff": "1s", "grace": "20s",
        }}],
    }
    f = Fleet(tmp_path, config)  # the file keeps ${VAR}: the daemon reads them from its environment
    fleets.append(f)
    assert "${CELERY_BROKER_URL}" in f.path.read_text()

    # the worker, started by hand as a user would, with the same command line
    wenv = {k: v for k, v in os.environ.items() if k not in ("ALERT_URL", "HOOK_TOKEN", "SUPERVISOR_API_KEY")}
    w = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", host, "-Q", queue,
                          "--pool", "solo", "--without-mingle", "--without-gossip", "-l", "WARNING"],
                         cwd=str(APP_DIR), env=wenv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.STDOUT, start_new_session=True)
    app = celery_app(url)
    try:
        wait_ping(app, host)
        f.run()
        time.sleep(4)  # the supervisor hears it, and learns its pid from the heartbeats
        assert [r for r in catcher.received() if r.json] == []

        os.kill(w.pid, signal.SIGKILL)
        t0 = time.monotonic()
        new = wait_until(lambda: f.pid(host), 60, interval=0.05, what="the restart")
        to_restart = time.monotonic() - t0
        wait_ping(app, host, 60)
        to_ping = time.monotonic() - t0
        resolved = wait_until(lambda: [r for r in catcher.received() if r.json and "RESOLVED" in r.json["title"]],
                              30, what="the RESOLVED notice")
        time.sleep(5)  # nothing else: no second restart, no second FIRING

        assert f.starts(host) == 1, "restarted exactly once"
        assert pid_alive(new) and wait_ping(app, host, 10) >= 0
        ops = [r for r in catcher.received() if r.json and r.path.startswith("/hook/")]  # one channel's view
        titles = [r.json["title"] for r in ops]
        assert len([t for t in titles if t.startswith("[FIRING") and "worker_lost" in t]) == 1, titles
        ops_resolved = [r for r in ops if "RESOLVED" in r.json["title"]]
        # resolved once, and only once the restarted worker was up (not while it failed to come back)
        assert len(ops_resolved) == 1 and all(r.at >= t0 + to_restart for r in resolved), titles

        env = psutil.Process(new).environ()
        assert env["CELERY_BROKER_URL"] == url and env["REDIS_PASSWORD"] == PASSWORD
        assert env["DATABASE_URL"] == supervisor_env["DATABASE_URL"]
        assert env[MARKER] and env["PYTHONUNBUFFERED"] == "1"
        for k in ("ALERT_URL", "HOOK_TOKEN", "SUPERVISOR_API_KEY"):
            assert k not in env, k
        assert not any(TOKEN in v or alert_url in v for v in env.values())
        out = f.output()
        assert PASSWORD not in out and TOKEN not in out
        print(f"\n[timings] README-minimal config, password broker: SIGKILL -> restart {to_restart:.2f}s, "
              f"-> ping {to_ping:.2f}s")
    finally:
        if w.poll() is None:
            w.kill()
        w.wait(10)
        app.close()


def test_what_a_worker_inherits_and_what_it_does_not(tmp_path):
    """The rule, one variable at a time (no process needed)."""
    from platforms.local_env import worker_environment

    broker = "amqp://app:Br0ker-pw-55@rabbit.internal:5672/prod"
    cfg = parse_config({
        "broker": {"url": broker, "management_url": "http://app:Br0ker-pw-55@rabbit.internal:15672"},
        "loop": {"state_path": str(tmp_path / "s.db")},
        "notify": {"channels": [{"name": "mm", "url": "mmosts://chat.example.com/abcdefghijklm"},
                                {"name": "mail", "url": "mailtos://ops:Mail-pw-77@smtp.example.com"}]},
        "platforms": {"cloudfoundry": {"api_url": "https://api.cf.example.com", "username": "ops",
                                       "password": "Cf-pass-123"}},
        "groups": [{"name": "g", "workers": ["celery@w"], "restart": {"platform": "local", "target": "celery worker"}}],
    }, env={})
    environ = {
        "CELERY_BROKER_URL": broker,                    # the broker: the worker's
        "BROKER_PASSWORD": "Br0ker-pw-55",              # its password alone (the management URL shares it)
        "PATH": "/usr/bin:/bin", "HOME": "/home/app", "LANG": "C.UTF-8", "USER": "app",
        "DATABASE_URL": "postgres://u:pw-db-1@db/x",    # the worker's own business
        "MATTERMOST_HOOK": "abcdefghijklm",             # a lower-case hook id inside a channel URL
        "MAIL_URL": "mailtos://ops:Mail-pw-77@smtp.example.com",
        "MAIL_PASSWORD": "Mail-pw-77",
        "RABBIT_MGMT": "http://app:Br0ker-pw-55@rabbit.internal:15672",  # management API: the supervisor's
        "CF_PASSWORD": "Cf-pass-123",
        "SUPERVISOR_CONFIG": "/etc/celery-supervisor/config.yaml",
        "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "LISTEN_FDS": "1",
        "DOCKER_HOST": "tcp://docker:2376", "KUBECONFIG": "/etc/kube/config",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",         # set for every pod: not the supervisor's
    }
    env, dropped = worker_environment(cfg, environ, {"KUBECONFIG": "/srv/worker-kube", "EXTRA": "1"})
    assert dropped == sorted(["MATTERMOST_HOOK", "MAIL_URL", "MAIL_PASSWORD", "RABBIT_MGMT", "CF_PASSWORD",
                              "SUPERVISOR_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "DOCKER_HOST"])
    assert env == {
        "CELERY_BROKER_URL": broker, "BROKER_PASSWORD": "Br0ker-pw-55", "PATH": "/usr/bin:/bin",
        "HOME": "/home/app", "LANG": "C.UTF-8", "USER": "app", "DATABASE_URL": "postgres://u:pw-db-1@db/x",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KUBECONFIG": "/srv/worker-kube", "EXTRA": "1",  # restart.env is applied last and wins
    }
