"""The systemd platform against a fake ``systemctl`` / ``journalctl`` first on PATH (PID 1 is not
systemd here), which really runs the units' commands: real Celery workers on a private Redis, really
SIGKILLed, brought back through ``systemctl restart`` by the adapter and by `supervisor run`."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from platforms import PlatformError
from platforms.systemd import Adapter, parse_timestamp, unit_name
from supervisor.config import ConfigError, parse_config
from tests.support.cli import CliDaemon, cli_env, run_cli, write_config
from tests.support.fleet import pid_alive, wait_until
from tests.support.systemd import FakeSystemd
from tests.support.workers import wait_ping

pytestmark = pytest.mark.redis
PY = sys.executable


@pytest.fixture
def sd(tmp_path):
    with FakeSystemd(tmp_path) as s, s.on_path():
        yield s




def make_cfg(redis_url: str, node: str, tmp_path, platform: dict | None = None, workers=(), **restart):
    data = {
        "broker": {"url": redis_url},
        "loop": {"state_path": str(tmp_path / "state.db"), "interval": "1s"},
        "groups": [{"name": "g", "hostnames": [f"*@{node}"], "workers": list(workers), "heartbeat_timeout": "6s",
                    "restart": {"platform": "systemd", "max_restarts": 3, "window": "10m", "backoff": "1s",
                                "grace": "20s", "stop_timeout": "5s", **restart}}],
    }
    if platform is not None:
        data["platforms"] = {"systemd": platform}
    return data


def adapter_for(redis_url, node, tmp_path, platform=None, **restart):
    cfg = parse_config(make_cfg(redis_url, node, tmp_path, platform, **restart), env={})
    return Adapter(cfg), cfg.groups[0]


def sleeper_unit(sd: FakeSystemd, name: str, code: str = "import time; print('up', flush=True); time.sleep(600)",
                 restart: str = "no", restart_sec: str = "100ms") -> None:
    sd.install(name, f"""[Unit]
