"""The `supervisor` command end to end, as a user runs it: a real subprocess, a config file on disk,
real brokers (private Redis, RabbitMQ), real Celery workers really killed, real Apprise deliveries.

Checks the CLI contract of DESIGN.md: exit codes of `check-config`, `once`, `nagios`; the JSON
document of `once --json`; `--dry-run` executes nothing; the daemon stops on SIGTERM/SIGINT and
survives a broker outage; secrets never printed; platform libraries imported only when used.
Time bounds asserted here are the contract's generous ones only.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.support.brokers import RedisServer, free_port, private_redis
from tests.support.catchers import HttpCatcher, SmtpCatcher
from tests.support.cli import (
    REPO,
    CliDaemon,
    CliResult,
    cli_env,
    kill_pids,
    pid_alive,
    pidfile_pids,
    pids_with_arg,
    run_cli,
    write_config,
)
from tests.support.workers import APP_DIR, Worker, celery_app, wait_ping, worker_command

HEAVY = ("kubernetes", "docker", "cloudfoundry_client")
NAGIOS_LINE = re.compile(r"^CELERY (OK|WARNING|CRITICAL|UNKNOWN) - .+ \| \S+=\S+")
NAGIOS_WORD = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
CONTRACT_UNREACHABLE = 20.0  # `once`/`nagios` must answer "could not observe" within this
CONTRACT_STOP = 10.0  # `run` must exit after SIGTERM/SIGINT within this


# ---------------------------------------------------------------- fixtures and helpers
class Cleanup:
    """Everything a test started, stopped by PID at teardown (also when the test failed)."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.daemons: list[CliDaemon] = []
        self.run_dirs: list[Path] = []
        self.servers: list[RedisServer] = []
        self.apps: list = []

    def worker(self, url: str, hostname: str, queues: str) -> Worker:
        w = Worker(url, hostname, queues=queues)
        self.workers.append(w)
        return w

    def daemon(self, *args: str, log_dir: Path, name: str = "run") -> CliDaemon:
        d = CliDaemon(*args, log_dir=log_dir, name=name)
        self.daemons.append(d)
        return d

    def app(self, url: str):
        a = celery_app(url)
        self.apps.append(a)
        return a

    def close(self) -> None:
        for d in self.daemons:
            d.kill()
        for w in self.workers:
            w.stop()
        kill_pids([p for rd in self.run_dirs for p in pidfile_pids(rd)])
        for a in self.apps:
            a.close()
        for s in self.servers:
            s.close()


@pytest.fixture
def cleanup():
    c = Cleanup()
    yield c
    c.close()


def no_traceback(r: CliResult) -> None:
    assert "Traceback (most recent call last)" not in r.output, f"a Python traceback was printed:\n{r}"


def local_restart(url: str, queues: str, **kw) -> dict:
    """A `restart:` section for the local platform running the tests' real worker."""
    return {"platform": "local", "target": worker_command(queues=queues), "cwd": str(APP_DIR),
            "env": {"CELERY_BROKER_URL": url, "PYTHONPATH": str(APP_DIR)},
            "grace": "1s", "backoff": "1s", "max_restarts": 5, "stop_timeout": "3s", **kw}


def run_many(jobs: list[tuple], workers: int = 8) -> list[CliResult]:
    """Run several CLI commands at once (each a tuple of args, optionally ending with a dict of
    run_cli keyword arguments); results in order."""

    def one(job):
        if job and isinstance(job[-1], dict):
            return run_cli(*job[:-1], **job[-1])
        return run_cli(*job)

    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, jobs))


def nagios_parts(r: CliResult) -> tuple[str, str]:
    lines = r.out.strip().splitlines()
    assert len(lines) == 1, f"nagios must print exactly one line:\n{r}"
    assert NAGIOS_LINE.match(lines[0]), f"not a Nagios plugin line with perfdata:\n{r}"
    head, _, perf = lines[0].partition(" | ")
    return head, perf


