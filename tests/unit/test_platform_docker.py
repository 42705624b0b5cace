"""The docker adapter's pure parts: inspect documents -> states, name templates, describe().
No engine here (tests/integration/test_platform_docker.py drives a real one); the documents below
have the shape podman 4.3's Docker API returns (measured), trimmed to the fields that matter."""

from __future__ import annotations

import pytest

from platforms.docker import (
    ENGINE_GRACE,
    Adapter,
    container_state,
    engine_restarts,
    exit_detail,
    literal_workers,
    parse_time,
    template_regex,
)
from supervisor.config import ConfigError, parse_config

NOW = 1_800_000_000.0


def stamp(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def doc(running=False, status="exited", code=0, finished=NOW - 60, started=NOW - 120, policy="no",
        retries=0, restart_count=0, **state) -> dict:
    return {
        "Name": "/celery-w1",
        "Config": {"Hostname": "w1"},
        "RestartCount": restart_count,
        "HostConfig": {"RestartPolicy": {"Name": policy, "MaximumRetryCount": retries}},
        "State": {"Status": status, "Running": running, "Paused": False, "Restarting": False, "OOMKilled": False,
                  "ExitCode": code, "Error": "", "StartedAt": stamp(started),
                  "FinishedAt": stamp(finished) if finished else "0001-01-01T00:00:00Z", **state},
    }


def test_parse_time_reads_engine_timestamps():
    assert parse_time("2026-11-22T15:40:27.628614554Z") == pytest.approx(1795362027.628614, abs=1e-5)
    assert parse_time("2026-11-22T16:40:27+01:00") == parse_time("2026-11-22T15:40:27Z")
    assert parse_time("0001-01-01T00:00:00Z") is None  # Go's zero time: never
    assert parse_time("") is None and parse_time(None) is None and parse_time("yesterday") is None


def test_exit_detail_names_the_signal_and_oom():
    assert exit_detail(137) == "exit code 137 (SIGKILL)"
    assert exit_detail(143, oom=False) == "exit code 143 (SIGTERM)"
    assert exit_detail(1) == "exit code 1"
    assert exit_detail(137, oom=True, error="boom") == "exit code 137 (SIGKILL), OOM killed: boom"


def test_running_state_uses_state_running_not_status():
    # podman reports Status "stopped" for a moment after a crash; Running is what counts
    assert container_state(doc(running=False, status="stopped", code=137), NOW)[:2] == \
        ("exited", "exit code 137 (SIGKILL)")
    state, detail, since = container_state(doc(running=True, status="running", Health={"Status": "unhealthy"}), NOW)
    assert (state, detail) == ("running", "running, health unhealthy")
    assert since == pytest.approx(NOW - 120, abs=1e-3)


def test_dead_container_since_is_its_finish_time_never_in_our_future():
    assert container_state(doc(code=137), NOW)[2] == pytest.approx(NOW - 60, abs=1e-3)
    # an engine clock ahead of ours: the death is "now", not in the future
    assert container_state(doc(code=137, finished=NOW + 30), NOW)[2] == NOW


def test_created_and_removing_containers():
    assert container_state(doc(status="created", finished=None), NOW) == ("exited", "created, never started", None)
    assert container_state(doc(status="removing"), NOW)[0] == "stopping"


def test_engine_restarting_flag_wins():
    d = doc(status="restarting", code=1, restart_count=3, Restarting=True)
    assert container_state(d, NOW)[0] == "restarting"


@pytest.mark.parametrize("policy,code,retries,count,expected", [
    ("no", 137, 0, 0, None),
    ("always", 0, 0, 0, "always"),
    ("unless-stopped", 137, 0, 0, "unless-stopped"),
    ("on-failure", 137, 0, 4, "on-failure (restart 5)"),
    ("on-failure", 137, 3, 1, "on-failure (restart 2 of 3)"),
    ("on-failure", 137, 3, 3, None),  # retries used up: the engine gave up, we restart
    ("on-failure", 0, 0, 0, None),  # a clean exit is no failure
])
def test_engine_restart_policies(policy, code, retries, count, expected):
    assert engine_restarts(doc(code=code, policy=policy, retries=retries, restart_count=count)) == expected


def test_a_crash_under_a_restart_policy_is_the_engines_for_a_grace():
    fresh = doc(code=137, policy="on-failure", finished=NOW - 0.3)
    state, detail, since = container_state(fresh, NOW)
    assert (state, since) == ("restarting", None) and "left to the engine" in detail
    stale = doc(code=137, policy="on-failure", finished=NOW - ENGINE_GRACE - 1)
    state, detail, since = container_state(stale, NOW)
    assert state == "exited" and "did not bring it back" in detail and since == pytest.approx(NOW - ENGINE_GRACE - 1)


def test_template_regex_inverts_name_templates():
    m = template_regex("celery-{node}").fullmatch("celery-web-1")
    assert m and m.group("node") == "web-1"
    assert template_regex("celery-{node}").fullmatch("other-web-1") is None
    m = template_regex("{worker}.{node}").fullmatch("beat.web-1")
    assert m and (m.group("worker"), m.group("node")) == ("beat", "web-1")
    assert template_regex("x-{node}-{node}").fullmatch("x-a-a") and not template_regex("x-{node}-{node}").fullmatch("x-a-b")


def cfg(restart: dict, platforms: dict | None = None, **group):
    data = {"broker": {"url": "redis://127.0.0.1:6379/0"},
            "groups": [{"name": "g", "hostnames": ["celery@web-*", "*@any-*"], **group,
                        "restart": {"platform": "docker", **restart}}]}
    if platforms:
        data["platforms"] = {"docker": platforms}
    return parse_config(data, env={})


def test_literal_workers_come_from_globs_and_explicit_workers():
    c = cfg({"target": "c-{node}"}, workers=["beat@web-9"])
    assert literal_workers(c.groups[0]) == ["beat", "celery"]


def test_docker_restart_needs_a_target_or_a_selector():
    with pytest.raises(ConfigError) as e:
        cfg({})
    assert "groups.0.restart" in str(e.value) and "target" in str(e.value) and "selector" in str(e.value)
    assert cfg({"selector": {"app": "celery"}}).groups[0].restart.target is None


def test_describe_is_the_manual_command_without_io_or_secrets(monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    c = cfg({"target": "celery-{node}", "stop_timeout": "2.5s"})
    a = Adapter(c)  # builds no client: describe() and target_for() never call the engine
    assert a.describe(a.target_for(c.groups[0], "celery@web-1")) == "docker restart -t 3 celery-web-1"
    c = cfg({"target": "celery-{node}"}, {"base_url": "unix:///var/run/docker.sock"})
    assert Adapter(c).describe(Adapter(c).target_for(c.groups[0], "celery@web-1")) == \
        "docker restart -t 10 celery-web-1"
    c = cfg({"target": "celery-{node}"}, {"base_url": "ssh://deploy:hunter2-secret@build.example.com"})
    text = Adapter(c).describe(Adapter(c).target_for(c.groups[0], "celery@web-1"))
    assert text == "docker -H 'ssh://deploy:****@build.example.com' restart -t 10 celery-web-1"
    c = cfg({"selector": {"app": "celery"}})
    text = Adapter(c).describe(Adapter(c).target_for(c.groups[0], "celery@web-1"))
    assert text.startswith("docker restart -t 10 <the container with labels app=celery and hostname web-1")
