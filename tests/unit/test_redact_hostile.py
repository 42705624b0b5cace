"""Hostile input (issue 9), the pure parts: secrets found however a URL is written, restart.env
values masked by a rule that leaves "1" and "production" alone, hostnames from the broker refused
when they could be syntax, and argvs / resource names built with the hostname as data."""

from __future__ import annotations

import base64
import json
import logging
from urllib.parse import quote, quote_plus

import pytest

from platforms import PlatformError, render_argv
from supervisor import hostnames, redact
from supervisor.config import BrokerConfig, parse_config
from supervisor.observe.celeryapp import make_app
from supervisor.observe.heartbeats import EventReceiverSource


def b64_forms(text: str) -> set[str]:
    raw = text.encode()
    out = set()
    for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        out |= {enc.decode(), enc.decode().rstrip("=")}
    return out


def leaks(text: str, secret: str, user: str | None = None) -> list[str]:
    """Which written forms of ``secret`` appear in ``text``."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), *b64_forms(secret)}
    if user is not None:
        forms |= b64_forms(f"{user}:{secret}")
    return sorted(f for f in forms if f in text)


# ---------------------------------------------------------------- URLs however written
UNPARSEABLE = [
    # (url, password, pieces a URL parser cuts it into)
    ("redis://:Sx9Kq2#Tl8Wm@127.0.0.1:6379/9", "Sx9Kq2#Tl8Wm", ["Sx9Kq2", "Tl8Wm"]),
    ("redis://:Pw7Rq1/Cd4Ef@127.0.0.1:6379/9", "Pw7Rq1/Cd4Ef", ["Pw7Rq1", "Cd4Ef"]),
    ("redis://:Qm3Zx8?Vb6Jd@127.0.0.1:6379/9", "Qm3Zx8?Vb6Jd", ["Qm3Zx8", "Vb6Jd"]),
    ("amqp://alice:Hy5Tg2#Nu7@Wk@rabbit:5672//", "Hy5Tg2#Nu7@Wk", ["Hy5Tg2", "Nu7@Wk"]),
    ("redis://:4711/Lk9Mn0@127.0.0.1:6379/0", "4711/Lk9Mn0", ["4711", "Lk9Mn0"]),  # parses, wrongly
]


@pytest.mark.parametrize("url,password,pieces", UNPARSEABLE)
def test_password_between_the_scheme_and_the_last_at_is_registered(url, password, pieces):
    redact.register_url(url)
    for secret in [password, *pieces]:
        assert redact.scrub(f"error: {secret} !") == "error: **** !", secret
    assert leaks(redact.scrub(f"{password} {quote(password, safe='')} {' '.join(b64_forms(password))}"),
                 password) == []


def test_the_issue_case_port_error_is_scrubbed():
    url = "redis://:S3CRET#tail@host:6379/9"
    redact.register_url(url)
    try:
        from urllib.parse import urlsplit

        urlsplit(url).port  # noqa: B018
    except ValueError as e:
        msg = str(e)
    assert "S3CRET" in msg  # what the leak was
    assert "S3CRET" not in redact.scrub(f"CELERY UNKNOWN - internal error: {msg}")


def test_port_error_quoting_a_short_piece_is_scrubbed_even_unregistered():
    # redis://user:pw#x@h: urllib quotes "pw": too short to register, masked by the message's shape
    assert redact.scrub("ValueError: Port could not be cast to integer value as 'pw'") == \
        "ValueError: Port could not be cast to integer value as '****'"


@pytest.mark.parametrize("text,shown", [
    ("Error connecting to redis://:p#w/x?y@host:6379/0. refused",
     "Error connecting to redis://:****@host:6379/0. refused"),
    ("url redis+socket://:sockPw1@/run/redis.sock gone", "url redis+socket://:****@/run/redis.sock gone"),
    ("sentinel://:pwA1@h1:26379;sentinel://:pwB2@h2:26379",
     "sentinel://:****@h1:26379;sentinel://:****@h2:26379"),
    ('{"url":"redis://:abcd@h","hostname":"celery@w1"}', '{"url":"redis://:****@h","hostname":"celery@w1"}'),
    ("amqp://u:a@b@rabbit//", "amqp://u:****@rabbit//"),
])
def test_unregistered_url_passwords_are_masked_up_to_the_last_at(text, shown):
    assert redact.scrub(text) == shown


def test_sentinel_urls_each_register_their_password_and_show_without_it():
    url = "sentinel://:sen-Pw-one1@h1:26379;sentinel://:sen-Pw-two2@h2:26379"
    redact.register_url(url)
    assert redact.scrub("AUTH sen-Pw-one1 / sen-Pw-two2") == "AUTH **** / ****"
    assert redact.redact_url(url) == "sentinel://:****@h1:26379;sentinel://:****@h2:26379"


def test_a_semicolon_in_a_password_stays_in_it():
    redact.register_url("sentinel://:a;b-Pass9@h1:26379")
    assert redact.scrub("pw a;b-Pass9") == "pw ****"


def test_socket_url_password_is_registered():
    redact.register_url("redis+socket://:sock-Pass-77@/tmp/redis.sock")
    assert redact.scrub("sock-Pass-77") == "****"


def test_basic_auth_and_encoded_forms_of_a_url_password_are_registered():
    redact.register_url("http://admin:Mg%23mt-Pw9@rabbit:15672/")
    pw = "Mg#mt-Pw9"
    header = "Authorization: Basic " + base64.b64encode(f"admin:{pw}".encode()).decode()
    text = redact.scrub(f"{header} {pw} {quote(pw, safe='')} {quote_plus(pw)} {json.dumps(pw)}")
    assert leaks(text, pw, user="admin") == [] and "Basic ****" in text


def test_an_email_in_a_query_does_not_make_a_port_a_secret():
    redact.register_url("https://host:8080/p?to=a@b.example", tokens=False)
    assert redact.scrub("port 8080 open") == "port 8080 open"


def test_scrub_of_hostile_worker_output_does_not_hang():
    """A worker's last output is scrubbed before it is quoted in an alert (up to 1 MB). Before, a
    200 KB line of letters took 55 s (the URL pattern backtracked at every position): a tick hung.
    Generous bound: a hang detector, not a speed measurement."""
    import time

    redact.register_secret("some-Secret-42")
    t0 = time.monotonic()
    for text in ("a" * 200_000, "a://b:" * 30_000 + "@", ("a://b:" * 80 + " @") * 400, "x://u:" + ";a://" * 40_000 + "@",
                 "netloc '" + "\\" * 100_000, "Port could not be cast to integer value as '" + "a\\'" * 50_000):
        redact.scrub(text)
    assert time.monotonic() - t0 < 20


def test_nothing_raises_on_odd_input():
    for v in (None, "", 5, "\ud800surrogate-Pw1", "redis://:\ud800x@h", "x://@", "://", "a@b", ":@"):
        redact.register_url(v)  # type: ignore[arg-type]
        redact.register_secret(v)  # type: ignore[arg-type]
    redact.scrub("\ud800 redis://:x@h")


# ---------------------------------------------------------------- restart.env values
@pytest.mark.parametrize("name,value,secret", [
    ("PYTHONUNBUFFERED", "1", False),
    ("FLAG", "true", False),
    ("ENVIRONMENT", "production", False),
    ("LOG_LEVEL", "INFO", False),
    ("DJANGO_SETTINGS_MODULE", "proj.settings.production", False),
    ("TZ", "Europe/Berlin", False),
    ("PATH", "/opt/venv/bin:/usr/bin", False),
    ("SECRET_KEY_FILE", "/run/secrets/key", False),
    ("WORKERS", "16", False),
    ("API_TOKEN", "tok-abc-123456", True),
    ("DB_PASSWORD", "sunshine", True),  # a plain word, but the name says secret
    ("SECRET_KEY", "/aB3+x9Q==", True),  # base64 that starts with "/" is no path under that name
    ("ANYTHING", "hunter2x", True),  # digits: secret by default
    ("ANYTHING", "Zq7kP0mWx", True),
    ("CELERY_BROKER_URL", "redis://:pw@h:6379/0", True),
])
def test_env_value_rule(name, value, secret):
    assert redact.env_value_is_secret(name, value) is secret


def test_registering_env_values_does_not_mask_common_text():
    for name, value in {"PYTHONUNBUFFERED": "1", "ENVIRONMENT": "production", "SPT_NOENV": "1",
                        "PYTHONPATH": "/srv/app", "MODE": "demo"}.items():
        redact.register_env(name, value)
    text = "celery@production-1 ready, 1 worker, mode demo, /srv/app/tasks.py"
    assert redact.scrub(text) == text


def test_secret_env_values_are_masked_in_worker_output():
    redact.register_env("API_TOKEN", "EnvTok-Marker-8842")
    redact.register_env("OTHER", "Xy7-opaque-Value")
    out = redact.scrub("API_TOKEN=EnvTok-Marker-8842\nOTHER=Xy7-opaque-Value\n"
                       + base64.b64encode(b"EnvTok-Marker-8842").decode())
    assert out == "API_TOKEN=****\nOTHER=****\n****"


def test_env_url_registers_its_password_not_the_whole_url():
    redact.register_env("CELERY_BROKER_URL", "redis://:Env-Brk-pw9@127.0.0.1:6379/3")
    assert redact.scrub("redis://127.0.0.1:6379/3 Env-Brk-pw9") == "redis://127.0.0.1:6379/3 ****"
    redact.register_env("SENTRY_DSN", "https://Key9abcdef123@sentry.example/42")
    assert redact.scrub("dsn https://Key9abcdef123@sentry.example/42") == "dsn ****"


def test_parse_config_registers_env_transport_options_and_cf_client_credentials():
    parse_config({
        "broker": {"url": "sentinel://:sen-Url-pw1@h1:26379;sentinel://h2:26379",
                   "transport_options": {"master_name": "mymaster",
                                         "sentinel_kwargs": {"password": "Sen-Kw-Pass-3"}}},
        "platforms": {"cloudfoundry": {"api_url": "https://api.cf.example", "client_id": "ops",
                                       "client_secret": "Cf-Client-Sec-5"}},
        "groups": [{"name": "g", "hostnames": ["celery@*"],
                    "restart": {"platform": "local", "target": "celery worker -n {hostname}",
                                "env": {"API_TOKEN": "Env-Tok-Value-7", "PYTHONUNBUFFERED": "1",
                                        "ENVIRONMENT": "production"}}}],
    }, env={})
    basic = base64.b64encode(b"ops:Cf-Client-Sec-5").decode()
    text = "sen-Url-pw1 Sen-Kw-Pass-3 Cf-Client-Sec-5 Env-Tok-Value-7 " + basic
    assert redact.scrub(text) == " ".join(["****"] * 5)
    assert redact.scrub("PYTHONUNBUFFERED=1 ENVIRONMENT=production") == "PYTHONUNBUFFERED=1 ENVIRONMENT=production"


# ---------------------------------------------------------------- hostnames from the broker
@pytest.mark.parametrize("hostname", [
    "celery@real1 --logfile=/tmp/x/injected.log", "celery@real1\t-x", "celery@real1\n--x", "celery@a'b",
    'celery@a"b', "celery@a`id`", "celery@a\\b", "celery@a\x00b", "celery@a\x1b[31m", "celery@a\u202eb",
    "celery@a\u200bb", "celery@a\u00a0b", "celery@" + "x" * 300, "", "-celery@x", "celery@-x", 5, None,
    ["celery@x"], "celery@a\ud800",
])
def test_hostile_hostnames_are_refused(hostname):
    assert hostnames.problem(hostname) is not None


@pytest.mark.parametrize("hostname", [
    "celery@web-1", "celery@ip-10-0-0-1.ec2.internal", "worker.high@host", "celery@wörker", "no-at-sign",
    "celery@" + "x" * 240, "reports@host-7", "celery@a-b_c.d:1",
])
def test_ordinary_hostnames_pass(hostname):
    assert hostnames.problem(hostname) is None


def test_refused_hostname_is_logged_once_and_never_stored(caplog):
    src = EventReceiverSource(make_app(BrokerConfig(url="redis://127.0.0.1:1/0")), clock=lambda: 1000.0)
    bad = "celery@real1 --logfile=/tmp/x/injected.log"
    with caplog.at_level(logging.WARNING, logger="supervisor.observe.heartbeats"):
        for _ in range(50):
            src._on_worker_event({"type": "worker-heartbeat", "hostname": bad, "active": 0})
        src._on_worker_event({"type": "worker-heartbeat", "hostname": ["celery@x"]})  # not even hashable
        src._on_worker_event({"type": "worker-heartbeat", "hostname": "celery@real2"})
    assert set(src.snapshot().workers) == {"celery@real2"}
    lines = [r.getMessage() for r in caplog.records if "ignored worker events" in r.getMessage()]
    assert len(lines) == 2, lines
    assert repr(bad) in lines[0] and "whitespace" in lines[0] and "\n" not in lines[0]


def test_refusals_memory_is_bounded():
    r = hostnames.Refusals(logging.getLogger("test.refusals"), "events")
    for i in range(hostnames.REMEMBER * 3):
        assert not r.accept(f"celery@x {i}")
    assert len(r._seen) == hostnames.REMEMBER and r.refused == hostnames.REMEMBER * 3


# ---------------------------------------------------------------- argv: split first, then fill
TEMPLATE = "python -m celery -A 'my proj' worker -n {hostname} --logfile='/var/log/{worker} x.log' -Q q"


def test_argv_keeps_the_hostname_one_word():
    h = "celery@real1 --logfile=/tmp/x/injected.log"
    assert render_argv(TEMPLATE, h) == [
        "python", "-m", "celery", "-A", "my proj", "worker", "-n", h, "--logfile=/var/log/celery x.log", "-Q", "q"]
    assert render_argv("run -n {hostname}", "celery@a'b \"c") == ["run", "-n", "celery@a'b \"c"]
    assert render_argv("run {{literal}} {node}", "celery@{x}") == ["run", "{literal}", "{x}"]


def test_argv_refuses_a_hostname_that_would_be_an_option_or_holds_nul():
    with pytest.raises(ValueError, match="option"):
        render_argv("run {node}", "celery@--logfile=/tmp/x")
    assert render_argv("run -n {node}", "celery@x") == ["run", "-n", "x"]
    assert render_argv("run --name={node}", "celery@-x") == ["run", "--name=-x"]  # a value, not an option
    with pytest.raises(ValueError, match="NUL"):
        render_argv("run -n {hostname}", "celery@a\x00b")


def local_adapter(target=TEMPLATE, env=None, workers=("celery@ok",)):
    from platforms.local import Adapter

    cfg = parse_config({
        "broker": {"url": "redis://127.0.0.1:6379/0"}, "loop": {"state_path": "/nonexistent/state.db"},
        "groups": [{"name": "g", "hostnames": ["celery@real*"], "workers": list(workers),
                    "restart": {"platform": "local", "target": target, "env": env or {}}}],
    }, env={})
    return Adapter(cfg), cfg.groups[0]


def test_local_argv_and_describe_treat_the_hostname_as_data():
    a, g = local_adapter(env={"API_TOKEN": "Env-Tok-Value-7", "PYTHONUNBUFFERED": "1", "ENVIRONMENT": "production"})
    h = "celery@real1 --logfile=/tmp/x/injected.log"
    assert a._argv(g.restart, h)[7] == h
    text = a.describe(a.target_for(g, h))
    assert "-n 'celery@real1 --logfile=/tmp/x/injected.log'" in text
    assert "API_TOKEN=**** PYTHONUNBUFFERED=1 ENVIRONMENT=production" in text
    assert "Env-Tok-Value-7" not in text
    with pytest.raises(PlatformError):
        a._argv(g.restart, "celery@a\x00b")
    assert a._argv_or_none(g.restart, "celery@a\x00b") is None
    b, g2 = local_adapter(target="run {node}")
    assert "cannot build the command" in b.describe(b.target_for(g2, "celery@--x"))
    res = b.restart(b.target_for(g2, "celery@--x"), "test")
    assert not res.ok and "option" in res.message


# ---------------------------------------------------------------- names built from hostnames
def test_docker_refuses_names_a_hostname_makes_invalid_without_asking_the_engine(monkeypatch):
    from platforms.docker import Adapter

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    cfg = parse_config({"broker": {"url": "redis://127.0.0.1:6379/0"},
                        "groups": [{"name": "g", "hostnames": ["celery@*"],
                                    "restart": {"platform": "docker", "target": "celery-{node}"}}]}, env={})
    a, g = Adapter(cfg), cfg.groups[0]
    assert a.target_for(g, "celery@web-1").id == "celery-web-1"
    for bad in ("celery@../../images/x", "celery@a b", "celery@a/b"):
        t = a.target_for(g, bad)
        assert t.id.startswith("<")  # no container name was built
        res = a.restart(t, "test")
        assert not res.ok and res.message.startswith("refused"), res.message
    from supervisor.model import Target

    res = a.restart(Target("../../v1/x", "g", "celery@x"), "test")
    assert not res.ok and res.message.startswith("refused"), res.message
    assert a._client_obj is None  # the engine was never asked


def test_kubernetes_refuses_pod_names_a_hostname_makes_invalid_without_asking_the_api():
    from platforms.kubernetes import Adapter
    from supervisor.model import Target

    cfg = parse_config({"broker": {"url": "redis://127.0.0.1:6379/0"},
                        "groups": [{"name": "g", "hostnames": ["celery@*"],
                                    "restart": {"platform": "kubernetes"}}]}, env={})
    a, g = Adapter(cfg), cfg.groups[0]
    assert a.pod_name(g, "celery@web-1") == "web-1"
    for bad in ("celery@Web_1", "celery@a/b", "celery@-a", "celery@a b"):
        with pytest.raises(PlatformError, match="refused"):
            a.target_for(g, bad)
    res = a.restart(Target("a/../b", "g", "celery@x"), "test")
    assert not res.ok and res.message.startswith("refused")
    assert a._client is None  # the API server was never asked


def test_cloudfoundry_refuses_an_app_name_taken_from_a_hostname_that_is_no_app_name():
    from platforms.cloudfoundry import Adapter

    cfg = parse_config({"broker": {"url": "redis://127.0.0.1:6379/0"},
                        "platforms": {"cloudfoundry": {"api_url": "https://api.cf.example", "username": "u",
                                                       "password": "pw-Secret-123"}},
                        "groups": [{"name": "g", "hostnames": ["*@*"], "restart": {"platform": "cloudfoundry"}}]},
                       env={})
    a, g = Adapter(cfg), cfg.groups[0]
    assert a.locate(g, "celery@billing-3") == ("billing", 3)
    for bad in ("celery@billing,payroll-3", "celery@a b-3", "celery@a/b-3"):
        with pytest.raises(PlatformError, match="refused"):
            a.locate(g, bad)


def test_systemd_refuses_an_invalid_unit_without_running_systemctl():
    from platforms.systemd import Adapter, unit_name
    from supervisor.model import Target

    cfg = parse_config({"broker": {"url": "redis://127.0.0.1:6379/0"},
                        "groups": [{"name": "g", "hostnames": ["celery@*"], "restart": {"platform": "systemd"}}]},
                       env={})
    a = Adapter(cfg)
    with pytest.raises(PlatformError, match="not a valid unit name"):
        unit_name("celery-worker@{node}.service", "celery@a b")
    res = a.restart(Target("celery-worker@a b.service", "g", "celery@a b"), "test")
    assert not res.ok and res.message.startswith("refused")
    with pytest.raises(PlatformError, match="refused"):
        a.logs(Target("-x.service", "g", "celery@x"))