Description=test {name}
[Service]
ExecStart={PY} -c "{code}"
Restart={restart}
RestartSec={restart_sec}
TimeoutStopSec=5
KillMode=mixed
""")


# ---------------------------------------------------------------- the fake behaves as systemctl does
def test_fake_systemctl_follows_systemd_semantics(sd):
    sleeper_unit(sd, "demo@.service")
    r = sd.systemctl("restart", "nosuch@x.service", check=False)
    assert (r.returncode, r.stderr.strip()) == (5, "Failed to restart nosuch@x.service: Unit nosuch@x.service not found.")
    r = sd.systemctl("show", "-p", "ActiveState,LoadState", "nosuch.service")
    assert (r.returncode, r.stdout) == (0, "ActiveState=inactive\nLoadState=not-found\n")
    assert sd.systemctl("is-active", "demo@a.service", check=False).returncode == 3

    sd.systemctl("restart", "demo@a.service")  # restart of a stopped unit starts it
    r = sd.systemctl("is-active", "demo@a.service", check=False)
    assert (r.returncode, r.stdout) == (0, "active\n")
    pid = sd.main_pid("demo@a.service")
    assert pid_alive(pid)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: sd.show("demo@a.service")["ActiveState"] == "failed", 10, what="failed")
    p = sd.show("demo@a.service")
    assert (p["SubState"], p["Result"], p["ExecMainCode"], p["ExecMainStatus"], p["MainPID"]) == \
        ("failed", "signal", "2", "9", "0")
    assert abs(parse_timestamp(p["ExecMainExitTimestamp"]) - time.time()) < 10
    assert sd.systemctl("is-active", "demo@a.service", check=False).returncode == 3
    log = sd.journalctl("-u", "demo@a.service", "-o", "cat", "--no-pager")
    assert log.splitlines()[-3:] == ["up", "demo@a.service: Main process exited, code=killed, status=9/KILL",
                                     "demo@a.service: Failed with result 'signal'."]
    # a graceful stop: SIGTERM is a clean end for systemd
    sd.systemctl("start", "demo@a.service")
    sd.systemctl("stop", "demo@a.service")
    p = sd.show("demo@a.service")
    assert (p["ActiveState"], p["SubState"], p["Result"]) == ("inactive", "dead", "success")


def test_fake_auto_restart_counts_restarts(sd):
    sleeper_unit(sd, "crashy.service", code="import sys; print('boom'); sys.exit(3)", restart="on-failure",
                 restart_sec="300ms")
    sd.systemctl("start", "crashy.service")
    wait_until(lambda: int(sd.show("crashy.service")["NRestarts"]) >= 2, 20, what="two automatic restarts")
    assert "Scheduled restart job, restart counter is at 2." in sd.journalctl("-u", "crashy", "-o", "cat")


# ---------------------------------------------------------------- pure mapping (no systemctl call)
def test_unit_names_from_the_template(redis_url, tmp_path, sd):
    a, g = adapter_for(redis_url, "n1", tmp_path)
    assert a.target_for(g, "w2@n1").id == "celery-worker@w2.service"
    assert unit_name("celery-{node}-{worker}", "w2@web-1") == "celery-web-1-w2.service"  # .service added
    assert unit_name("celery@{hostname}.service", "w2@n1") == "celery@w2@n1.service"
    assert unit_name("worker-{node}.scope", "w@n") == "worker-n.scope"
    with pytest.raises(PlatformError, match="not a valid unit name"):
        unit_name("celery-worker@{worker}.service", "a b/c@n1")
    assert a.describe(a.target_for(g, "w2@n1")) == "systemctl restart celery-worker@w2.service"
    a2, g2 = adapter_for(redis_url, "n1", tmp_path, platform={"host": "ops@10.0.0.5:2222", "user": True},
                         target="celery-{node}@{worker}.service")
    assert a2.describe(a2.target_for(g2, "w2@n1")) == "systemctl -H ops@10.0.0.5:2222 --user restart celery-n1@w2.service"
    assert sd.calls() == [], "describe and target_for make no call"
    for bad in ({"host": "-oProxyCommand=sh"}, {"host": "a b"}, {"timeout": "0s"}):
        with pytest.raises(ConfigError, match="platforms.systemd"):
            parse_config(make_cfg(redis_url, "n1", tmp_path, platform=bad), env={})
    with pytest.raises(ConfigError, match=r"groups\.0\.restart\.target"):
        parse_config(make_cfg(redis_url, "n1", tmp_path, target="celery worker {worker}"), env={})


# ---------------------------------------------------------------- inventory, restart, logs
def test_inventory_maps_every_unit_state_in_one_call(redis_url, tmp_path, sd):
    node = "inv"
    a, g = adapter_for(redis_url, node, tmp_path)
    sleeper_unit(sd, "celery-worker@.service")  # any long-running command will do for states
    sd.install("celery-worker@crashy.service", """[Service]
