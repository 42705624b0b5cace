"""The cloudfoundry platform: the real `cloudfoundry-client` library against a local CF v3 API
(tests/support/cfapi.py: Cloud Controller v3, UAA token endpoint, log-cache) on 127.0.0.1, real
Redis, and a real Celery worker playing instance 2 of an app, really SIGKILLed.

The worker is started as a CF app's start command would be: ``sh -c 'exec celery ... -n
celery@APP-$CF_INSTANCE_INDEX'`` with CF_INSTANCE_INDEX in its environment; the local CF reports the
instance CRASHED once the process died and starts a new process when the instance is terminated
(``DELETE /v3/processes/:guid/instances/:index``), as Diego would.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import threading
import time

import pytest

from platforms import PlatformError, load_adapter
from supervisor.config import parse_config
from supervisor.model import Target
from tests.support.catchers import dead_port
from tests.support.cfapi import ROLE_AUDITOR, CfApi
from tests.support.cli import cli_env, run_cli, write_config
from tests.support.workers import APP_DIR, celery_app, wait_ping, worker_argv, worker_env

pytestmark = pytest.mark.redis

PW = "cf-Pass-w0rd-7781"
CLIENT_SECRET = "cf-Client-S3cret-4410"
CLIENT = "celery-supervisor"


# ---------------------------------------------------------------- helpers
def launcher(redis_url: str, real: int, queues: str):
    """Starts instance `real` of an app as a real Celery worker named the CF way; the other
    instances run a placeholder process (a sleeping Python) to keep the machine quiet."""

    def launch(app, index: int) -> subprocess.Popen:
        env = worker_env(redis_url)
        env["CF_INSTANCE_INDEX"] = str(index)
        if index == real:
            argv = worker_argv("HOSTNAME", queues=queues)
            cmd = " ".join(shlex.quote(a) for a in argv).replace("HOSTNAME", f"celery@{app.name}-$CF_INSTANCE_INDEX")
            argv = ["sh", "-c", f"exec {cmd}"]
        else:
            argv = [sys.executable, "-c", "import time; print('placeholder instance', flush=True); time.sleep(600)"]
        return subprocess.Popen(argv, env=env, cwd=str(APP_DIR), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

    return launch


def config(cf: CfApi, tmp_path, redis_url: str = "redis://127.0.0.1:1/0", creds: dict | None = None,
           restart: dict | None = None, group: dict | None = None, notify: dict | None = None, **platform):
    creds = creds if creds is not None else {"username": "admin", "password": PW}
    data = {
        "broker": {"url": redis_url},
        "loop": {"interval": "1s", "state_path": str(tmp_path / "state.db")},
        "platforms": {"cloudfoundry": {"api_url": cf.url, "timeout": "5s", **creds, **platform}},
        "groups": [{"name": "g", "hostnames": ["celery@*"], "heartbeat_timeout": "6s",
                    "restart": {"platform": "cloudfoundry", "grace": "20s", "backoff": "1s", "window": "10m",
                                **(restart or {})}, **(group or {})}],
    }
    if notify:
        data["notify"] = notify
    return data


def adapter_for(data: dict):
    cfg = parse_config(data, env={})
    return load_adapter("cloudfoundry", cfg), cfg.groups[0]


def no_secret(text: str, cf: CfApi) -> None:
    for s in (PW, CLIENT_SECRET, *cf.issued):
        assert s not in text, f"a secret leaked: {s[:6]}..."


@pytest.fixture
def cf():
    with CfApi(users={"admin": PW, "auditor": PW}, clients={CLIENT: CLIENT_SECRET},
               roles={"auditor": ROLE_AUDITOR}) as api:
        yield api



class Ticker:
    """supervisor.loop.Supervisor ticking in a thread every loop.interval (as the daemon does)."""

    def __init__(self, sup, interval: float):
        self.sup, self.interval = sup, interval
        self.reports: list = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ticker")

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.reports.append(self.sup.tick())
            except Exception as e:  # the test fails on it below; the loop goes on as the daemon's would
                self.errors.append(e)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def start(self) -> Ticker:
        self.sup.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sup.close(flush=3.0)

    def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.sup.last_report
            if r is not None and pred(r):
                return r
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last report: "
                             f"{self.sup.last_report and json.dumps(report_doc(self.sup), default=str)[:2000]}")


def report_doc(sup) -> dict:
    from supervisor.loop import report_json

    return report_json(sup.last_report, sup.cfg)


def verdict(report, hostname: str):
    return next((v for v in report.decision.verdicts if v.hostname == hostname), None)


# ---------------------------------------------------------------- 1 + 4: the loop, end to end
def test_crashed_instance_is_restarted_through_the_loop_and_comes_back(cf, catcher, redis_url, tmp_path, uid, caplog):
    from supervisor.loop import Supervisor

    caplog.set_level(logging.DEBUG)
    name = f"{uid}app"
    host = f"celery@{name}-2"
    app = cf.add_app(name, instances=3, launch=launcher(redis_url, 2, f"{uid}-q"))
    client = celery_app(redis_url)
    wait_ping(client, host)
    # earlier output of the instance: the alert must keep the end (the crash), not this
    for i in range(120):
        cf.add_log(app, 2, f"old line {i:03d} " + "x" * 60)
    data = config(cf, tmp_path, redis_url, group={"hostnames": [f"celery@{name}-*"]},
                  notify={"channels": [{"name": "t", "url": f"json://127.0.0.1:{catcher.port}/alerts"}],
                          "retry": ["200ms"]})
    sup = Supervisor(parse_config(data, env={}))
    ticker = Ticker(sup, 1.0).start()
    try:
        ticker.wait(lambda r: (v := verdict(r, host)) is not None and v.status == "alive" and v.target is not None
                    and v.target.state == "running", 30, "the worker seen alive, its instance RUNNING")
        old = app.process("web").instances[2].proc
        t_kill = time.monotonic()
        old.kill()  # SIGKILL the worker (sh exec'd into it)
        delete = cf.wait_request("DELETE", f"/v3/processes/{app.process('web').guid}/instances/2", timeout=30)
        latency = delete.at - t_kill
        assert delete.status == 204 and delete.who == "admin"
        back = wait_ping(client, host, 30)  # the new process CF started
        cf.wait_state(app, 2, "RUNNING")
        healthy = ticker.wait(lambda r: (v := verdict(r, host)) is not None and v.status == "alive"
                    and not any(f.rule == "worker_lost" for f in r.decision.findings), 40,
                    "the worker healthy again, worker_lost resolved")
        resolved = time.monotonic() - t_kill
        catcher.wait_for(lambda r: r.json and "RESOLVED" in r.json["title"] and host in r.json["title"], timeout=30)
        time.sleep(2)  # nothing else may happen
    finally:
        ticker.stop()
    assert not ticker.errors, ticker.errors
    assert len(cf.received("DELETE")) == 1, "restarted exactly once"
    assert app.process("web").instances[2].restarts == 1
    assert all(i.restarts == 0 for i in app.process("web").instances[:2]), "the other instances were left alone"
    assert not cf.received("POST", r"/v3/apps/.*/actions/restart") and not cf.received("POST", "/v3/deployments")

    fired = next(r.json for r in catcher.received() if r.json and "FIRING" in r.json["title"]
                 and "worker_lost" in r.json["title"])
    body = fired["message"]
    assert f"(cf restart-app-instance {name} 2): ok: terminated instance 2" in body
    assert "Exit status 137" in body and "App instance exited" in body  # the crash, from log-cache
    assert "[APP/PROC/WEB/2]" in body and "[APP/PROC/WEB/0]" not in body  # this instance's lines only
    assert "characters left out" in body and "old line 000" not in body  # truncated, keeping the end
    assert len(body) < 4000
    outputs = "\n".join([*(r.text for r in catcher.received()), caplog.text,
                         *(json.dumps(report_json_of(sup, r), default=str) for r in ticker.reports[-3:])])
    no_secret(outputs, cf)
    assert healthy.decision.verdicts
    print(f"\n[cloudfoundry] SIGKILL -> DELETE /v3/processes/:guid/instances/2 received {latency:.2f}s; "
          f"DELETE -> new worker answers ping {back:.2f}s; SIGKILL -> loop sees it healthy {resolved:.2f}s "
          f"(loop.interval 1s)")


def report_json_of(sup, r) -> dict:
    from supervisor.loop import report_json

    return report_json(r, sup.cfg)


# ---------------------------------------------------------------- 2: modes, logins, errors
def test_instance_mode_inventory_describe_and_idempotence(cf, tmp_path):
    app = cf.add_app("web-app", instances=3, process_type="worker", extra_types=("web",))
    cf.set_state(app, 1, "CRASHED")
    cf.set_state(app, 2, "DOWN")
    a, g = adapter_for(config(cf, tmp_path, restart={"app": "web-app", "instance": "*-{index}"}))
    hosts = ["celery@web-app-0", "celery@web-app-1", "celery@web-app-2", "celery@web-app-5", "celery@other"]
    ts = {t.hostname: t for t in a.inventory(g, hosts)}
    assert (ts["celery@web-app-0"].id, ts["celery@web-app-0"].state) == ("web-app/0", "running")
    assert ts["celery@web-app-0"].since is not None  # from the instance's uptime
    assert (ts["celery@web-app-1"].state, ts["celery@web-app-1"].detail) == ("crashed", "CRASHED")
    assert ts["celery@web-app-1"].since is None, "dead at first sight: not witnessed, the core pings first"
    assert ts["celery@web-app-2"].state == "exited" and "DOWN" in ts["celery@web-app-2"].detail
    assert ts["celery@web-app-5"].state == "missing" and "3 instance(s)" in ts["celery@web-app-5"].detail
    assert "celery@other" not in ts  # not one of this app's hostnames: heartbeats alone judge it
    # the worker process type was picked (web is scaled to 0); describe names it
    t1 = ts["celery@web-app-1"]
    assert a.describe(t1) == "cf restart-app-instance web-app 1 --process worker"
    res = a.restart(t1, "test")
    assert res.ok and not res.in_progress, res.message
    proc_guid = app.process("worker").guid
    assert [r.path for r in cf.received("DELETE")] == [f"/v3/processes/{proc_guid}/instances/1"]
    again = a.restart(t1, "test again")  # the instance is STARTING now
    assert again.ok and again.in_progress and "STARTING" in again.message
    assert len(cf.received("DELETE")) == 1
    cf.wait_state(app, 1, "RUNNING")
    # a death after we saw it run is witnessed: `since` is set, so the core acts at once
    assert a.inventory(g, ["celery@web-app-1"])[1].state == "running"
    cf.set_state(app, 1, "CRASHED")
    t = next(t for t in a.inventory(g, ["celery@web-app-1"]) if t.hostname == "celery@web-app-1")
    assert t.state == "crashed" and t.since is not None and time.time() - t.since < 5
    # no instance 5: a clear failure, nothing sent
    res = a.restart(a.target_for(g, "celery@web-app-5"), "test")
    assert not res.ok and "no instance 5" in res.message and len(cf.received("DELETE")) == 1
    a.close()


def test_app_and_rolling_modes_make_the_right_calls(cf, tmp_path):
    cf.deploy_for = 3.0
    app = cf.add_app("apper", instances=2)
    a, g = adapter_for(config(cf, tmp_path, restart={"mode": "app"}))
    t = a.target_for(g, "celery@apper-1")
    assert t.id == "apper/1" and a.describe(t) == "cf restart apper"
    res = a.restart(t, "test")
    assert res.ok and not res.in_progress, res.message
    assert [r.path for r in cf.received("POST", r"/v3/apps/.*")] == [f"/v3/apps/{app.guid}/actions/restart"]
    # a second lost worker of the same app in the same minute: no second restart of the whole app
    again = a.restart(a.target_for(g, "celery@apper-0"), "test")
    assert again.ok and again.in_progress and len(cf.received("POST", r"/v3/apps/.*")) == 1
    assert not cf.received("DELETE") and not cf.received("POST", "/v3/deployments")

    r_app = cf.add_app("roller", instances=2)
    b, g2 = adapter_for(config(cf, tmp_path, restart={"mode": "rolling", "app": "roller", "instance": "*-{index}"}))
    t = b.target_for(g2, "celery@roller-0")
    assert b.describe(t) == "cf restart roller --strategy rolling"
    res = b.restart(t, "test: worker lost")
    assert res.ok and not res.in_progress and "rolling deployment" in res.message, res.message
    [post] = cf.received("POST", "/v3/deployments")
    assert post.body["strategy"] == "rolling"
    assert post.body["relationships"] == {"app": {"data": {"guid": r_app.guid}}}
    # another supervisor (no memory of ours) while the deployment is ACTIVE: in progress, no new deployment
    c, g3 = adapter_for(config(cf, tmp_path, restart={"mode": "rolling", "app": "roller", "instance": "*-{index}"}))
    busy = c.restart(c.target_for(g3, "celery@roller-1"), "test")
    assert busy.ok and busy.in_progress and "DEPLOYING" in busy.message, busy.message
    assert len(cf.received("POST", "/v3/deployments")) == 1
    q = cf.received("GET", "/v3/deployments")[-1].query
    assert q["app_guids"] == [r_app.guid] and q["status_values"] == ["ACTIVE"]
    for x in (a, b, c):
        x.close()


@pytest.mark.parametrize("how", ["user", "client"])
def test_login_and_login_again_after_token_expiry(cf, tmp_path, how, caplog):
    caplog.set_level(logging.DEBUG)
    cf.add_app("tok", instances=1)
    creds = {"username": "admin", "password": PW} if how == "user" else {"client_id": CLIENT,
                                                                         "client_secret": CLIENT_SECRET}
    a, g = adapter_for(config(cf, tmp_path, creds=creds))
    assert a.inventory(g, ["celery@tok-0"])[0].state == "running"
    [login] = cf.received("POST", "/oauth/token")
    if how == "user":
        assert login.body["grant_type"] == "password" and login.body["username"] == "admin"
        assert login.headers["Authorization"].startswith("Basic ")  # the `cf` client, empty secret
    else:
        assert login.body["grant_type"] == "client_credentials"
    cf.expire_tokens()
    assert a.inventory(g, ["celery@tok-0"])[0].state == "running"  # 401, then a new token, then the call
    grants = [r.body["grant_type"] for r in cf.received("POST", "/oauth/token")]
    # a user's token is refreshed by the library; client credentials carry no refresh token: log in again
    assert grants == (["password", "refresh_token"] if how == "user" else ["client_credentials"] * 2)
    assert [r.status for r in cf.received("GET", r"/v3/processes/.*/stats")] == [200, 401, 200]
    if how == "user":  # the refresh token expired too: a fresh password login
        cf.expire_tokens()
        cf.revoke_refresh_tokens()
        assert a.inventory(g, ["celery@tok-0"])[0].state == "running"
        grants = [r.body["grant_type"] for r in cf.received("POST", "/oauth/token")]
        assert grants == ["password", "refresh_token", "refresh_token", "password"]
    assert "logging in again" in caplog.text
    no_secret(caplog.text, cf)
    a.close()


def test_api_errors_are_clear_platform_errors(cf, tmp_path):
    app = cf.add_app("err", instances=2)
    a, g = adapter_for(config(cf, tmp_path))
    cf.fail_next("GET", r"/v3/processes/.*/stats", 503)
    with pytest.raises(PlatformError) as e:
        a.inventory(g, ["celery@err-1"])
    assert "503" in str(e.value) and "CF-ServiceUnavailable (10015)" in str(e.value)
    assert a.inventory(g, ["celery@err-1"])[0].state == "running"  # and the next call works

    cf.fail_next("DELETE", r"/v3/processes/.*/instances/1", 404,
                 {"errors": [{"code": 10010, "title": "CF-ResourceNotFound", "detail": "Instance not found"}]})
    res = a.restart(a.target_for(g, "celery@err-1"), "test")
    assert not res.ok and "404" in res.message and "CF-ResourceNotFound (10010): Instance not found" in res.message

    with pytest.raises(PlatformError, match=r"no app named 'nope' visible to user 'admin'"):
        a.inventory(g, ["celery@nope-1"])
    with pytest.raises(PlatformError, match="does not match restart.instance"):
        a.target_for(g, "celery@no-index-here")

    # a read-only role sees everything and restarts nothing
    ro, g_ro = adapter_for(config(cf, tmp_path, creds={"username": "auditor", "password": PW}))
    assert ro.inventory(g_ro, ["celery@err-0"])[0].state == "running"
    res = ro.restart(ro.target_for(g_ro, "celery@err-0"), "test")
    assert not res.ok and "403" in res.message and "CF-NotAuthorized (10003)" in res.message
    assert app.process("web").instances[0].restarts == 0

    bad, g_bad = adapter_for(config(cf, tmp_path, creds={"username": "admin", "password": "wrong-Pass-0001"}))
    with pytest.raises(PlatformError) as e:
        bad.inventory(g_bad, ["celery@err-0"])
    assert "login" in str(e.value) and "user 'admin'" in str(e.value) and "Bad credentials" in str(e.value)
    assert "wrong-Pass-0001" not in str(e.value)

    data = config(cf, tmp_path)
    data["platforms"]["cloudfoundry"]["api_url"] = f"http://127.0.0.1:{dead_port()}"
    down, g_down = adapter_for(data)
    t0 = time.monotonic()
    with pytest.raises(PlatformError, match="unreachable"):
        down.inventory(g_down, ["celery@err-0"])
    assert time.monotonic() - t0 < 30
    res = down.restart(down.target_for(g_down, "celery@err-0"), "test")
    assert not res.ok and "unreachable" in res.message
    assert down.describe(down.target_for(g_down, "celery@err-0")) == "cf restart-app-instance err 0"
    assert down.logs(down.target_for(g_down, "celery@err-0"), 10) == ""
    for x in (a, ro, bad, down):
        x.close()

    # credentials missing: said at once, never a traceback
    with pytest.raises(PlatformError, match="username \\+ password, or client_id \\+ client_secret"):
        adapter_for(config(cf, tmp_path, creds={}))


def test_a_slow_api_times_out(tmp_path):
    """A server that accepts and never answers: every call is bounded by platforms.cloudfoundry.timeout."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        class Fake:
            url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        a, g = adapter_for(config(Fake, tmp_path, timeout="1s"))
        t0 = time.monotonic()
        with pytest.raises(PlatformError, match="timed out"):
            a.inventory(g, ["celery@slow-0"])
        assert time.monotonic() - t0 < 15
    finally:
        srv.close()


