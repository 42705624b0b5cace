"""The systemd platform against the real systemctl and journalctl: systemd 252 as PID 1 in a podman
container (.ci/systemd-ci.sh), real Celery workers from systemd/celery-worker@.service installed as
README "Installing the worker unit" says, and the supervisor running there as its own unit
(systemd/celery-supervisor.service, user celery-supervisor) with the README's polkit rule and
journal access. Workers and supervisor reach this test's private Redis on 127.0.0.1 (the container
shares the host's network); alerts go to this test's HTTP catcher; SIGKILLs are real.

The tests of this module run in order on one container (booting and installing once takes ~20 s).
Instance drop-ins change what each test needs of systemd's own restarts (Restart=no: the restart
is the supervisor's; Restart=always: systemd's).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

import pytest

from tests.support.brokers import free_port, private_redis
from tests.support.catchers import HttpCatcher
from tests.support.fleet import wait_until
from tests.support.systemd_real import (
    install_supervisor,
    install_workers,
    module_container,
    readme_block,
    shell_lines,
)
from tests.support.workers import APP_DIR, celery_app, wait_ping

pytestmark = [pytest.mark.redis, pytest.mark.slow]
HOST = "sdworkers"  # the container's hostname: %H in `-n %i@%H`
SUP = "celery-supervisor.service"
KILLS = 6  # one more than the template's StartLimitBurst=5
CRASH_MARKER = "/opt/celery/crash-on-start"
RULE = "/etc/polkit-1/rules.d/50-celery-supervisor.rules"
APP = f"""# the workers' app (CELERY_APP=proj): tests/support/app/tasks.py, and a way to crash at start
import os
import sys

if os.path.exists({CRASH_MARKER!r}):
    print("proj: {CRASH_MARKER} exists: exiting with 3", flush=True)
    sys.exit(3)

""" + (APP_DIR / "tasks.py").read_text()


def unit(worker: str) -> str:
    return f"celery-worker@{worker}.service"


def host(worker: str) -> str:
    return f"{worker}@{HOST}"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def redis():
    yield from private_redis()


@pytest.fixture(scope="module")
def alerts():
    with HttpCatcher() as c:
        yield c


def config_text(http_port: int, alerts_port: int, workers: list[str]) -> str:
    return f"""broker:
  url: ${{CELERY_BROKER_URL}}
loop:
  interval: 1s
  state_path: /var/lib/celery-supervisor/state.db
http:
  listen: 127.0.0.1:{http_port}
notify:
  channels:
    - name: test
      url: json://127.0.0.1:{alerts_port}/alerts
  retry: [200ms, 500ms]
  send_resolved: true
ha:
  lease: "off"
platforms:
  systemd:
    timeout: 30s
groups:
  - name: fleet
    hostnames: ["*@{HOST}"]
    workers: {json.dumps([host(w) for w in workers])}
    heartbeat_timeout: 6s
    restart:
      platform: systemd
      target: "celery-worker@{{worker}}.service"
      max_restarts: 20
      window: 10m
      backoff: 0s         # no doubling wait between the restarts: the kills below measure the reaction
      grace: 15s
      stop_timeout: 2m