# ================================================================ 1. check-config
def test_check_config_accepts_the_example_config():
    r = run_cli("check-config", "-c", REPO / "config.example.yaml",
                env=cli_env(drop=("CELERY_BROKER_URL", "MATTERMOST_URL")))
    assert r.rc == 0, str(r)
    assert "OK" in (r.out.splitlines() or [""])[0], str(r)
    no_traceback(r)


def test_check_config_lists_every_error_with_its_path(tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", {
        "broker": {"url": "redis://127.0.0.1:6379/0"},
        "notify": {"channels": [{"name": "ops", "url": "notaservice://x"}]},
        "groups": [{"name": "g", "workers": ["celery@a"],
                    "restart": {"platform": "local", "target": "celery worker -n {hostname}",
                                "window": "half an hour"}}],
        "queues": [{"name": "q", "warning": 10, "bogus": 1}],
    })
    r = run_cli("check-config", "-c", cfg)
    assert r.rc == 2, str(r)
    no_traceback(r)
    lines = r.output.splitlines()

    def line_for(path: str) -> str:
        hits = [ln for ln in lines if re.search(rf"(^|\s){re.escape(path)}:", ln)]
        assert hits, f"no error printed for {path}:\n{r}"
        return hits[0]

    assert "duration" in line_for("groups.0.restart.window")
    assert "unknown key" in line_for("queues.0.bogus")
    assert "apprise" in line_for("notify.channels.0.url").lower()


def test_check_config_apprise_url_error_alone(tmp_path):
    """An invalid Apprise URL in an otherwise valid file is an error too (and the URL is not shown)."""
    cfg = write_config(tmp_path / "bad.yaml", {
        "broker": {"url": "redis://127.0.0.1:6379/0"},
        "notify": {"channels": [{"name": "ops", "url": "notaservice://x"}]},
    })
    r = run_cli("check-config", "-c", cfg)
    assert r.rc == 2, str(r)
    no_traceback(r)
    assert re.search(r"notify\.channels\.0\.url: .*Apprise", r.output), str(r)


@pytest.mark.parametrize("case", ["missing", "directory", "invalid-yaml", "empty"])
def test_check_config_unreadable_file_exits_2_with_a_one_line_reason(tmp_path, case):
    expected = {"missing": "does not exist", "directory": "directory", "invalid-yaml": "line", "empty": "empty"}
    path = tmp_path / "conf.yaml"
    if case == "directory":
        path.mkdir()
    elif case == "invalid-yaml":
        path.write_text("broker:\n  url: [redis://127.0.0.1:6379/0\nloop: {interval: 5s\n")
    elif case == "empty":
        path.write_text("")
    r = run_cli("check-config", "-c", path)
    assert r.rc == 2, str(r)
    no_traceback(r)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, f"expected a short reason:\n{r}"
    assert any(expected[case] in ln.lower() for ln in lines), f"reason should mention {expected[case]!r}:\n{r}"


def test_check_config_names_an_unset_variable_and_its_path(tmp_path):
    var = "CS_TEST_SURELY_UNSET_VAR_8812"
    cfg = write_config(tmp_path / "env.yaml", {"broker": {"url": "${" + var + "}"}})
    r = run_cli("check-config", "-c", cfg, env=cli_env(drop=(var,)))
    assert r.rc == 2, str(r)
    no_traceback(r)
    assert any("broker.url" in ln and var in ln for ln in r.output.splitlines()), str(r)
    # set, it passes
    ok = run_cli("check-config", "-c", cfg, env=cli_env({var: "redis://127.0.0.1:6379/3"}))
    assert ok.rc == 0, str(ok)


# ================================================================ 2. secrets
BROKER_PW = "S3cretBrokerPw"
WRONG_PW = "WrongBrokerPw777"
MM_TOKEN = "TokEn1234567890abc"
MAIL_PW = "MailPw98765"
CF_PW = "CfPw-secret-42"
SECRETS = (BROKER_PW, WRONG_PW, MM_TOKEN, MAIL_PW, CF_PW)


