"""The cloudfoundry adapter's pure parts: hostname -> app/instance, describe(), config checks, log
lines. No network: the adapter logs in only on its first API call."""

from __future__ import annotations

import base64

import pytest

from platforms import PlatformError
from platforms.cloudfoundry import Adapter, _log_line, _Pattern
from supervisor.config import ConfigError, parse_config


def cfg(restart: dict | None = None, **creds):
    creds = creds or {"username": "u", "password": "pw-Secret-123"}
    return parse_config({
        "broker": {"url": "redis://127.0.0.1:6379/0"},
        "platforms": {"cloudfoundry": {"api_url": "https://api.cf.example/", **creds}},
        "groups": [{"name": "g", "hostnames": ["*@*"], "restart": {"platform": "cloudfoundry", **(restart or {})}}],
    }, env={})


def adapter(restart: dict | None = None, **creds):
    c = cfg(restart, **creds)
    return Adapter(c), c.groups[0]


@pytest.mark.parametrize("restart,hostname,expected", [
    ({}, "celery@my-worker-2", ("my-worker", 2)),  # default "*@{app}-{index}"
    ({}, "celery@my-worker-12", ("my-worker", 12)),
    ({}, "beat@a-b-c-0", ("a-b-c", 0)),
    ({"app": "billing"}, "celery@billing-3", ("billing", 3)),
    ({"app": "{worker}", "instance": "{app}@host-{index}"}, "reports@host-7", ("reports", 7)),
    ({"app": "fixed", "instance": "*.{index}"}, "celery@anything.4", ("fixed", 4)),
])
def test_hostname_to_app_and_instance(restart, hostname, expected):
    a, g = adapter(restart)
    assert a.locate(g, hostname) == expected
    t = a.target_for(g, hostname)
    assert (t.id, t.hostname, t.state) == (f"{expected[0]}/{expected[1]}", hostname, "unknown")


@pytest.mark.parametrize("restart,hostname", [
    ({}, "celery@noindex"),
    ({"app": "billing"}, "celery@other-3"),  # {app} must read the app's name
    ({}, "celery@w-2x"),
])
def test_hostname_that_does_not_fit_says_how_to_name_workers(restart, hostname):
    a, g = adapter(restart)
    with pytest.raises(PlatformError) as e:
        a.target_for(g, hostname)
    assert "does not match restart.instance" in str(e.value) and "$CF_INSTANCE_INDEX" in str(e.value)


def test_pattern_renders_hostnames_only_without_wildcards():
    assert _Pattern("celery@{app}-{index}", "w").render("w", 3) == "celery@w-3"
    assert _Pattern("*@{app}-{index}", "w").render("w", 3) is None


@pytest.mark.parametrize("mode,command", [
    ("instance", "cf restart-app-instance 'my app' 2"),
    ("app", "cf restart 'my app'"),
    ("rolling", "cf restart 'my app' --strategy rolling"),
])
def test_describe_per_mode(mode, command):
    a, g = adapter({"mode": mode, "app": "my app", "instance": "*-{index}"})
    assert a.describe(a.target_for(g, "celery@x-2")) == command


def test_describe_names_a_process_type_other_than_web():
    a, g = adapter({"process": "worker"})
    assert a.describe(a.target_for(g, "celery@w-1")) == "cf restart-app-instance w 1 --process worker"


@pytest.mark.parametrize("restart,path,words", [
    ({"instance": "celery@w-{node}"}, "groups.0.restart.instance", "unknown placeholder {node}"),
    ({"instance": "celery@w"}, "groups.0.restart.instance", "{index} exactly once"),
    ({"instance": "celery@w-{index}"}, "groups.0.restart", "set app"),
    ({"target": "x"}, "groups.0.restart", "not target"),
    ({"app": "{nope}"}, "groups.0.restart.app", "unknown placeholder {nope}"),
])
def test_config_errors_are_clear(restart, path, words):
    with pytest.raises(ConfigError) as e:
        cfg(restart)
    assert any(p == path and words in m for p, m in e.value.errors), e.value.errors


def test_credentials_are_checked_and_never_shown():
    with pytest.raises(PlatformError, match="username and password go together"):
        adapter(username="u")
    with pytest.raises(PlatformError, match="client_id \\+ client_secret"):
        adapter(client_id="c")
    a, _ = adapter(client_id="c", client_secret="cs-Secret-456")
    assert a.grant == "client_credentials"
    with pytest.raises(ConfigError) as e:
        cfg(api_url="api.cf.example", username="u", password="pw-Secret-123")
    assert "pw-Secret-123" not in str(e.value)


def _env(source: str, instance: str, text: str, ts: int = 1_700_000_000_000_000_000) -> dict:
    return {"timestamp": str(ts), "instance_id": instance, "tags": {"source_type": source},
            "log": {"payload": base64.b64encode(text.encode()).decode(), "type": "ERR"}}


def test_log_lines_keep_this_instance_and_the_platform():
    assert _log_line(_env("APP/PROC/WEB", "2", "boom\n"), 2) == "2023-11-14T22:13:20.00+0000 [APP/PROC/WEB/2] ERR boom"
    assert _log_line(_env("APP/PROC/WEB", "1", "other"), 2) is None
    assert _log_line(_env("CELL", "2", "stopping"), 2) is not None
    assert _log_line(_env("API", "0", "App instance exited"), 2) is not None  # the API's own index
    assert _log_line(_env("RTR", "2", "GET / 200"), 2) is None
    assert _log_line({"timestamp": "1", "gauge": {}}, 2) is None
