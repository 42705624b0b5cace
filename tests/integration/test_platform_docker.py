"""The docker platform for real: the docker SDK against podman's Docker-compatible API
(``bash .ci/podman-ci.sh setup``), real Celery workers running inside containers, really SIGKILLed,
the supervisor's real loop restarting them. No mocks.
"""

from __future__ import annotations

import re
import time

import pytest

import platforms.docker as docker_platform
from platforms import PlatformError
from platforms.docker import Adapter, parse_time
from supervisor.config import parse_config
from supervisor.model import RestartResult, Target
from tests.support.catchers import dead_port
from tests.support.cli import run_cli, write_config
from tests.support.fleet import Fleet, wait_until
from tests.support.podman import Containers, connect, engine_url, host_python_mounts, worker_command
from tests.support.workers import wait_ping

pytestmark = pytest.mark.redis


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine():
    client = connect()
    yield client
    client.close()


@pytest.fixture
def ctrs(engine, uid):
    c = Containers(engine, uid)
    c.remove_all()  # a previous run of this test that was cut off
    yield c
    c.remove_all()



@pytest.fixture
def adapters():
    made: list[Adapter] = []
    yield made
    for a in made:
        a.close()



def config_dict(redis_url: str, uid: str, restart: dict | None = None, *, workers=None, hostnames=None,
                base_url: str | None = None, tmp_path=None, **group) -> dict:
    restart = {"platform": "docker", "target": "cs-{node}", "max_restarts": 5, "window": "10m",
               "backoff": "100ms", "grace": "20s", "stop_timeout": "3s", **(restart or {})}
    data = {
        "broker": {"url": redis_url},
        "platforms": {"docker": {"base_url": base_url or engine_url(), "timeout": "20s"}},
        "groups": [{"name": "g", "hostnames": hostnames if hostnames is not None else [f"celery@{uid}-*"],
                    "workers": workers or [], "heartbeat_timeout": "6s", "restart": restart, **group}],
        "ha": {"lease": "off"},
    }
    if tmp_path is not None:
        data["loop"] = {"state_path": str(tmp_path / "state.db"), "interval": "1s"}
    return data


def make_adapter(adapters, data: dict):
    cfg = parse_config(data, env={})
    a = Adapter(cfg)
    adapters.append(a)
    return a, cfg.groups[0], cfg


def by_host(targets) -> dict:
    return {t.hostname: t for t in targets}


SLEEP = ["sleep", "300"]


def alive_without_action(report, host: str) -> bool:
    return any(v.hostname == host and v.status == "alive" for v in report.decision.verdicts) and not report.actions


# ---------------------------------------------------------------- inventory
def test_inventory_by_name_template_maps_states_and_hostnames(ctrs, adapters, redis_url, uid):
    a, g, _ = make_adapter(adapters, config_dict(redis_url, uid))
    h = {n: f"celery@{uid}-{n}" for n in ("a", "b", "c", "d")}
    ctrs.run(f"cs-{uid}-a", SLEEP, hostname=f"{uid}-a")
    ctrs.run(f"cs-{uid}-b", SLEEP, hostname=f"{uid}-b")
    ctrs.run(f"cs-{uid}-d", SLEEP, hostname="some-other-name")  # named by the template, not by its hostname
    ctrs.run(f"xs-{uid}-e", SLEEP, hostname=f"{uid}-e")  # not a name the template makes: not ours
    killed_at = ctrs.kill(f"cs-{uid}-b")
    ctrs.wait_dead(f"cs-{uid}-b")

    ts = a.inventory(g, [h["a"], h["b"], h["c"]])
    got = by_host(ts)
    assert set(got) == {h["a"], h["b"], h["c"], h["d"]}, ts
    assert (got[h["a"]].id, got[h["a"]].state) == (f"cs-{uid}-a", "running")
    b = got[h["b"]]
    assert (b.id, b.state) == (f"cs-{uid}-b", "exited") and b.detail.startswith("exit code 137 (SIGKILL)"), b
    # the time of death on our clock, from the engine's FinishedAt
    assert b.since is not None and killed_at - 2 < b.since <= time.time(), (killed_at, b.since)
    assert (got[h["c"]].id, got[h["c"]].state) == (f"cs-{uid}-c", "missing")
    assert "no container named" in got[h["c"]].detail
    # a container the template names whose node is only in its name (not a known hostname yet)
    assert (got[h["d"]].id, got[h["d"]].state) == (f"cs-{uid}-d", "running")
    assert all(t.id != f"xs-{uid}-e" for t in ts)
    assert a.target_for(g, h["a"]).id == f"cs-{uid}-a"