def secret_forms() -> dict[str, str]:
    forms = {}
    for s in SECRETS:
        for f in (s, quote(s, safe=""), quote_plus(s), s.lower()):
            forms[f] = s
    return forms


def leaks(text: str) -> list[str]:
    return sorted({s for f, s in secret_forms().items() if f in text})


@pytest.fixture
def pw_redis():
    yield from private_redis(BROKER_PW)


@pytest.mark.redis
def test_secrets_never_printed_nor_delivered(tmp_path, pw_redis, uid, cleanup):
    with HttpCatcher() as http, SmtpCatcher() as smtp:
        broker = f"{pw_redis.url}/0"
        lost = f"celery@{uid}-ghost"
        # a "worker" that prints its broker URL (as many apps log their settings) and dies after 1 s:
        # its last output goes into the alert of its next restart
        code = ("import os, sys, time; print('worker', sys.argv[1], 'broker', os.environ['CELERY_BROKER_URL'], "
                "flush=True); time.sleep(1)")
        target = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {{hostname}}"

        def config(name: str, url: str = broker, **broken) -> Path:
            d = tmp_path / name
            d.mkdir()
            cleanup.run_dirs.append(d / "supervisor-local")
            data = {
                "broker": {"url": url, "connect_timeout": "2s", **broken.get("broker", {})},
                "loop": {"interval": "1s", "state_path": str(d / "state.db"), "ping_timeout": "500ms"},
                "notify": {"channels": [
                    {"name": "chat", "url": f"mmost://{http.base}/{MM_TOKEN}",
                     "severities": ["warning", "critical"], "timeout": "5s", **broken.get("chat", {})},
                    {"name": "mail", "url": f"mailto://u:{MAIL_PW}@127.0.0.1:{smtp.port}?from=a@b.example&to=d@e.example",
                     "timeout": "5s"},
                ], "retry": ["200ms"]},
                "platforms": {"cloudfoundry": {"api_url": "http://127.0.0.1:1", "username": "u",
                                               "password": CF_PW, **broken.get("cf", {})}},
                "groups": [{"name": "g", "workers": [lost], "heartbeat_timeout": "3s",
                            "restart": {"platform": "local", "target": target, "env": {"CELERY_BROKER_URL": url},
                                        "grace": "1s", "backoff": "1s", "max_restarts": 10, "stop_timeout": "2s"}}],
                "queues": [{"name": f"{uid}-q", "warning": 100}],
            }
            return write_config(d / "config.yaml", data)

        valid = config("valid")
        invalid = config("invalid", broker={"connect_timeout": "soon"}, chat={"severities": ["urgent"]},
                         cf={"verify_ssl": "maybe"})
        typo = config("typo", chat={"url": f"mmostt://{http.base}/{MM_TOKEN}"})
        wrong_pw = config("wrongpw", url=f"redis://:{WRONG_PW}@127.0.0.1:{pw_redis.port}/0")

        commands = [("check-config",), ("once", "--dry-run"), ("once", "--dry-run", "--json"), ("nagios",),
                    ("test-alert", "--timeout", "10"), ("once",), ("once", "--json"),
                    ("once", "--log-level", "DEBUG"), ("nagios", "--log-level", "DEBUG")]

        daemon = cleanup.daemon("run", "-c", valid, "--log-level", "DEBUG", log_dir=tmp_path)
        jobs = [(c[0], "-c", cfg, *c[1:]) for cfg in (valid, invalid, typo, wrong_pw) for c in commands]
        first = run_many(jobs)
        # again, now that the first restarts' output (holding the broker URL) is in the log files
        time.sleep(1.5)
        acting = [("once",), ("once", "--json"), ("once", "--log-level", "DEBUG")]
        results = first + run_many([(c[0], "-c", cfg, *c[1:]) for cfg in (valid, wrong_pw) for c in acting])
        daemon.signal(signal.SIGTERM)
        daemon.wait(CONTRACT_STOP)

        # outputs: what the commands printed
        by = {(Path(r.args[2]).parent.name, " ".join(r.args[:1] + r.args[3:])): r for r in first}
        for r in results:
            no_traceback(r)
            assert not leaks(r.output), f"secret(s) {leaks(r.output)} printed by:\n{r}"
        assert not leaks(daemon.out + daemon.err), f"secret(s) in the daemon's output:\n{daemon}"

        # the commands really did their work (so that the checks above are not vacuous)
        assert by[("valid", "check-config")].rc == 0, str(by[("valid", "check-config")])
        assert by[("valid", "test-alert --timeout 10")].rc == 0, str(by[("valid", "test-alert --timeout 10")])
        # the ghost lives 1 s per start and the daemon restarts it at once: a pass may catch it running
        # (busy, exit 0); the others find it lost (exit 2)
        valid_once = [r for r in results if Path(r.args[2]).parent.name == "valid" and r.args[0] == "once"]
        assert all(r.rc in (0, 2) for r in valid_once), "\n".join(map(str, valid_once))
        assert any(r.rc == 2 for r in valid_once), "\n".join(map(str, valid_once))
        for c in commands:  # an invalid file: every command refuses it
            r = by[("invalid", " ".join(c))]
            assert r.rc == 2 and "invalid config" in r.err, str(r)
        assert by[("typo", "check-config")].rc == 2, str(by[("typo", "check-config")])
        for c in commands:
            if c[0] in ("once", "nagios"):
                r = by[("wrongpw", " ".join(c))]
                assert r.rc == 3, str(r)

        # deliveries: bodies and headers (the URL path of a Mattermost webhook is its token by design;
        # SMTP AUTH carries the mail password by design)
        time.sleep(0.5)
        assert http.received(), "no HTTP delivery arrived"
        assert smtp.messages, "no mail arrived"
        for req in http.received():
            text = req.text + "\n" + "\n".join(f"{k}: {v}" for k, v in req.headers.items())
            assert not leaks(text), f"secret(s) {leaks(text)} delivered over HTTP: {text}"
        for m in smtp.messages:
            text = m.raw.decode("utf-8", "replace") + m.subject + m.body
            assert not leaks(text), f"secret(s) {leaks(text)} delivered by mail: {text}"
        bodies = "\n".join(r.text for r in http.received()) + "\n".join(m.body for m in smtp.messages)
        assert lost in bodies, "no alert about the lost worker was delivered"
        assert "broker redis://" in bodies, "the restarted worker's last output was not attached to its alert"