"""


class Fleet:
    def __init__(self, c, redis, alerts, http_port):
        self.c, self.redis, self.alerts, self.http_port = c, redis, alerts, http_port
        self.app = celery_app(self.broker_url)

    @property
    def broker_url(self) -> str:
        return f"{self.redis.url}/5"

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status", timeout=5) as r:
            return json.loads(r.read())

    def worker(self, name: str) -> dict:
        return next(w for w in self.status()["workers"] if w["hostname"] == host(name))

    def drop_in(self, unit_name: str, name: str, text: str | None) -> None:
        path = f"/etc/systemd/system/{unit_name}.d/{name}.conf"
        if text is None:
            self.c.run(["rm", "-f", path])
        else:
            self.c.write(path, text)
        self.c.systemctl("daemon-reload")

    def sup_log(self) -> list[str]:
        return self.c.messages(SUP)

    def kill_main(self, unit_name: str) -> tuple[int, float]:
        """SIGKILL the unit's main process (a crash, not a stop); returns (pid, wall time of the kill)."""
        pid = self.c.main_pid(unit_name)
        assert pid, self.c.show(unit_name)
        out = self.c.sh(f"date +%s.%N; kill -9 {pid}").stdout
        return pid, float(out.split()[0])

    def started_after(self, unit_name: str, t: float) -> float | None:
        """Wall time of systemd's first "Started ..." of the unit after ``t`` (a start job ran)."""
        for e in self.c.journal(unit_name, 60):
            at = int(e["__REALTIME_TIMESTAMP"]) / 1e6
            if at > t and e.get("MESSAGE", "").startswith("Started "):
                return at
        return None

    def wait(self, pred, timeout: float, what: str, interval: float = 0.2):
        """wait_until, failing with what the supervisor and the units' journals said."""
        try:
            return wait_until(pred, timeout, interval, what=what)
        except AssertionError as e:
            tail = "\n".join(self.sup_log()[-30:])
            units = self.c.sh("systemctl list-units --no-pager --all 'celery-worker@*'; journalctl --no-pager "
                              "-n 40 -u 'celery-worker@*' -o short-precise", check=False).stdout
            raise AssertionError(f"{e}\n--- {SUP}:\n{tail}\n--- units:\n{units}") from None

    def grant_rights(self) -> None:
        """README "The rights it needs", its block as written (once): the polkit rule, the journal group."""
        if self.c.run(["test", "-e", RULE], check=False).returncode != 0:
            self.c.sh("\n".join(shell_lines(readme_block("#### The rights it needs"))))

    def titles(self) -> list[str]:
        return [r.json.get("title", "") for r in self.alerts.requests if r.json]

    def close(self):
        self.app.close()


@pytest.fixture(scope="module")
def fleet(redis, alerts):
    http_port = free_port()
    with module_container("sv-adapter", HOST) as c:
        f = Fleet(c, redis, alerts, http_port)
        env = (f"CELERY_BIN=/opt/celery/venv/bin/celery\nCELERY_APP=proj\n"
               f"CELERY_WORKER_OPTS=--loglevel=INFO --concurrency=1 -Q sdq --without-mingle --without-gossip\n"
               f"CELERY_BROKER_URL={f.broker_url}\n")
        install_workers(c, env, APP)
        for w in ("w1", "w2"):
            wait_ping(f.app, host(w), 60)
        install_supervisor(c, config_text(http_port, alerts.port, ["w1", "w2"]), f"CELERY_BROKER_URL={f.broker_url}\n")
        try:
            yield f
        finally:
            c.systemctl("stop", SUP, check=False)
            f.close()


# ---------------------------------------------------------------- the README's rights for a non-root supervisor
def test_readme_worker_unit_runs_real_workers(fleet):
    c = fleet.c
    for w in ("w1", "w2"):
        p = c.show(unit(w), ("ActiveState", "SubState", "User", "Restart", "KillMode", "TimeoutStopUSec",
                             "UnitFileState"))
        assert p == {"ActiveState": "active", "SubState": "running", "User": "celery", "Restart": "on-failure",
                     "KillMode": "mixed", "TimeoutStopUSec": "2min", "UnitFileState": "enabled"}, p
        argv = c.sh(f"tr '\\0' ' ' < /proc/{c.main_pid(unit(w))}/cmdline").stdout
        assert f"/opt/celery/venv/bin/celery -A proj worker -n {w}@{HOST} " in argv, argv
    fleet.wait(lambda: all(fleet.worker(w)["alive"] for w in ("w1", "w2")), 30, "the supervisor sees both")
    assert {fleet.worker(w)["platform_state"] for w in ("w1", "w2")} == {"running"}


def test_without_the_polkit_rule_a_restart_fails_at_once(fleet):
    """The supervisor's user may read states, not restart: `systemctl --no-ask-password restart`
    fails at once with systemd's own words, which the restart result carries."""
    c = fleet.c
    assert c.run(["test", "-e", RULE], check=False).returncode != 0, "runs before the rule is installed"
    fleet.drop_in(unit("w1"), "restart", "[Service]\nRestart=no\n")
    pid, t_kill = fleet.kill_main(unit("w1"))
    fleet.wait(lambda: any("restart celery-worker@w1.service" in m and "failed" in m for m in fleet.sup_log()), 40,
               "the refused restart")
    line = next(m for m in fleet.sup_log() if "restart celery-worker@w1.service" in m and "failed" in m)
    assert "Interactive authentication required." in line, line
    assert c.show(unit("w1"), ("ActiveState",))["ActiveState"] == "failed"