def test_inventory_by_label_selector_maps_container_hostnames(ctrs, adapters, redis_url, uid):
    sel = {"app": f"w{uid}", "tier": "celery"}
    a, g, _ = make_adapter(adapters, config_dict(redis_url, uid, {"target": None, "selector": sel, "stop_timeout": "1s"},
                                                 workers=[f"celery@{uid}-x"]))
    ctrs.run(f"cs-{uid}-one", SLEEP, hostname=f"{uid}-1", labels=sel)
    ctrs.run(f"cs-{uid}-two", SLEEP, hostname=f"{uid}-2", labels=sel)
    ctrs.run(f"cs-{uid}-odd", SLEEP, hostname="not-a-worker", labels=sel)  # in the selector, no hostname
    ctrs.run(f"cs-{uid}-half", SLEEP, hostname=f"{uid}-3", labels={"app": f"w{uid}"})  # one label only
    ctrs.run(f"cs-{uid}-other", SLEEP, hostname=f"{uid}-4")  # no labels

    # nothing known yet: hostnames come from the containers' own hostnames and the group's glob
    ts = a.inventory(g, [])
    got = by_host(ts)
    assert got[f"celery@{uid}-1"].id == f"cs-{uid}-one" and got[f"celery@{uid}-1"].state == "running"
    assert got[f"celery@{uid}-2"].id == f"cs-{uid}-two"
    assert got[None].id == f"cs-{uid}-odd"
    assert got[f"celery@{uid}-x"].state == "missing" and got[f"celery@{uid}-x"].id == f"<celery@{uid}-x>"
    assert not {f"cs-{uid}-half", f"cs-{uid}-other"} & {t.id for t in ts}
    # a known hostname is mapped through its node part, whatever its worker name
    got = by_host(a.inventory(g, [f"beat@{uid}-2"]))
    assert got[f"beat@{uid}-2"].id == f"cs-{uid}-two"
    # no name for a selector-only target before the platform is asked: describe says how to find it
    t = a.target_for(g, f"celery@{uid}-1")
    assert t.id == f"<celery@{uid}-1>"
    assert f"label=app=w{uid}" in a.describe(t) and f"hostname {uid}-1" in a.describe(t)
    # restart and logs resolve it by listing
    r = a.restart(t, "test")
    assert r.ok and not r.in_progress and f"cs-{uid}-one" in r.message, r
    r = a.restart(a.target_for(g, f"celery@{uid}-9"), "test")
    assert not r.ok and f"no container serves celery@{uid}-9" in r.message, r


# ---------------------------------------------------------------- restarts the engine makes itself
def test_a_crash_the_engine_restarts_itself_is_left_to_it(ctrs, adapters, redis_url, uid):
    a, g, _ = make_adapter(adapters, config_dict(redis_url, uid))
    name, host = f"cs-{uid}-p", f"celery@{uid}-p"
    ctrs.run(name, SLEEP, hostname=f"{uid}-p", restart_policy={"Name": "on-failure", "MaximumRetryCount": 0})
    first = parse_time(ctrs.state(name)["StartedAt"])
    died_at = ctrs.kill_host_pid(name)  # a crash: podman restarts on-failure containers 0.1-0.4 s later
    seen = by_host(a.inventory(g, [host]))[host]
    assert seen.state in ("restarting", "running"), seen  # never "exited": the engine is on it
    dead = Target(name, g.name, host, "exited", "exit code 137", died_at)
    r = a.restart(dead, "test")
    assert r.ok and r.in_progress, r
    wait_until(lambda: ctrs.state(name)["Running"] and ctrs.inspect(name)["RestartCount"] == 1, 15,
               what="podman's own restart")
    again = parse_time(ctrs.state(name)["StartedAt"])
    assert again > first
    # asked again about the same death, once the engine brought it back: nothing to do
    r = a.restart(dead, "test")
    assert r.ok and r.in_progress and "running again" in r.message, r
    time.sleep(0.5)
    assert parse_time(ctrs.state(name)["StartedAt"]) == again, "we restarted it a second time"
    assert ctrs.inspect(name)["RestartCount"] == 1