ExecStart=/bin/sh -c "echo bye; exit 3"
Restart=on-failure
RestartSec=1h
""")
    for w in ("run", "dead", "stopped", "crashy"):
        sd.systemctl("start", f"celery-worker@{w}.service")
    sd.systemctl("stop", "celery-worker@stopped.service")
    killed_at = time.time()
    os.kill(sd.main_pid("celery-worker@dead.service"), signal.SIGKILL)
    wait_until(lambda: sd.show("celery-worker@dead.service")["ActiveState"] == "failed", 10, what="failed")
    wait_until(lambda: sd.show("celery-worker@crashy.service")["SubState"] == "auto-restart", 10, what="auto-restart")
    before = len(sd.calls("show"))

    hosts = [f"{w}@{node}" for w in ("run", "dead", "stopped", "crashy", "never")]
    got = {t.hostname: t for t in a.inventory(g, hosts)}
    assert len(sd.calls("show")) == before + 1, "one systemctl show for the whole group"
    assert got["run@inv"].state == "running" and got["run@inv"].id == "celery-worker@run.service"
    assert f"pid {sd.main_pid('celery-worker@run.service')}" in got["run@inv"].detail
    dead = got["dead@inv"]
    assert (dead.state, dead.detail) == ("crashed", "failed (result signal, code=killed, status=9/KILL)")
    assert dead.since is not None and abs(dead.since - killed_at) < 3  # ExecMainExitTimestamp (1 s resolution)
    assert got["stopped@inv"].state == "exited" and "result success" in got["stopped@inv"].detail
    assert got["crashy@inv"].state == "restarting" and "restart counter 0" in got["crashy@inv"].detail
    assert "code=exited, status=3" in got["crashy@inv"].detail
    assert got["never@inv"].state == "exited" and got["never@inv"].since is None  # loaded, never started

    # a unit systemd is restarting itself is left to it
    r = a.restart(got["crashy@inv"], "test")
    assert r.ok and r.in_progress and "already restarting" in r.message
    assert not [c for c in sd.calls("restart") if "celery-worker@crashy.service" in c["units"]]


def test_restart_brings_a_killed_worker_back_and_logs_show_its_end(redis_url, tmp_path, sd, app):
    node = "rst"
    sd.install_worker_unit(redis_url, node)
    a, g = adapter_for(redis_url, node, tmp_path)
    host, unit = f"w2@{node}", "celery-worker@w2.service"
    sd.systemctl("start", unit)
    wait_ping(app, host)
    old = sd.main_pid(unit)
    os.kill(old, signal.SIGKILL)
    t = wait_until(lambda: (x := a.inventory(g, [host])[0]).state == "crashed" and x, 10, what="crashed")
    text = a.logs(t, 30)
    assert "code=killed, status=9/KILL" in text and "Failed with result 'signal'" in text
    assert len(text.splitlines()) <= 30
    assert sd.calls(prog="journalctl")[-1]["argv"] == ["-u", unit, "-n", "30", "--no-pager", "-q", "-o", "short-iso"]
    r = a.restart(t, "test")
    assert r.ok and not r.in_progress, r.message
    assert "restarted celery-worker@w2.service: active (running)" in r.message
    new = sd.main_pid(unit)
    assert new != old and pid_alive(new) and not pid_alive(old)
    wait_ping(app, host)
    assert a.inventory(g, [host])[0].state == "running"


def test_host_and_user_are_passed_to_every_call(redis_url, tmp_path, sd):
    sleeper_unit(sd, "celery-worker@.service")
    a, g = adapter_for(redis_url, "n", tmp_path, platform={"host": "ops@db-3", "user": True})
    t = a.inventory(g, ["w1@n"])[0]
    a.logs(t, 5)
    assert a.restart(t, "test").ok
    calls = sd.calls()
    assert {c["verb"] for c in calls} == {"show", "restart"}
    assert all(c["host"] == "ops@db-3" and c["user"] is True for c in calls), calls
    # journalctl has no -H: it runs on the host through ssh, non-interactively
    (remote,) = sd.calls(prog="ssh")
    assert remote["host"] == "ops@db-3" and "BatchMode=yes" in remote["options"], remote
    assert remote["command"] == ["journalctl --user -u celery-worker@w1.service -n 5 --no-pager -q -o short-iso"]
    (j,) = sd.calls(prog="journalctl")
    assert j["user"] is True and j["units"] == ["celery-worker@w1.service"]

    a2, _ = adapter_for(redis_url, "n", tmp_path, platform={"host": "ops@db-3:2222/box"})
    assert a2.journal_argv("u.service", 5)[-3:] == ["--", "ops@db-3", "journalctl -M box -u u.service -n 5 "
                                                    "--no-pager -q -o short-iso"]
    assert "-p" in a2.journal_argv("u.service", 5) and "2222" in a2.journal_argv("u.service", 5)


def test_unknown_unit_failing_missing_and_hanging_systemctl(redis_url, tmp_path, sd):
    a, g = adapter_for(redis_url, "n", tmp_path, platform={"timeout": "1s"})
    t = a.target_for(g, "nosuch@n")
    assert a.inventory(g, ["nosuch@n"])[0].state == "missing"
    r = a.restart(t, "test")
    assert not r.ok and "Unit celery-worker@nosuch.service not found." in r.message and "exit 5" in r.message

    sleeper_unit(sd, "celery-worker@.service")
    sd.fail("restart", 1, "Failed to restart celery-worker@w.service: Access denied\n"
                          "See system logs and 'systemctl status celery-worker@w.service' for details.\n")
    r = a.restart(a.target_for(g, "w@n"), "test")
    assert not r.ok and "Access denied" in r.message and "exit 1" in r.message

    sd.fail("*", 1, "System has not been booted with systemd as init system (PID 1). Can't operate.\n"
                    "Failed to connect to bus: Host is down\n")
    with pytest.raises(PlatformError, match="has not been booted with systemd.*not the init system here"):
        a.inventory(g, ["w@n"])
    sd.heal()

    sd.fail("journalctl", 1, "Failed to open journal: Permission denied\n")
    with pytest.raises(PlatformError, match="journalctl failed .*Permission denied"):
        a.logs(t, 5)
    sd.heal()

    sd.fail("show", None, sleep=5)  # a hung systemctl (ssh to a dead host) is killed after the timeout
    t0 = time.monotonic()
    with pytest.raises(PlatformError, match="did not finish within 1s"):
        a.inventory(g, ["w@n"])
    assert time.monotonic() - t0 < 4.5
    sd.heal()

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    os.environ["PATH"] = str(empty)
    with pytest.raises(PlatformError, match="systemctl not found on PATH"):
        a.inventory(g, ["w@n"])
    r = a.restart(t, "test")
    assert not r.ok and "systemctl not found on PATH" in r.message


# ---------------------------------------------------------------- the whole loop
def test_supervisor_run_restarts_a_killed_unit_and_alerts_with_its_journal(redis_url, tmp_path, uid, sd, app,
                                                                            catcher):
    node = f"{uid}"
    sd.install_worker_unit(redis_url, node, loglevel="DEBUG")  # a talkative worker: the alert truncates
    hosts = [f"w1@{node}", f"w2@{node}"]
    for h in hosts:
        sd.systemctl("start", f"celery-worker@{h.split('@')[0]}.service")
    for h in hosts:
        wait_ping(app, h)
    data = make_cfg(redis_url, node, tmp_path, workers=hosts)
    data["notify"] = {"channels": [{"name": "test", "url": f"json://127.0.0.1:{catcher.port}/alerts"}],
                      "retry": ["200ms", "500ms"]}
    cfg_path = write_config(tmp_path / "supervisor.yaml", data)
    d = CliDaemon("run", "-c", cfg_path, "--log-level", "DEBUG", log_dir=tmp_path, env=sd.env(cli_env()))
    try:
        time.sleep(3)  # steady state
        assert catcher.received() == [] and sd.calls("restart") == [], d

        unit = "celery-worker@w2.service"
        old = sd.main_pid(unit)
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: sd.calls("restart"), 30, what="systemctl restart")
        issued = time.monotonic() - t0
        wait_ping(app, hosts[1], 30)
        back = time.monotonic() - t0
        titles = lambda: [r.json["title"] for r in catcher.received() if r.json]  # noqa: E731
        wait_until(lambda: any("RESOLVED" in x and hosts[1] in x for x in titles()), 30, what="resolved")
        time.sleep(2)  # nothing else must happen

        restarts = sd.calls("restart")
        assert [c["units"] for c in restarts] == [[unit]], restarts
        new = sd.main_pid(unit)
        assert new != old and pid_alive(new)
        assert sd.show(unit)["ActiveState"] == "active"
        body = next(r.json["message"] for r in catcher.received()
                    if "worker_lost" in r.json["title"] and "FIRING" in r.json["title"])
        assert f"restarted {unit} through systemd (systemctl restart {unit}): ok" in body
        # the journal's last lines (the killed worker's own output, "...[PID]: ...", then systemd's word on its end) are
        # kept; the middle of a long output is cut (DEBUG: the worker talks a lot)
        assert "characters left out" in body and len(body) < 3500, body
        assert body.index("characters left out") < body.index(f"[{old}]: ") \
            < body.index(f"{unit}: Main process exited, code=killed, status=9/KILL") \
            < body.index(f"{unit}: Failed with result 'signal'."), body[-600:]
        assert not any(hosts[0] in x for x in titles())
        print(f"\nsystemd loop: restart issued {issued:.2f}s after SIGKILL, ping answered after {back:.2f}s")
    finally:
        d.signal(signal.SIGTERM)
        rc = d.wait(15)
        d.kill()
    assert rc == 0, d


def test_once_dry_run_plans_systemctl_restart_and_runs_nothing(redis_url, tmp_path, uid, sd, app):
    node = f"{uid}"
    sd.install_worker_unit(redis_url, node)
    unit, host = "celery-worker@w2.service", f"w2@{node}"
    sd.systemctl("start", unit)
    wait_ping(app, host)
    os.kill(sd.main_pid(unit), signal.SIGKILL)
    wait_until(lambda: sd.show(unit)["ActiveState"] == "failed", 10, what="failed")
    cfg_path = write_config(tmp_path / "s.yaml", make_cfg(redis_url, node, tmp_path, workers=[host]))
    r = run_cli("once", "-c", cfg_path, "--dry-run", "--json", env=sd.env(cli_env()))
    doc = r.json
    restarts = [x for x in doc["actions"] if x["kind"] == "restart"]
    assert len(restarts) == 1, r
    assert restarts[0]["command"] == "systemctl restart celery-worker@w2.service"
    assert (restarts[0]["target"], restarts[0]["hostname"], restarts[0]["executed"]) == (unit, host, False)
    w = next(x for x in doc["workers"] if x["hostname"] == host)
    assert w["platform_state"] == "crashed" and not w["alive"]
    assert sd.calls("restart") == [] and sd.calls("show"), "a dry run only looks"
    assert r.rc == 2, r


@pytest.mark.parametrize("failure", ["missing", "failing"])
def test_platform_error_is_a_finding_and_the_loop_goes_on(redis_url, tmp_path, uid, sd, failure):
    node = f"{uid}"
    cfg_path = write_config(tmp_path / "s.yaml", make_cfg(redis_url, node, tmp_path, workers=[f"w1@{node}"]))
    if failure == "missing":
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        env = sd.env(cli_env(), path_first=False)
        env["PATH"] = str(empty)
        expect = "systemctl not found on PATH"
    else:
        sd.fail("*", 1, "Failed to connect to bus: Permission denied\n")
        env = sd.env(cli_env())
        expect = "Failed to connect to bus: Permission denied"
    r = run_cli("once", "-c", cfg_path, "--json", env=env)
    assert expect in r.json["platform_errors"]["g"], r
    assert any(f["rule"] == "platform_error" for f in r.json["findings"]), r
    d = CliDaemon("run", "-c", cfg_path, "--log-level", "DEBUG", log_dir=tmp_path, env=env)
    try:
        wait_until(lambda: d.err.count(expect) + d.out.count(expect) >= 3, 30, what="three ticks with the error")
        assert d.alive(), d
    finally:
        d.signal(signal.SIGTERM)
        rc = d.wait(15)
        d.kill()
    assert rc == 0, d


# ---------------------------------------------------------------- the example unit, systemd's own restarts
def test_example_unit_runs_a_worker_and_systemd_restarts_it_itself(redis_url, tmp_path, uid, sd, app):
    """systemd/celery-worker@.service, with its paths pointed here: a real worker `w@%H`; after a
    SIGKILL, Restart=on-failure brings it back: the adapter reports "restarting" and leaves it alone."""
    import socket
    from pathlib import Path

    from tests.support.workers import APP_DIR

    celery_bin = Path(sys.executable).parent / "celery"
    if not celery_bin.exists():
        from tests.support.brokers import need

        need(f"the celery script next to {sys.executable}")
    text = (Path(__file__).resolve().parents[2] / "systemd" / "celery-worker@.service").read_text()
    env_file = tmp_path / "worker.env"
    env_file.write_text(f"CELERY_BIN={celery_bin}\nCELERY_APP=tasks\n"
                        f"CELERY_WORKER_OPTS=--pool solo -Q {uid}-q --without-mingle --without-gossip -l INFO\n"
                        f"CELERY_BROKER_URL={redis_url}\nPYTHONPATH={APP_DIR}\nPYTHONUNBUFFERED=1\n")
    assert "EnvironmentFile=/etc/celery/worker.env" in text and "WorkingDirectory=/opt/celery" in text
    sd.install("celery-worker@.service", text.replace("/etc/celery/worker.env", str(env_file))
               .replace("/opt/celery", str(APP_DIR)).replace("RestartSec=5s", "RestartSec=2s"))
    worker = f"{uid}w1"
    host, unit = f"{worker}@{socket.gethostname()}", f"celery-worker@{worker}.service"
    sd.systemctl("start", unit)
    wait_ping(app, host)
    props = sd.show(unit)
    assert (props["Restart"], props["KillMode"], props["TimeoutStopUSec"], props["User"]) == \
        ("on-failure", "mixed", "2min", "celery")

    cfg = parse_config(make_cfg(redis_url, socket.gethostname(), tmp_path, workers=[host]), env={})
    a, g = Adapter(cfg), cfg.groups[0]
    old = sd.main_pid(unit)
    os.kill(old, signal.SIGKILL)
    t = wait_until(lambda: (x := a.inventory(g, [host])[0]).state == "restarting" and x, 10, what="auto-restart")
    assert "systemd restarts it itself" in t.detail and "code=killed, status=9/KILL" in t.detail
    r = a.restart(t, "test")
    assert r.ok and r.in_progress, r
    wait_ping(app, host, 30)
    p = sd.show(unit)
    assert (p["ActiveState"], p["NRestarts"]) == ("active", "1") and int(p["MainPID"]) != old
    assert sd.calls("restart") == [] and a.inventory(g, [host])[0].state == "running"


def test_restart_after_systemd_hit_its_start_limit(redis_url, tmp_path, sd):
    sd.install("celery-worker@.service", f"""[Unit]
StartLimitIntervalSec=1h
StartLimitBurst=2
[Service]
ExecStart={PY} -c "import sys, time; print('starting', flush=True); time.sleep(0.3); sys.exit(1)"
Restart=on-failure
RestartSec=100ms
""")
    unit = "celery-worker@w.service"
    sd.systemctl("start", unit)
    wait_until(lambda: sd.show(unit)["Result"] == "start-limit-hit", 20, what="start-limit-hit")
    r = sd.systemctl("start", unit, check=False)
    assert r.returncode == 1 and "attempted too often" in r.stderr  # systemd refuses starts now
    a, g = adapter_for(redis_url, "n", tmp_path)
    t = a.inventory(g, ["w@n"])[0]
    assert t.state == "crashed" and "start-limit-hit" in t.detail
    r = a.restart(t, "test")
    assert r.ok and "after reset-failed" in r.message, r
    assert [c["verb"] for c in sd.calls() if c["verb"] in ("reset-failed", "restart")] == ["reset-failed", "restart"]