def test_the_readme_polkit_rule_and_journal_group_let_it_restart(fleet):
    """README "The rights it needs", its block run as written: the polkit rule allows exactly
    restart and reset-failed of celery-worker@*.service, the drop-in adds the systemd-journal group."""
    c = fleet.c
    fleet.grant_rights()
    st = c.proc_status(c.main_pid(SUP))
    gid = c.sh("getent group systemd-journal | cut -d: -f3").stdout.strip()
    assert gid in st["Groups"].split(), st["Groups"]
    # w1 is still failed from the refused restart: the supervisor now restarts it
    fleet.wait(lambda: c.show(unit("w1"), ("ActiveState",))["ActiveState"] == "active", 60,
               "w1 restarted through polkit")
    wait_ping(fleet.app, host("w1"), 60)
    # the rule is that narrow: the same user may not restart anything else
    r = c.run(["setpriv", "--reuid=celery-supervisor", "--regid=celery-supervisor", "--clear-groups",
               "systemctl", "--no-ask-password", "restart", "dbus.service"], check=False)
    assert r.returncode != 0 and "Interactive authentication required" in r.stderr, r
    r = c.run(["setpriv", "--reuid=celery-supervisor", "--regid=celery-supervisor", "--clear-groups",
               "systemctl", "--no-ask-password", "stop", unit("w2")], check=False)
    assert r.returncode != 0 and "Interactive authentication required" in r.stderr, r


# ---------------------------------------------------------------- SIGKILL, restart, journal in the alert
def test_sigkill_restart_through_systemctl_with_the_journal_in_the_alert(fleet):
    """w1 (Restart=no): each SIGKILL of its main process is seen in systemd's state (failed, signal
    9) and restarted by the supervisor with `systemctl restart`; the alert carries the real journal."""
    c, app = fleet.c, fleet.app
    fleet.grant_rights()
    fleet.drop_in(unit("w1"), "restart", "[Service]\nRestart=no\n")
    wait_ping(app, host("w1"), 60)
    fleet.wait(lambda: fleet.worker("w1")["alive"], 30, "w1 alive for the supervisor")
    issued, answered = [], []
    first_kill = time.time() - 1
    for i in range(KILLS):
        before = c.show(unit("w1"), ("NRestarts",))["NRestarts"]
        old, t_kill = fleet.kill_main(unit("w1"))
        started = fleet.wait(lambda t=t_kill: fleet.started_after(unit("w1"), t), 60,
                             f"kill {i + 1}: systemctl restart", 0.1)
        wait_ping(app, host("w1"), 60)
        t_ping = time.time()
        issued.append(started - t_kill)
        answered.append(t_ping - t_kill)
        p = c.show(unit("w1"), ("ActiveState", "MainPID", "NRestarts"))
        assert p["ActiveState"] == "active" and int(p["MainPID"]) != old, p
        assert p["NRestarts"] == before, p  # not systemd's own restart (Restart=no): the supervisor's
        fleet.wait(lambda: fleet.worker("w1")["alive"], 30, "w1 alive again")
    # 6 starts, more than the unit's StartLimitBurst=5 within StartLimitIntervalSec=10min (and no
    # daemon-reload in between, which resets systemd's count): systemd would refuse the 6th ("Start
    # request repeated too quickly", Result still "signal") but for the adapter's reset-failed of
    # the failed unit before each restart
    starts = [e for e in c.journal(unit("w1"), 300) if int(e["__REALTIME_TIMESTAMP"]) / 1e6 > first_kill
              and e.get("MESSAGE", "").startswith("Started ")]
    assert len(starts) == KILLS, len(starts)
    assert not any("repeated too quickly" in m for m in c.messages(unit("w1"))), c.messages(unit("w1"))[-10:]
    log = fleet.sup_log()
    done = [m for m in log if "restart celery-worker@w1.service" in m and "-> ok" in m]
    assert len(done) >= KILLS, log[-20:]
    assert "crashed" in done[-1] and "code=killed, status=9/KILL" in done[-1], done[-1]
    assert "restarted celery-worker@w1.service: active (running)" in done[-1], done[-1]

    bodies = [r.json["message"] for r in fleet.alerts.requests if r.json and "FIRING" in r.json.get("title", "")
              and "worker_lost" in r.json["title"] and host("w1") in r.json["title"]]
    assert bodies, fleet.titles()
    body = bodies[-1]
    assert "systemctl restart celery-worker@w1.service" in body, body
    assert "celery-worker@w1.service: Main process exited, code=killed, status=9/KILL" in body, body[-1500:]
    assert "celery-worker@w1.service: Failed with result 'signal'." in body, body[-1500:]
    assert "celery@" not in body or host("w1") in body  # the worker's own lines are there, by its name
    p50_issued, p50_ping = statistics.median(issued), statistics.median(answered)
    print(f"\nreal systemd, {KILLS} SIGKILLs of w1: kill -> systemctl restart issued p50 {p50_issued:.2f}s "
          f"(all: {', '.join(f'{x:.2f}' for x in issued)}); kill -> worker answers ping p50 {p50_ping:.2f}s "
          f"(all: {', '.join(f'{x:.2f}' for x in answered)})")