def test_a_policy_container_the_engine_did_not_restart_is_restarted_after_the_grace(
        ctrs, adapters, redis_url, uid, monkeypatch):
    monkeypatch.setattr(docker_platform, "ENGINE_GRACE", 5.0)  # the wait, not the behaviour, is shortened
    a, g, _ = make_adapter(adapters, config_dict(redis_url, uid))
    name, host = f"cs-{uid}-q", f"celery@{uid}-q"
    ctrs.run(name, SLEEP, hostname=f"{uid}-q", restart_policy={"Name": "on-failure", "MaximumRetryCount": 0})
    ctrs.kill(name)  # through the API: podman does not apply the restart policy then
    ctrs.wait_dead(name)
    t = by_host(a.inventory(g, [host]))[host]
    assert t.state == "restarting" and "left to the engine" in t.detail, t
    assert a.restart(t, "test").in_progress
    t = wait_until(lambda: (x := by_host(a.inventory(g, [host]))[host]).state == "exited" and x, 15,
                   what="the engine's grace to pass")
    assert "did not bring it back" in t.detail and t.since is not None
    r = a.restart(t, "test")
    assert r.ok and not r.in_progress and r.message.startswith(f"restarted container {name}"), r
    assert ctrs.state(name)["Running"]


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", ["socket", "tcp", "credentials"])
def test_unreachable_engine_is_a_clear_platform_error(kind, adapters, redis_url, uid, tmp_path):
    if kind == "socket":
        url, why = f"unix://{tmp_path}/no-docker.sock", "No such file or directory"
    elif kind == "tcp":
        url, why = f"tcp://127.0.0.1:{dead_port()}", "Connection refused"
    else:  # the SDK takes no user:password in a tcp URL: its own message, the password masked
        url, why = f"tcp://admin:s3cret-pw-42@127.0.0.1:{dead_port()}", "Invalid bind address format"
    a, g, cfg = make_adapter(adapters, config_dict(redis_url, uid, base_url=url, workers=[f"celery@{uid}-1"]))
    with pytest.raises(PlatformError) as e:
        a.inventory(g, [])
    msg = str(e.value)
    assert "cannot reach the Docker engine at" in msg and why in msg, msg
    assert "s3cret-pw-42" not in msg
    t = a.target_for(g, f"celery@{uid}-1")
    r = a.restart(t, "test")
    assert not r.ok and why in r.message and "s3cret-pw-42" not in r.message, r
    with pytest.raises(PlatformError):
        a.logs(t, 10)
    # describe needs no engine, names it, hides its password
    d = a.describe(t)
    assert d.startswith("docker -H ") and d.endswith(f"restart -t 3 cs-{uid}-1") and "s3cret-pw-42" not in d, d
    if kind == "credentials":
        assert "admin:****@127.0.0.1" in d

    # the loop goes on ticking and reports it as a finding
    from supervisor.loop import Supervisor

    sup = Supervisor(cfg)
    try:
        for _ in range(2):
            rep = sup.tick()
            assert why in rep.platform_errors["g"]
            assert any(f.rule == "platform_error" for f in rep.decision.findings)
        assert sup.ticks == 2
    finally:
        sup.close(flush=0.5)


def test_restart_of_a_missing_container_fails_clearly(ctrs, adapters, redis_url, uid):
    a, g, _ = make_adapter(adapters, config_dict(redis_url, uid))
    r = a.restart(a.target_for(g, f"celery@{uid}-gone"), "test")
    assert r == RestartResult(False, f"no container named 'cs-{uid}-gone' on the Docker engine at {engine_url()}")
    with pytest.raises(PlatformError, match=f"no container named 'cs-{uid}-gone'"):
        a.logs(a.target_for(g, f"celery@{uid}-gone"), 5)


