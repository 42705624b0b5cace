"""A forged worker event with a hostile hostname injects nothing (issue 9).

Anyone who can publish to the broker can send a `worker-heartbeat` under any hostname, and a glob
such as ``celery@real*`` matches it. Here the events are published through celery's own event
dispatcher on a real Redis, the real supervisor (`supervisor run`) watches a group on the local
platform, a real worker of the group is SIGKILLed and restarted beside them, and nothing the forged
hostnames hold may reach an argv: no file they name is created, no process or pid file appears for
them, the real worker comes back with its own argv, and each hostile hostname is logged once.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time

import pytest

from tests.support.cli import kill_pids, pidfile_pids, pids_with_arg, run_cli, write_config
from tests.support.fleet import Fleet, local_restart, pid_alive, wait_until
from tests.support.workers import wait_ping, worker_argv

pytestmark = pytest.mark.redis


def forge(app, hostnames: list[str], seconds: float, stop: threading.Event) -> int:
    """Publish worker-online then a worker-heartbeat every second under each hostname, through
    celery's own EventDispatcher, for ``seconds``; never a worker-offline (they "die"). Returns the
    number of events sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    first = True
    while time.monotonic() < deadline and not stop.is_set():
        for h in hostnames:
            with app.events.default_dispatcher(hostname=h) as d:
                if first:
                    d.send("worker-online", freq=2.0, sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
                d.send("worker-heartbeat", freq=2.0, active=0, processed=0, loadavg=[0.0, 0.0, 0.0],
                       sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
                sent += 1
        first = False
        stop.wait(1.0)
    return sent


def test_forged_heartbeats_with_hostile_hostnames_inject_nothing(redis_url, tmp_path, uid, fleets):
    real = f"celery@real-{uid}-1"
    injected = tmp_path / "injected.log"
    hostile = [
        f"celery@real-{uid}-2 --logfile={injected}",  # whitespace: an extra argument before the fix
        f"celery@real-{uid}-3\n--logfile={injected}",  # a control character
        f"celery@real-{uid}-4 '--logfile={tmp_path / 'quoted x.log'}'",  # quotes
        f"celery@real-{uid}-5\u202e--logfile={injected}",  # an invisible (format) character
        f"celery@real-{uid}-" + "x" * 300,  # absurdly long
    ]
    f = Fleet(tmp_path, {
        "broker": {"url": redis_url},
        "groups": [{"name": "g", "hostnames": [f"celery@real-{uid}*"], "heartbeat_timeout": "4s",
                    "restart": local_restart(redis_url, queues=f"{uid}-q", grace="5s")}],
        "ha": {"lease": "off"},
    })
    fleets.append(f)
    app = f.start_workers(real)
    expected_argv = worker_argv(real, queues=f"{uid}-q")
    first_pid = f.pid(real)
    f.run()
    wait_until(lambda: "listening to worker heartbeats" in f.output(), 60, what="the supervisor listening")

    stop = threading.Event()
    forger = threading.Thread(target=lambda: forge(app, hostile, 5.0, stop), daemon=True)
    forger.start()
    f.kill(real)  # a real death beside the forged ones: the loop acts on it
    forger.join(30)
    last_forged = time.monotonic()

    wait_until(lambda: (p := f.pid(real)) != first_pid and p and pid_alive(p), 60, what="the real worker restarted")
    wait_ping(app, real, 30)
    # long enough for a forged worker to be judged lost (heartbeat_timeout 4s, a failed ping) and
    # restarted, as it was before the fix
    time.sleep(max(0.0, last_forged + 15 - time.monotonic()))
    out = f.output()
    assert f.stop() == 0

    assert not injected.exists() and not (tmp_path / "quoted x.log").exists()
    tid = f.target(real).id
    assert sorted(p.name for p in f.run_dir.iterdir() if not p.name.startswith(tid + ".")) == []  # no target
    assert not pids_with_arg(f"--logfile={injected}")
    pf = json.loads((f.run_dir / f"{f.target(real).id}.pid").read_text())
    assert pf["argv"] == expected_argv and pf["hostname"] == real
    for h in hostile:
        lines = [ln for ln in out.splitlines() if "ignored worker events from hostname" in ln and repr(h)[:60] in ln]
        assert len(lines) == 1, (h, lines)
    assert "Traceback" not in out


def test_a_hostname_with_spaces_is_refused_by_the_config_and_stays_one_argv_word(redis_url, tmp_path, uid):
    """An explicit ``workers:`` entry with a space is refused by check-config (its events would be
    refused: it could never be seen alive). Should such a hostname reach the local platform anyway,
    it is data: the command gets it as one word, and what it spells is not an option."""
    from platforms.local import Adapter
    from supervisor.config import load_config
    from supervisor.model import Target

    injected = tmp_path / "injected-cfg.log"
    hostname = f"celery@cfg-{uid} --logfile={injected}"
    out = tmp_path / "argv.json"
    code = "import json,os,sys,time; json.dump(sys.argv[1:], open(os.environ['ARGV_OUT'], 'w')); time.sleep(120)"
    doc = {
        "broker": {"url": redis_url},
        "loop": {"state_path": str(tmp_path / "state.db")},
        "groups": [{"name": "g", "workers": [hostname], "heartbeat_timeout": "3s",
                    "restart": {"platform": "local", "target": shlex.join([sys.executable, "-c", code]) + " -n {hostname}",
                                "env": {"ARGV_OUT": str(out)}}}],
        "ha": {"lease": "off"},
    }
    r = run_cli("check-config", "-c", write_config(tmp_path / "bad.yaml", doc), timeout=30)
    assert r.rc == 2 and "groups.0.workers: " in r.err and "cannot be a Celery hostname (holds whitespace)" in r.err, r
    assert "Traceback" not in r.out + r.err
    doc["groups"][0]["workers"] = [f"celery@cfg-{uid}"]
    adapter = Adapter(load_config(write_config(tmp_path / "good.yaml", doc)))
    run_dir = tmp_path / "supervisor-local"
    try:
        res = adapter.restart(Target(id="x", group="g", hostname=hostname), "test")
        assert res.ok, res
        assert f"-n '{hostname}'" in adapter.describe(Target(id="x", group="g", hostname=hostname))
        wait_until(out.exists, 30, what="the started command writing its argv")
        assert json.loads(out.read_text()) == ["-n", hostname]
        assert not injected.exists()
    finally:
        kill_pids(pidfile_pids(run_dir))
        adapter.close()
    assert not [p for p in pidfile_pids(run_dir) if pid_alive(p)]