def test_a_unit_systemd_restarts_itself_is_left_alone(fleet):
    """w2 with Restart=always and RestartSec=12s (longer than heartbeat_timeout): after a SIGKILL the
    unit sits in activating (auto-restart); the supervisor reads that state and runs no restart;
    systemd restarts it itself (NRestarts 1)."""
    c = fleet.c
    fleet.grant_rights()
    fleet.drop_in(unit("w2"), "restart", "[Service]\nRestart=always\nRestartSec=12s\n")
    n0 = int(c.show(unit("w2"), ("NRestarts",))["NRestarts"])
    fleet.wait(lambda: fleet.worker("w2")["alive"], 30, "w2 alive")
    old, t_kill = fleet.kill_main(unit("w2"))
    fleet.wait(lambda: fleet.worker("w2")["platform_state"] == "restarting", 10,
               "the supervisor reads activating (auto-restart)")
    # once its heartbeats are older than heartbeat_timeout (6s), w2 is judged by systemd's state
    seen = fleet.wait(lambda: (w := fleet.worker("w2"))["status"] == "starting" and w, 11,
                      "w2 judged starting: systemd restarts it")
    assert seen["reason"] == f"platform is restarting {unit('w2')}", seen
    p = c.show(unit("w2"), ("ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus"))
    assert p == {"ActiveState": "activating", "SubState": "auto-restart", "Result": "signal", "ExecMainCode": "2",
                 "ExecMainStatus": "9"}, p
    fleet.wait(lambda: c.show(unit("w2"), ("ActiveState",))["ActiveState"] == "active", 40,
               "systemd's own restart")
    t_back = fleet.started_after(unit("w2"), t_kill)
    p = c.show(unit("w2"), ("NRestarts", "MainPID"))
    assert int(p["NRestarts"]) == n0 + 1 and int(p["MainPID"]) != old, p
    assert t_back - t_kill >= 11.5, t_back - t_kill  # after RestartSec: nobody started it earlier
    wait_ping(fleet.app, host("w2"), 60)
    log = fleet.sup_log()
    assert not [m for m in log if "restart celery-worker@w2.service" in m and "-> ok" in m], log[-20:]
    print(f"\nw2 left to systemd: restarted by systemd {t_back - t_kill:.1f}s after the kill (RestartSec 12s)")
    fleet.drop_in(unit("w2"), "restart", None)