# ================================================================ 3. lazy imports
WRAPPER = r"""
import json, sys
from supervisor.cli import main
try:
    main(args=sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
sys.stdout.flush()
print("\nMODULES=" + json.dumps(sorted({m.split(".")[0] for m in list(sys.modules)})))
"""


def imported_modules(*args: str, timeout: float = 60.0) -> tuple[set[str], str]:
    import subprocess

    p = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=cli_env(), cwd=str(REPO))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("MODULES=")]
    assert line, f"the wrapper printed no module list (exit {p.returncode}):\n{p.stdout}\n{p.stderr}"
    return set(json.loads(line[-1][len("MODULES="):])), p.stdout + p.stderr


@pytest.mark.redis
def test_platform_libraries_are_imported_only_when_used(tmp_path, redis_url, uid, cleanup):
    for mod in HEAVY:  # they are installed here, so this test can fail
        if importlib.util.find_spec(mod) is None:
            pytest.fail(f"{mod} is not installed: this test would prove nothing")
    cleanup.run_dirs.append(tmp_path / "supervisor-local")
    cfg = write_config(tmp_path / "local.yaml", {
        "broker": {"url": redis_url},
        "loop": {"state_path": str(tmp_path / "state.db")},
        "groups": [{"name": "g", "workers": [f"celery@{uid}-none"],
                    "restart": local_restart(redis_url, f"{uid}-q")}],
    })
    for args in (("--help",), ("--version",), ("check-config", "-c", cfg), ("once", "--dry-run", "-c", cfg)):
        mods, out = imported_modules(*args)
        heavy = sorted(set(HEAVY) & mods)
        assert not heavy, f"`supervisor {' '.join(map(str, args))}` imported {heavy}:\n{out}"
        if args[0] == "once":  # it ran, and loaded the adapter it needs (only that one)
            assert "celery" in mods and "platforms" in mods and "restart" in out, f"`once --dry-run` did not run:\n{out}"


