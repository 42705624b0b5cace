"""http.token and http.allow_unauthenticated: the config refuses a non-loopback listen without either
(error at http.listen); with a token, every path but /healthz needs it, as a bearer token or the
password of basic auth (a real HttpServer on a loopback port, real HTTP requests); the token is
registered as a secret and appears in no answer."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from supervisor import redact
from supervisor.config import ConfigError, parse_config
from supervisor.http import HttpServer, authorized

TOKEN = "Zr7-status-page-token-x41"
BASE = {"broker": {"url": "redis://127.0.0.1:6379/0"}, "groups": [{"name": "g", "hostnames": ["celery@x-*"]}]}


def cfg(**http):
    return parse_config({**BASE, "http": http}, env={})


def errors(**http) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        cfg(**http)
    return e.value.errors


# ---------------------------------------------------------------- config: safe by default
@pytest.mark.parametrize("listen", ["0.0.0.0:9811", ":9811", "[::]:9811", "10.1.2.3:9811", "web-1.example:9811"])
def test_a_non_loopback_listen_needs_a_token_or_an_explicit_opt_out(listen):
    errs = errors(listen=listen)
    assert [p for p, _ in errs] == ["http.listen"], errs
    assert "http.token" in errs[0][1] and "allow_unauthenticated" in errs[0][1]
    assert cfg(listen=listen, token=TOKEN).http.listen == listen
    assert cfg(listen=listen, allow_unauthenticated=True).http.token is None


@pytest.mark.parametrize("listen", ["127.0.0.1:9811", "127.0.0.2:1", "[::1]:9811", "localhost:9811"])
def test_loopback_needs_nothing(listen):
    c = cfg(listen=listen)
    assert c.http.token is None and not c.http.allow_unauthenticated


def test_default_is_off_and_a_short_token_is_refused():
    assert cfg().http.listen is None
    errs = errors(listen="0.0.0.0:9811", token="short")
    assert [p for p, _ in errs] == ["http.token"], errs  # one problem, one error: not also http.listen


def test_the_token_is_a_registered_secret():
    c = cfg(listen="0.0.0.0:9811", token=TOKEN)
    assert TOKEN not in repr(c) and TOKEN not in str(c.http)
    assert TOKEN in c.secrets()
    assert TOKEN not in redact.scrub(f"Authorization: Bearer {TOKEN}")
    # also when the rest of the config is invalid (the messages are scrubbed before they are shown)
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "loop": {"interval": f"{TOKEN}"}, "http": {"token": TOKEN}}, env={})
    assert TOKEN not in str(e.value)


# ---------------------------------------------------------------- the header check itself
def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_authorized_accepts_bearer_and_basic_only_with_the_token():
    assert authorized(None, None) and authorized("anything", None)  # no token configured
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer   {TOKEN} ", TOKEN)
    assert authorized(basic("ops", TOKEN), TOKEN) and authorized(basic("", TOKEN), TOKEN)
    for bad in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}",
                basic(TOKEN, "x"), basic("ops", TOKEN + "x"), "Basic !!!notbase64", "Basic " + "é",
                f"Bearer {TOKEN}\u00e9", basic("ops", ""), TOKEN):
        assert not authorized(bad, TOKEN), bad


# ---------------------------------------------------------------- a real server with a token
@pytest.fixture
def server():
    doc = {"time": 1.0, "workers": [{"hostname": "celery@x-1", "group": "g", "status": "alive"}]}
    s = HttpServer("127.0.0.1:0", CollectorRegistry(), lambda: (True, "ok: fine"), lambda: doc,
                   token=lambda: TOKEN).start()
    yield f"http://127.0.0.1:{s.port}"
    s.stop()


def get(url: str, auth: str | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_every_path_but_healthz_needs_the_token(server):
    for path in ("/", "/status", "/metrics", "/page/app.js", "/page/style.css", "/nope"):
        code, body, headers = get(server + path)
        assert code == 401, (path, code)
        assert headers["WWW-Authenticate"].startswith("Basic realm=")  # a browser asks for it
        assert get(server + path, f"Bearer {TOKEN}x")[0] == 401
        assert get(server + path, basic("ops", "wrong-token-wrong-token"))[0] == 401
    assert get(server + "/healthz")[0] == 200  # liveness probes carry no token
    code, body, _ = get(server + "/status", f"Bearer {TOKEN}")
    assert code == 200 and json.loads(body)["workers"][0]["hostname"] == "celery@x-1"
    code, body, headers = get(server + "/", basic("ops", TOKEN))
    assert code == 200 and "<title>celery-supervisor</title>" in body
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]  # the page runs only its own script
    for path in ("/page/app.js", "/page/style.css"):
        code, body, _ = get(server + path, basic("ops", TOKEN))
        assert code == 200 and TOKEN not in body
    assert "http" not in get(server + "/", basic("ops", TOKEN))[1].split("<script", 1)[1].split(">")[0]  # no CDN


def test_without_a_token_the_page_is_served(tmp_path):
    s = HttpServer("127.0.0.1:0", CollectorRegistry(), lambda: (True, "ok"), lambda: {}).start()
    try:
        code, body, _ = get(f"http://127.0.0.1:{s.port}/")
        assert code == 200 and 'src="/page/app.js"' in body
    finally:
        s.stop()
