"""config.py: schema v1, ${ENV} interpolation, errors with their paths, secrets, file loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from supervisor import redact
from supervisor.config import ConfigError, interpolate, load_config, parse_config

MINIMAL = {"broker": {"url": "redis://localhost:6379/0"}}

FULL = {
    "broker": {"url": "redis://:${REDIS_PW}@redis.internal:6379/0", "transport_options": {"priority_steps": [0, 3]}},
    "loop": {"interval": "5s", "state_path": "/var/lib/supervisor/state.db"},
    "notify": {
        "channels": [{"name": "ops", "url": "mmosts://chat.example.com/${MATTERMOST_HOOK}",
                      "severities": ["warning", "critical"]}],
        "repeat_every": "4h",
        "send_resolved": True,
    },
    "platforms": {"systemd": {"user": True}},
    "groups": [{
        "name": "default",
        "hostnames": ["celery@default-*"],
        "workers": ["celery@default-1"],
        "min_workers": 2,
        "queues": ["default"],
        "heartbeat_timeout": "10s",
        "hung_timeout": "10m",
        "restart": {"platform": "systemd", "target": "celery-worker@{worker}.service", "max_restarts": 3,
                    "window": "30m", "backoff": "30s", "grace": "60s"},
    }],
    "queues": [{"name": "default", "warning": 1000, "critical": 10000, "for": "2m", "min_consumers": 1}],
    "http": {"listen": "127.0.0.1:9811"},
    "ha": {"lease": "auto", "lease_ttl": "15s"},
}
ENV = {"REDIS_PW": "s3cret-redis-pw", "MATTERMOST_HOOK": "hooktoken0123456789abcdef"}


def errors_of(data, env=None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        parse_config(data, env=env if env is not None else {})
    return e.value.errors


def doc(**top) -> dict:
    """MINIMAL plus top-level sections."""
    return {**copy.deepcopy(MINIMAL), **top}


def groups(*gs) -> dict:
    return doc(groups=list(gs))


def group(**kw):
    g = {"name": "web", "hostnames": ["celery@web-*"], "restart": {"platform": "systemd"}}
    g.update(kw)
    return g


class TestValid:
    def test_full_example_parses_with_the_contract_names(self):
        cfg = parse_config(FULL, env=ENV)
        g = cfg.groups[0]
        assert (g.heartbeat_timeout, g.hung_timeout) == (10, 600)
        assert (g.restart.window, g.restart.backoff, g.restart.grace, g.restart.max_restarts) == (1800, 30, 60, 3)
        assert cfg.queues[0].for_ == 120
        assert cfg.notify.repeat_every == 4 * 3600
        assert cfg.ha.lease_ttl == 15
        assert cfg.broker.is_redis
        assert cfg.broker.url.get_secret_value() == "redis://:s3cret-redis-pw@redis.internal:6379/0"
        assert cfg.broker.display_url == "redis://:****@redis.internal:6379/0"
        assert cfg.group_of("celery@default-7") is g
        assert cfg.group_of("celery@other-1") is None
        assert cfg.platform_kinds() == {"systemd"}

    def test_defaults(self):
        cfg = parse_config(MINIMAL, env={})
        assert cfg.loop.interval == 5
        assert cfg.ha.lease == "auto"
        assert cfg.notify.send_resolved is True
        assert cfg.groups == [] and cfg.queues == []

    @pytest.mark.parametrize("scheme", ["redis", "rediss", "amqp", "amqps"])
    def test_broker_schemes(self, scheme):
        parse_config({"broker": {"url": f"{scheme}://h:1/x"}}, env={})

    def test_explicit_workers_must_be_full_hostnames(self):
        errs = errors_of(groups(group(workers=["celery@web-*"])))
        assert errs[0][0] == "groups.0.workers"
        assert "full Celery hostname" in errs[0][1]

    def test_target_placeholders(self):
        parse_config(groups(group(restart={"platform": "systemd", "target": "c-{worker}-{node}@{hostname}"})),
                     env={})
        [(path, msg)] = errors_of(groups(group(restart={"platform": "systemd", "target": "c-{pod}.service"})))
        assert path == "groups.0.restart.target"
        assert "{pod}" in msg


class TestDurationsInConfig:
    @pytest.mark.parametrize("text,seconds", [
        ("3500ms", 3.5), ("10s", 10), ("5m", 300), ("1h", 3600), ("1h30m", 5400), (15, 15), (4.5, 4.5), ("7", 7),
    ])
    def test_accepted(self, text, seconds):
        cfg = parse_config(groups(group(heartbeat_timeout=3, hung_timeout=text)), env={})
        assert cfg.groups[0].hung_timeout == seconds

    @pytest.mark.parametrize("bad", ["10 parsecs", "ten", "-5s", "5s10", "", True, [1], {"s": 1}])
    def test_rejected_with_the_path(self, bad):
        errs = errors_of(groups(group(restart={"platform": "systemd", "window": bad})))
        assert [p for p, _ in errs] == ["groups.0.restart.window"]  # not groups.0.restart.systemd.window

    def test_heartbeat_timeout_floor(self):
        [(path, msg)] = errors_of(groups(group(heartbeat_timeout="500ms")))
        assert path == "groups.0" and "heartbeat_timeout" in msg

    def test_unsafe_timeouts_are_refused(self):
        """A zero ping timeout would call every silent worker lost; a hung_timeout shorter than the
        heartbeat timeout would restart a busy solo pool."""
        assert "hung_timeout" in errors_of(groups(group(heartbeat_timeout="10s", hung_timeout="5s")))[0][1]
        data = groups(group())
        data["loop"] = {"ping_timeout": 0}
        assert [p for p, _ in errors_of(data)] == ["loop.ping_timeout"]
        data = groups(group())
        data["broker"]["connect_timeout"] = 0
        assert [p for p, _ in errors_of(data)] == ["broker.connect_timeout"]


class TestInterpolation:
    def test_var_default_and_dollar(self):
        env = {"A": "x", "EMPTY": ""}
        data = {"s": "${A}-${B:-dflt}-${EMPTY:-d2}-${EMPTY}-$${A}-$$-cost $5", "n": 3, "l": ["${A}"], "k${A}": 1}
        assert interpolate(data, env) == {"s": "x-dflt-d2--${A}-$-cost $5", "n": 3, "l": ["x"], "k${A}": 1}

    def test_missing_variable_is_an_error_with_its_path(self):
        data = copy.deepcopy(FULL)
        errs = errors_of(data, env={"REDIS_PW": "pw-1234"})
        assert ("notify.channels.0.url",
                "environment variable MATTERMOST_HOOK is not set (write ${MATTERMOST_HOOK:-default} for a default)"
                ) in errs

    def test_interpolated_values_are_validated(self):
        data = doc(loop={"interval": "${TICK:-2s}"})
        assert parse_config(data, env={}).loop.interval == 2
        assert parse_config(data, env={"TICK": "30s"}).loop.interval == 30
        [(path, _)] = errors_of(data, env={"TICK": "soon"})
        assert path == "loop.interval"

    def test_uses_the_process_environment_by_default(self, monkeypatch):
        monkeypatch.setenv("CS_TEST_BROKER", "amqp://guest:guest@rabbit:5672//")
        cfg = parse_config({"broker": {"url": "${CS_TEST_BROKER}"}})
        assert cfg.broker.scheme == "amqp"


class TestErrors:
    def test_unknown_keys_are_rejected_with_their_path(self):
        data = copy.deepcopy(FULL)
        data["brokr"] = {}
        data["groups"][0]["restart"]["windw"] = "30m"
        data["queues"][0]["fro"] = "2m"
        data["notify"]["channels"][0]["sevrities"] = []
        errs = dict(errors_of(data, env=ENV))
        assert set(errs) == {"brokr", "groups.0.restart.windw", "queues.0.fro", "notify.channels.0.sevrities"}
        assert all("unknown key" in m for m in errs.values())

    def test_every_error_is_listed_at_once(self):
        data = copy.deepcopy(FULL)
        data["loop"]["interval"] = "fast"
        data["groups"][0]["restart"]["window"] = "long"
        data["groups"][0]["min_workers"] = -1
        data["queues"][0]["warning"] = "many"
        data["http"]["listen"] = "9811"
        data["ha"]["lease"] = "zookeeper"
        with pytest.raises(ConfigError) as e:
            parse_config(data, env=ENV)
        paths = [p for p, _ in e.value.errors]
        assert sorted(paths) == sorted([
            "loop.interval", "groups.0.restart.window", "groups.0.min_workers", "queues.0.warning",
            "http.listen", "ha.lease"])
        text = str(e.value)
        assert all(f"{p}: " in text for p in paths)  # one line per error, each with its path

    def test_required_and_type_errors(self):
        errs = dict(errors_of({"groups": [{"hostnames": ["x"]}]}))
        assert errs["broker"] == "required"
        assert errs["groups.0.name"] == "required"

    def test_restart_platform_errors(self):
        errs = dict(errors_of(groups(group(restart={"platform": "nomad"}))))
        [(path, msg)] = errs.items()
        assert path.startswith("groups.0.restart") and "unknown platform" in msg and "systemd" in msg
        [(path, msg)] = errors_of(groups(group(restart={"target": "x"})))
        assert path.startswith("groups.0.restart") and "platform is required" in msg

    def test_local_needs_a_command(self):
        [(path, msg)] = errors_of(groups(group(restart={"platform": "local"})))
        assert (path, msg) == ("groups.0.restart.target", "required")

    def test_cross_checks(self):
        data = groups(group(queues=["nope"]))
        data["queues"] = [{"name": "default"}]
        assert parse_config(data, env={}).groups[0].queues == ["nope"]  # issue 10: no `queues` entry needed
        errs = errors_of({**MINIMAL, "groups": [group(name="a"), group(name="a")]})
        assert errs == [("groups", "group names must be unique: a")]
        errs = errors_of({**MINIMAL, "queues": [{"name": "q", "warning": 10, "critical": 5}]})
        assert errs == [("queues.0", "warning must not be above critical")]

    def test_empty_and_non_mapping(self):
        assert errors_of(None) == [("", "the config is empty")]
        assert "mapping" in errors_of(["a"])[0][1]


class TestPlatformLibraries:
    @pytest.mark.parametrize("kind,module", [("kubernetes", "kubernetes"), ("cloudfoundry", "cloudfoundry_client")])
    def test_missing_library_names_the_pip_extra(self, kind, module, monkeypatch):
        import importlib.util
        import sys

        # the test extra installs every platform library: block this one as if it were absent
        # (None in sys.modules is Python's own "cannot be imported" marker)
        monkeypatch.setitem(sys.modules, module, None)
        assert importlib.util.find_spec(module) is None
        data = groups(group(restart={"platform": kind}))
        if kind == "cloudfoundry":
            data["platforms"] = {"cloudfoundry": {"api_url": "https://api.cf.example"}}
        errs = errors_of(data)
        assert errs == [("groups.0.restart.platform",
                         f"the {kind} adapter needs the {module!r} package: "
                         f"pip install 'celery-supervisor[{kind}]'")]

    def test_cloudfoundry_needs_its_api(self):
        errs = dict(errors_of(groups(group(restart={"platform": "cloudfoundry"}))))
        assert "api_url" in errs["groups.0.restart.platform"] or any("api_url" in m for m in errs.values())

    def test_systemd_and_local_need_nothing(self):
        parse_config(groups(group(restart={"platform": "local", "target": "celery worker -n {hostname}"})),
                     env={})


class TestSecrets:
    CF = {"api_url": "https://api.cf.example", "username": "admin", "password": "cf-Hunter2-pass"}

    def test_secret_values_are_never_shown(self):
        data = copy.deepcopy(FULL)
        data["platforms"] = {"cloudfoundry": dict(self.CF, client_secret="cf-client-SECRET-42")}
        data["broker"]["management_url"] = "http://admin:mgmt-Pass-77@rabbit:15672"
        cfg = parse_config(data, env=ENV)
        shown = "\n".join([repr(cfg), str(cfg), cfg.model_dump_json(), repr(cfg.broker), str(cfg.notify)])
        for secret in ("s3cret-redis-pw", ENV["MATTERMOST_HOOK"], "cf-Hunter2-pass", "cf-client-SECRET-42",
                       "mgmt-Pass-77"):
            assert secret not in shown
            assert secret in cfg.secrets() or any(secret in s for s in cfg.secrets())
            assert secret not in redact.scrub(f"error talking to it with {secret}!")  # registered on load

    def test_bad_value_next_to_a_password_does_not_leak(self):
        data = doc(platforms={"cloudfoundry": dict(self.CF, password="cf-NeverShow-9", timeout="10 parsecs")})
        data["broker"] = {"url": "redis://:broker-NeverShow-8@h:6379/0", "connect_timeout": "soon"}
        with pytest.raises(ConfigError) as e:
            parse_config(data, env={})
        text = str(e.value) + repr(e.value.errors)
        assert "platforms.cloudfoundry.timeout" in text and "broker.connect_timeout" in text
        assert "NeverShow" not in text

    def test_bad_broker_url_with_password_does_not_leak(self):
        [(path, msg)] = errors_of({"broker": {"url": "http://user:url-NeverShow-7@h/"}})
        assert path == "broker.url" and "NeverShow" not in msg

    def test_secret_of_the_wrong_type_does_not_leak(self):
        data = doc(platforms={"cloudfoundry": dict(self.CF, password=123456789)})
        [(path, msg)] = errors_of(data)
        assert path == "platforms.cloudfoundry.password" and "123456789" not in msg

    def test_secret_from_the_environment_in_a_bad_field_does_not_leak(self):
        # a password interpolated into the wrong place (a typo'd variable name) must not be echoed back
        data = {"broker": {"url": "redis://:${PW}@h:6379/0", "connect_timeout": "${PW}"}}
        with pytest.raises(ConfigError) as e:
            parse_config(data, env={"PW": "env-NeverShow-6"})
        assert "NeverShow" not in str(e.value)


class TestLoading:
    def test_load_valid_file(self, tmp_path: Path):
        p = tmp_path / "c.yaml"
        p.write_text("broker:\n  url: ${U:-redis://localhost:6379/0}\nloop:\n  interval: 2s\n")
        cfg = load_config(p, env={})
        assert cfg.loop.interval == 2

    def test_missing_file(self, tmp_path: Path):
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / "nope.yaml")
        assert "does not exist" in str(e.value) and "nope.yaml" in str(e.value)

    def test_directory(self, tmp_path: Path):
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path)
        assert "is a directory" in str(e.value)

    def test_unreadable(self, tmp_path: Path, monkeypatch):
        p = tmp_path / "c.yaml"
        p.write_text("broker: {url: redis://h}\n")

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("supervisor.config_file.os.open", denied)  # works as root too
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert "not readable" in str(e.value)

    def test_not_utf8(self, tmp_path: Path):
        p = tmp_path / "c.yaml"
        p.write_bytes(b"broker: {url: \xff\xfe}\n")
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert "cannot read" in str(e.value)

    def test_invalid_yaml_names_line_and_column(self, tmp_path: Path):
        p = tmp_path / "c.yaml"
        p.write_text("broker:\n  url: redis://h\n  bad: [1, 2\nloop: {}\n")
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert str(e.value).startswith("line ")
        assert e.value.source == str(p)

    def test_empty_file(self, tmp_path: Path):
        p = tmp_path / "c.yaml"
        p.write_text("# nothing\n")
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert "empty" in str(e.value)

    def test_errors_carry_the_source(self, tmp_path: Path):
        p = tmp_path / "c.yaml"
        p.write_text("broker: {url: redis://h}\nloop: {interval: 1x}\n")
        with pytest.raises(ConfigError) as e:
            load_config(p, env={})
        assert e.value.source == str(p) and e.value.errors[0][0] == "loop.interval"


def test_group_of_is_remembered_per_hostname_and_stays_bounded(monkeypatch):
    """A tick asks for the group of every worker several times: the answer is remembered, is the same
    as the rules give (explicit workers first, then the first glob), and hostnames from the broker
    (anyone can forge them) cannot grow the memory without bound."""
    import supervisor.config as config_module

    cfg = parse_config({"broker": {"url": "redis://h:6379/0"}, "groups": [
        {"name": "a", "hostnames": ["celery@web-*"]},
        {"name": "b", "hostnames": ["celery@*"], "workers": ["celery@web-9"]},
    ]}, env={})
    cases = {"celery@web-1": "a", "celery@web-9": "b", "celery@batch-1": "b", "other@web-1": None}
    for _ in range(2):  # computed, then remembered: the same answers
        assert {h: getattr(cfg.group_of(h), "name", None) for h in cases} == cases
    assert cfg.group_of(["not", "hashable"]) is None
    monkeypatch.setattr(config_module, "GROUP_CACHE", 10)
    for i in range(1000):
        assert cfg.group_of(f"celery@forged-{i}").name == "b"
    assert len(cfg.__pydantic_private__["_groups_of"]) <= 10
    assert cfg.group_of("celery@web-1").name == "a"
    other = parse_config({"broker": {"url": "redis://h:6379/0"}, "groups": [{"name": "c", "hostnames": ["*"]}]},
                         env={})
    assert other.group_of("celery@web-1").name == "c"  # one memory per config (a reload starts afresh)