# ================================================================ 4. once / nagios with real workers
@pytest.fixture
def fleet(redis_url, uid, tmp_path, cleanup):
    """Two real workers of one explicit group (local restarts), a queue they consume and one nobody
    consumes (warning above 3 messages, held `for: 10m`)."""
    work, backlog = f"{uid}-work", f"{uid}-backlog"
    hosts = [f"celery@{uid}-a", f"celery@{uid}-b"]
    run_dir = tmp_path / "supervisor-local"
    cleanup.run_dirs.append(run_dir)
    cfg = write_config(tmp_path / "config.yaml", {
        "broker": {"url": redis_url},
        "loop": {"interval": "1s", "state_path": str(tmp_path / "state.db"), "ping_timeout": "1s"},
        "groups": [{"name": f"g{uid}", "workers": hosts, "min_workers": 1, "queues": [work, backlog],
                    "heartbeat_timeout": "5s", "restart": local_restart(redis_url, work)}],
        "queues": [{"name": work, "warning": 100, "critical": 1000},
                   {"name": backlog, "warning": 3, "critical": 1000, "for": "10m"}],
    })
    workers = [cleanup.worker(redis_url, h, work) for h in hosts]
    app = cleanup.app(redis_url)
    for h in hosts:
        wait_ping(app, h, 60)

    class Fleet:
        pass

    f = Fleet()
    f.cfg, f.hosts, f.workers, f.app, f.run_dir = cfg, hosts, workers, app, run_dir
    f.group, f.work, f.backlog = f"g{uid}", work, backlog
    return f


@pytest.mark.redis
def test_once_and_nagios_healthy_then_backlog_warning(fleet):
    ok_json, ok_nagios = run_many([("once", "-c", fleet.cfg, "--json"), ("nagios", "-c", fleet.cfg)])
    assert ok_json.rc == 0, str(ok_json)
    doc = ok_json.json
    assert {"workers", "queues", "findings", "actions"} <= set(doc), str(ok_json)
    workers = {w["hostname"]: w for w in doc["workers"]}
    for h in fleet.hosts:
        assert workers[h]["alive"] is True and workers[h]["group"] == fleet.group, str(ok_json)
    queues = {q["name"]: q for q in doc["queues"]}
    assert queues[fleet.backlog]["length"] == 0 and queues[fleet.work]["length"] == 0, str(ok_json)
    assert doc["actions"] == [], str(ok_json)
    head, perf = nagios_parts(ok_nagios)
    assert ok_nagios.rc == 0 and head.startswith("CELERY OK"), str(ok_nagios)

    # 5 messages on a queue nobody consumes: warning now, although `for: 10m` delays its alert
    with fleet.app.producer_or_acquire() as producer:
        for _ in range(5):
            fleet.app.send_task("tasks.add", (1, 2), queue=fleet.backlog, producer=producer)
    warn_json, warn_nagios, warn_text = run_many([
        ("once", "-c", fleet.cfg, "--json"), ("nagios", "-c", fleet.cfg), ("once", "-c", fleet.cfg, "--dry-run")])
    assert warn_json.rc == 1, str(warn_json)
    doc = warn_json.json
    assert {q["name"]: q["length"] for q in doc["queues"]}[fleet.backlog] == 5, str(warn_json)
    backlog = [f for f in doc["findings"] if f["rule"] == "queue_backlog"]
    assert backlog and backlog[0]["severity"] == "warning", str(warn_json)
    assert all(w["alive"] for w in doc["workers"]), str(warn_json)
    assert not [a for a in doc["actions"] if a["kind"] == "restart"], str(warn_json)
    head, perf = nagios_parts(warn_nagios)
    assert warn_nagios.rc == 1 and head.startswith("CELERY WARNING"), str(warn_nagios)
    assert re.search(r"=5;3;1000(;|\s|$)", perf), f"the backlog queue's perfdata (value;warn;crit):\n{warn_nagios}"
    assert warn_text.rc == 1, str(warn_text)