def test_a_unit_that_hit_its_start_limit_is_reset_and_restarted(fleet):
    """w3 crashes at start (exit 3) until systemd gives up (StartLimitBurst=5) and refuses even a start
    by hand; once the cause is gone and w3 is added to the config (systemctl reload), the supervisor
    runs reset-failed, then restart (both allowed by the README's polkit rule), and w3 is back."""
    c = fleet.c
    fleet.grant_rights()
    c.sh(f"touch {CRASH_MARKER}")
    fleet.drop_in(unit("w3"), "restart", "[Service]\nRestartSec=200ms\n")  # the template's 5s, faster
    c.systemctl("start", unit("w3"), check=False)
    fleet.wait(lambda: c.show(unit("w3"), ("ActiveState",))["ActiveState"] == "failed"
               and any("Start request repeated too quickly." in m for m in c.messages(unit("w3"))), 60,
               "w3 at its start limit")
    p = c.show(unit("w3"), ("ActiveState", "Result", "NRestarts", "ExecMainStatus"))
    # systemd 252 keeps the Result of the last failure (exit-code), not "start-limit-hit": it sets
    # that only for a unit whose Result was still "success" (the fake says start-limit-hit); NRestarts
    # counts the 5th automatic restart too, the one it refused
    assert p == {"ActiveState": "failed", "Result": "exit-code", "NRestarts": "5", "ExecMainStatus": "3"}, p
    r = c.systemctl("start", unit("w3"), check=False)
    # refused, and systemctl explains it by the stale Result (the fake: "...attempted too often")
    assert r.returncode == 1 and "failed because the control process exited with error code" in r.stderr, r.stderr
    msgs = c.messages(unit("w3"))
    assert any("Start request repeated too quickly." in m for m in msgs), msgs[-10:]
    assert sum("proj: /opt/celery/crash-on-start exists" in m for m in msgs) == 5, msgs

    c.sh(f"rm -f {CRASH_MARKER}")
    cfg = c.sh("cat /etc/celery-supervisor/config.yaml").stdout
    new = cfg.replace(json.dumps([host("w1"), host("w2")]), json.dumps([host("w1"), host("w2"), host("w3")]))
    assert new != cfg
    c.run(["sh", "-ec", "cat > /etc/celery-supervisor/config.yaml"], input=new)
    c.systemctl("reload", SUP)
    wait_ping(fleet.app, host("w3"), 90)
    log = fleet.sup_log()
    done = [m for m in log if "restart celery-worker@w3.service" in m and "-> ok" in m]
    assert len(done) == 1 and "crashed (failed (result exit-code, code=exited, status=3))" in done[0], log[-20:]
    # without its reset-failed, systemd would refuse this start for StartLimitIntervalSec=10min
    assert c.show(unit("w3"), ("ActiveState",))["ActiveState"] == "active"
    msgs = c.messages(unit("w3"))
    assert sum("Start request repeated too quickly." in m for m in msgs) == 2, msgs[-10:]  # systemd's, ours by hand


def test_as_root_it_needs_neither_rule_nor_group(fleet):
    """README: the supervisor as root (a drop-in User=root, Group=root; the rest of the sandbox
    stays): without the polkit rule and the journal group it restarts through systemd's private
    socket and reads the journal."""
    c = fleet.c
    fleet.grant_rights()
    journal_conf = f"/etc/systemd/system/{SUP}.d/journal.conf"
    c.sh(f"mv {RULE} /root/rule.off && mv {journal_conf} /root/journal.off")
    fleet.drop_in(SUP, "root", "[Service]\nUser=root\nGroup=root\n")
    try:
        c.systemctl("restart", SUP)
        st = c.proc_status(c.main_pid(SUP))
        assert st["Uid"].split()[0] == "0" and st["CapEff"] == "0000000000000000" and st["NoNewPrivs"] == "1", st
        fleet.drop_in(unit("w1"), "restart", "[Service]\nRestart=no\n")
        wait_ping(fleet.app, host("w1"), 60)
        fleet.wait(lambda: fleet.worker("w1")["alive"], 30, "w1 alive")
        n = len(fleet.alerts.requests)
        old, t_kill = fleet.kill_main(unit("w1"))
        fleet.wait(lambda: fleet.started_after(unit("w1"), t_kill), 60, "the restart by root")
        wait_ping(fleet.app, host("w1"), 60)
        fleet.wait(lambda: any("FIRING" in r.json.get("title", "") and host("w1") in r.json["title"]
                               for r in fleet.alerts.requests[n:] if r.json), 30, "the alert")
        body = next(r.json["message"] for r in fleet.alerts.requests[n:]
                    if r.json and "FIRING" in r.json.get("title", "") and host("w1") in r.json["title"])
        assert "celery-worker@w1.service: Main process exited, code=killed, status=9/KILL" in body, body[-1000:]
    finally:
        fleet.drop_in(SUP, "root", None)
        c.sh(f"mv /root/rule.off {RULE} && mv /root/journal.off {journal_conf}")
        c.systemctl("daemon-reload")
        c.systemctl("restart", SUP)