def test_the_loop_reports_a_platform_error_and_goes_on(cf, redis_url, tmp_path, uid):
    from supervisor.loop import Supervisor

    name = f"{uid}pe"
    host = f"celery@{name}-0"
    cf.add_app(name, instances=1, launch=launcher(redis_url, 0, f"{uid}-q"))
    wait_ping(celery_app(redis_url), host)
    cf.fail_next("GET", r"/v3/processes/.*/stats", 503, n=2)
    sup = Supervisor(parse_config(config(cf, tmp_path, redis_url, group={"workers": [host]}), env={}))
    ticker = Ticker(sup, 0.5).start()
    try:
        r = ticker.wait(lambda r: "g" in r.platform_errors, 20, "a platform error")
        assert "CF-ServiceUnavailable" in r.platform_errors["g"]
        assert any(f.rule == "platform_error" for f in r.decision.findings)
        ticker.wait(lambda r: not r.platform_errors and (v := verdict(r, host)) is not None
                    and v.target is not None and v.target.state == "running", 20, "the loop going on")
    finally:
        ticker.stop()
    assert not ticker.errors and not cf.received("DELETE")


# ---------------------------------------------------------------- 3: once --dry-run --json
def test_once_dry_run_json_shows_the_cf_command(cf, redis_url, tmp_path, uid):
    name = f"{uid}dry"
    host = f"celery@{name}-2"
    app = cf.add_app(name, instances=3)
    cf.set_state(app, 2, "CRASHED")  # and no worker answers for it
    data = config(cf, tmp_path, redis_url, group={"workers": [host]})
    path = write_config(tmp_path / "cf.yaml", data)
    r = run_cli("once", "-c", path, "--dry-run", "--json", "--log-level", "DEBUG", env=cli_env(), timeout=90)
    doc = r.json
    [act] = [a for a in doc["actions"] if a["kind"] == "restart"]
    assert act["command"] == f"cf restart-app-instance {name} 2", act
    assert act["target"] == f"{name}/2" and act["hostname"] == host and act["executed"] is False
    w = next(w for w in doc["workers"] if w["hostname"] == host)
    assert w["platform_state"] == "crashed" and not w["alive"]
    assert r.rc == 2, r
    assert not cf.received("DELETE"), "a dry run restarts nothing"
    assert cf.received("GET", r"/v3/processes/.*/stats")  # it did look
    no_secret(r.out + r.err, cf)


# ---------------------------------------------------------------- the adapter alone: Target without I/O
def test_target_for_and_describe_make_no_call(cf, tmp_path):
    a, g = adapter_for(config(cf, tmp_path, restart={"app": "{worker}", "instance": "{app}@node-{index}"}))
    t = a.target_for(g, "billing@node-4")
    assert t == Target("billing/4", "g", "billing@node-4")
    assert a.describe(t) == "cf restart-app-instance billing 4"
    assert cf.requests == []