@pytest.mark.redis
def test_lost_worker_dry_run_plans_and_once_restarts(fleet):
    victim, other = fleet.workers
    killed = victim.pid
    victim.kill(signal.SIGKILL)
    victim.proc.wait(10)

    dry, nag, text = run_many([("once", "-c", fleet.cfg, "--dry-run", "--json"), ("nagios", "-c", fleet.cfg),
                               ("once", "-c", fleet.cfg, "--dry-run")])
    assert dry.rc == 2, str(dry)
    doc = dry.json
    w = {x["hostname"]: x for x in doc["workers"]}
    assert w[victim.hostname]["alive"] is False and w[other.hostname]["alive"] is True, str(dry)
    restarts = [a for a in doc["actions"] if a["kind"] == "restart"]
    assert len(restarts) == 1, str(dry)
    a = restarts[0]
    assert {"kind", "group", "target", "hostname", "reason", "executed", "command"} <= set(a), str(dry)
    assert a["group"] == fleet.group and a["hostname"] == victim.hostname and a["target"], str(dry)
    assert a["reason"] and a["executed"] is False, str(dry)
    assert victim.hostname in a["command"], str(dry)
    assert any(f["rule"] == "worker_lost" and f["severity"] == "critical" for f in doc["findings"]), str(dry)
    head, _ = nagios_parts(nag)
    assert nag.rc == 2 and head.startswith("CELERY CRITICAL"), str(nag)

    # the dry run started nothing
    assert not pidfile_pids(fleet.run_dir), f"--dry-run wrote a pid file: {list(fleet.run_dir.glob('*'))}"
    assert not pids_with_arg(victim.hostname), "--dry-run started the worker"
    assert not fleet.app.control.ping(destination=[victim.hostname], timeout=1.0), "--dry-run started the worker"

    assert text.rc == 2 and victim.hostname in text.out and "restart" in text.out, str(text)
    assert "by hand:" in text.out or a["command"] in text.out, f"--dry-run does not show the command:\n{text}"

    # without --dry-run it restarts the worker
    real = run_cli("once", "-c", fleet.cfg, "--json")
    assert real.rc == 2, str(real)  # it reports the loss it saw
    acts = [x for x in real.json["actions"] if x["kind"] == "restart"]
    assert len(acts) == 1 and acts[0]["executed"] is True and acts[0]["hostname"] == victim.hostname, str(real)
    pids = pidfile_pids(fleet.run_dir)
    assert len(pids) == 1 and pids[0] != killed and pid_alive(pids[0]), f"pid files: {pids}\n{real}"
    wait_ping(fleet.app, victim.hostname, 60)
    again = run_cli("once", "-c", fleet.cfg, "--json")
    assert again.rc == 0, str(again)
    assert all(x["alive"] for x in again.json["workers"]), str(again)
    assert not again.json["actions"], str(again)


# ================================================================ 5. broker down
def _unreachable(results: list[CliResult], password: str) -> None:
    once, nagios, as_json = results
    for r in results:
        assert r.rc == 3, str(r)
        assert r.elapsed < CONTRACT_UNREACHABLE, f"took {r.elapsed:.1f}s:\n{r}"
        no_traceback(r)
        assert f":{password}@" not in r.output, f"the broker password was printed:\n{r}"
        # the reason names the broker's own answer (connection refused / login refused)
        assert "refused" in r.out.lower(), f"no clear reason:\n{r}"
    assert re.search(r"unreachable|could not observe", once.output, re.I), str(once)
    assert nagios.out.strip().startswith("CELERY UNKNOWN") and len(nagios.out.strip().splitlines()) == 1, str(nagios)
    doc = as_json.json
    assert doc["broker"]["ok"] is False and doc["broker"]["error"], str(as_json)
    # every printed reason says more than "unknown"
    assert len(str(doc["broker"]["error"])) > 10, str(as_json)