# ---------------------------------------------------------------- real workers, the real loop
def test_sigkilled_worker_container_is_restarted_by_the_loop(ctrs, redis_url, uid, app, tmp_path):
    """Kill -> the loop's restart through this adapter -> the worker answers ping again, 3 times."""
    from supervisor.loop import Supervisor

    host, name = f"celery@{uid}-1", f"cs-{uid}-1"
    data = config_dict(redis_url, uid, workers=[host], tmp_path=tmp_path)
    cfg = parse_config(data, env={})
    ctrs.run_worker(name, host, redis_url, queues=f"cs-{uid}-q")
    wait_ping(app, host, 60)
    sup = Supervisor(cfg)
    sup.start()
    trials = []
    try:
        wait_until(lambda: any(v.hostname == host and v.status == "alive" for v in sup.tick().decision.verdicts),
                   30, interval=0.5, what="the supervisor to hear the worker")
        for _ in range(3):
            before = parse_time(ctrs.state(name)["StartedAt"])
            killed = ctrs.kill(name)
            ctrs.wait_dead(name)
            action = None
            deadline = time.monotonic() + 30
            while action is None and time.monotonic() < deadline:
                rep = sup.tick()
                action = next((x for x in rep.actions if x.kind == "restart"), None)
                if action is None:
                    time.sleep(0.2)
            assert action is not None, "no restart within 30s"
            issued = time.time()
            assert action.executed and action.result.startswith("ok"), action
            assert (action.target, action.hostname) == (name, host)
            assert re.fullmatch(rf"docker -H \S+ restart -t 3 {re.escape(name)}", action.command), action.command
            started = parse_time(ctrs.state(name)["StartedAt"])
            assert started > before
            pong = wait_ping(app, host, 60)
            trials.append((started - killed, issued - killed, issued - killed + pong))
            # back: the next ticks judge it alive (heartbeats after the restart), no second restart
            wait_until(lambda: alive_without_action(sup.tick(), host), 30, interval=0.5,
                       what="the worker judged alive again")
    finally:
        sup.close(flush=0.5)
    for i, (start, issued, pong) in enumerate(trials, 1):
        print(f"trial {i}: kill -> container started {start:.2f}s, tick returned {issued:.2f}s, "
              f"worker answers ping {pong:.2f}s")
    assert len(trials) == 3


def test_once_dry_run_plans_the_manual_docker_command(ctrs, redis_url, uid, app, tmp_path):
    host, name = f"celery@{uid}-1", f"cs-{uid}-1"
    path = write_config(tmp_path / "s.yaml", config_dict(redis_url, uid, workers=[host], tmp_path=tmp_path))
    ctrs.run_worker(name, host, redis_url, queues=f"cs-{uid}-q")
    wait_ping(app, host, 60)
    ctrs.kill(name)
    ctrs.wait_dead(name)
    r = run_cli("once", "-c", path, "--dry-run", "--json")
    assert r.rc == 2, r
    doc = r.json
    acts = [x for x in doc["actions"] if x["kind"] == "restart"]
    assert len(acts) == 1, doc["actions"]
    act = acts[0]
    assert (act["target"], act["hostname"], act["executed"]) == (name, host, False)
    assert act["command"] == f"docker -H {engine_url()} restart -t 3 {name}"
    w = next(x for x in doc["workers"] if x["hostname"] == host)
    assert w["platform_state"] == "exited" and not w["alive"]
    assert not ctrs.state(name)["Running"], "--dry-run restarted the container"


def test_alert_carries_the_containers_last_output_truncated(ctrs, redis_url, uid, app, tmp_path, catcher):
    """`supervisor run` (the daemon) restarts a killed container; its FIRING alert says what was done
    and shows the container's last output, cut to a sane size keeping its end."""
    host, name = f"celery@{uid}-1", f"cs-{uid}-1"
    data = config_dict(redis_url, uid, workers=[host], tmp_path=tmp_path)
    data["notify"] = {"channels": [{"name": "t", "url": f"json://127.0.0.1:{catcher.port}/alerts"}],
                      "retry": ["200ms", "500ms"]}
    # once the worker runs, 40 lines of 3000 characters and a last line: far more than an alert should carry
    worker = " ".join(worker_command(host, f"cs-{uid}-q"))
    noise = f"for i in $(seq 40); do printf 'noise%.0s' $(seq 600); echo; done; echo last-words-{uid}"
    ctrs.run(name, ["sh", "-c", f"(sleep 2; {noise}) & exec {worker}"],
             hostname=f"{uid}-1", working_dir="/app", volumes=host_python_mounts(),
             environment={"PYTHONPATH": "/app", "PYTHONUNBUFFERED": "1", "HOME": "/root",
                          "CELERY_BROKER_URL": redis_url})
    wait_until(lambda: f"last-words-{uid}".encode() in ctrs.client.api.logs(name, tail=2), 30, what="the noise")
    wait_ping(app, host, 60)
    f = Fleet(tmp_path, data).run()
    try:
        time.sleep(3)
        ctrs.kill(name)
        req = catcher.wait_for(lambda r: r.json and "FIRING" in r.json["title"] and host in r.json["title"], timeout=40)
        body = req.json["message"]
        assert f"restarted {name} through docker" in body and f"restart -t 3 {name}): ok" in body, body
        # the first line of the detail (what was done) and the END of the output are kept
        assert f"last-words-{uid}" in body, body
        assert len(body) < 4000 and "characters left out" in body, len(body)
        assert "noise" in body
        print(f"alert body ({len(body)} characters):\n{body}")
        wait_ping(app, host, 60)
    finally:
        assert f.stop() == 0, f.output()