def _broker_down_config(tmp_path: Path, url: str, uid: str) -> Path:
    return write_config(tmp_path / "down.yaml", {
        "broker": {"url": url},
        "loop": {"state_path": str(tmp_path / "state.db")},
        "groups": [{"name": "g", "workers": [f"celery@{uid}-a"]}],
        "queues": [{"name": f"{uid}-q", "warning": 10}],
    })


def test_broker_closed_port_exits_3_quickly(tmp_path, uid):
    port = free_port()
    cfg = _broker_down_config(tmp_path, f"redis://:pw@127.0.0.1:{port}/0", uid)
    t = {"timeout": CONTRACT_UNREACHABLE + 10}
    results = run_many([("once", "-c", cfg, t), ("nagios", "-c", cfg, t), ("once", "-c", cfg, "--json", t)])
    _unreachable(results, "pw")


@pytest.mark.rabbitmq
def test_rabbitmq_bad_credentials_exit_3_quickly(tmp_path, uid, rabbitmq_url):
    cfg = _broker_down_config(tmp_path, "amqp://guest:wrong@127.0.0.1:5672//", uid)
    t = {"timeout": CONTRACT_UNREACHABLE + 10}
    results = run_many([("once", "-c", cfg, t), ("nagios", "-c", cfg, t), ("once", "-c", cfg, "--json", t)])
    _unreachable(results, "wrong")


# ================================================================ 6. supervisor run
def _run_config(tmp_path: Path, url: str, uid: str, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return write_config(d / "config.yaml", {
        "broker": {"url": url, "connect_timeout": "1s"},
        "loop": {"interval": "1s", "state_path": str(d / "state.db"), "ping_timeout": "500ms"},
        "groups": [{"name": "g", "hostnames": [f"celery@{uid}-*"]}],
        "queues": [{"name": f"{uid}-q", "warning": 10}],
        "ha": {"lease": "off"},
    })


@pytest.mark.redis
def test_run_exits_0_on_sigterm_and_sigint(tmp_path, redis_url, uid, cleanup):
    daemons = {sig: cleanup.daemon("run", "-c", _run_config(tmp_path, redis_url, uid, sig.name),
                                   log_dir=tmp_path, name=sig.name)
               for sig in (signal.SIGTERM, signal.SIGINT)}
    for d in daemons.values():
        d.wait_output("celery-supervisor")
    time.sleep(3)  # a few ticks
    for sig, d in daemons.items():
        assert d.alive(), f"`supervisor run` ended by itself:\n{d}"
        d.signal(sig)
    for sig, d in daemons.items():
        rc = d.wait(CONTRACT_STOP)
        assert rc == 0, f"after {sig.name}: exit {rc} (None: still running after {CONTRACT_STOP}s):\n{d}"
        assert "Traceback" not in d.err, str(d)


@pytest.mark.redis
def test_run_survives_a_broker_outage(tmp_path, own_redis, uid, cleanup):
    d = cleanup.daemon("run", "-c", _run_config(tmp_path, f"{own_redis.url}/0", uid, "outage"), log_dir=tmp_path)
    d.wait_output("celery-supervisor")
    time.sleep(2)
    own_redis.stop()
    deadline = time.monotonic() + 30
    while "could not observe" not in d.err and time.monotonic() < deadline and d.alive():
        time.sleep(0.2)
    assert "could not observe" in d.err, f"the outage was not logged:\n{d}"
    time.sleep(5)  # several more intervals without a broker
    assert d.alive(), f"`supervisor run` ended during the broker outage:\n{d}"
    d.signal(signal.SIGTERM)
    rc = d.wait(CONTRACT_STOP)
    assert rc == 0, f"after SIGTERM during the outage: exit {rc} (None: still running):\n{d}"
