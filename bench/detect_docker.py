"""Benchmark: how fast does `supervisor run` bring back a SIGKILLed Celery worker that runs in a
container (the `docker` platform), and what does watching cost?

Everything is real: podman's Docker-compatible API (DOCKER_HOST, else unix:///run/podman-ci/podman.sock;
`bash .ci/podman-ci.sh setup` starts it), a private redis-server on a free port, --workers real Celery
workers (`--pool solo`), each in its own container of localhost/ci-busybox with this Python
bind-mounted read-only and the host's network (tests/support/podman.py, as the docker tests run
them; no restart policy: only the supervisor brings them back), and a real `supervisor run -c CONFIG
--log-level DEBUG` whose group restarts through the docker adapter (which follows the engine's
events stream: a container's death wakes the loop).

Each trial SIGKILLs one worker's container (round robin) at a random phase of the tick: os.kill of
the container's main process by its host PID (`State.Pid`), as a crash happens (the kernel's OOM
killer, a segfault): the engine learns of it only when the process is gone, as with a real crash.
(A kill through the API would let podman know in advance, and a signal from inside the container
cannot kill its PID 1.) Per trial, on the host's wall clock:

  die (engine)       the engine's own stamp (timeNano) of the container's "die" event
  die seen           that event's arrival on this bench's own events stream (the supervisor's
                     stream gets it from the same engine, at about the same moment)
  woken              the supervisor's "woken: docker: container NAME died" log stamp (DEBUG)
  restart issued     the engine's stamp of the container's "restart" event (the supervisor's
                     `restart` call reached the engine); StartedAt of the new run as a cross-check
  sup. logs restart  its "restart ... -> ok" line (written when its tick ends)
  answers ping       first reply to a targeted ping with limit=1, each on a fresh connection
                     (as bench/detect.py; --ping-timeout 0.1 s per try)

Over the run (first kill to the last worker back): the supervisor's CPU (utime + stime,
/proc/PID/stat), as % of one core, tick durations (its DEBUG tick lines), VmHWM.

Usage:  python bench/detect_docker.py [--trials 10] [--workers 3] [--interval 5s] [--json] [--keep]
Exit code: 0 when every trial was restarted and answered ping within --timeout, 1 otherwise, 2 when
the setup failed, 130 on Ctrl-C. The supervisor, the containers (by their label) and the
redis-server are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/_common.py
sys.path.insert(1, str(HERE.parent))  # tests/support/podman.py
from _common import (  # noqa: E402
    PERCENTILE_METHOD,
    RESTART_RE,
    Fleet,
    SetupError,
    add_kill_args,
    fmt_s,
    log,
    log_stamp,
    proc_cpu,
    proc_status_kb,
    run_bench,
    summary,
    wait_all_ping,
)
from _common import ping as ping_host  # noqa: E402

ROWS = (  # (key of Trial, label): printed in this order
    ("die_engine_s", "kill -> die (engine stamp)"),
    ("die_seen_s", "kill -> die event arrives"),
    ("woken_s", "kill -> sup. woken"),
    ("restart_s", "kill -> restart issued"),
    ("started_s", "kill -> container started"),
    ("sup_restart_logged_s", "kill -> sup. logs restart"),
    ("ping_s", "kill -> answers ping"),
)


class EngineEvents:
    """The engine's container events (die, restart, start) of the bench's own containers, with their
    arrival time, on a client of its own (no read timeout)."""

    def __init__(self, base_url: str, label: str):
        import docker

        self.client = docker.DockerClient(base_url=base_url, timeout=None)
        # podman 4.3 matches "died" only (its Action is "die"); Docker knows "die" only
        self.stream = self.client.api.events(decode=True, filters={
            "type": ["container"], "event": ["die", "died", "restart", "start"], "label": [label]})
        self.lock = threading.Lock()
        self.seen: list[tuple[float, str, str, float | None]] = []  # (arrival, time.time(); name, action, engine stamp)
        self.thread = threading.Thread(target=self._run, name="engine-events", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.stream:
                now = time.time()
                attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                nano = ev.get("timeNano")
                with self.lock:
                    self.seen.append((now, str(attrs.get("name") or ""), str(ev.get("Action") or ev.get("status")),
                                      nano / 1e9 if nano else None))
        except Exception:  # closed by close(), or the engine went away: the trials then miss events
            pass

    def first(self, name: str, action: str, after: float) -> tuple[float, float | None] | None:
        """(arrival, engine stamp) of the first `action` event of container `name` stamped after `after`."""
        with self.lock:
            for arrival, n, act, stamp in self.seen:
                if n == name and act == action and (stamp if stamp is not None else arrival) >= after:
                    return arrival, stamp
        return None

    def close(self) -> None:
        for c in (self.stream, self.client):
            try:
                c.close()
            except Exception:
                pass


@dataclass
class Trial:
    n: int
    victim: str
    container: str
    old_pid: int
    new_pid: int | None = None
    phase_delay_s: float | None = None
    die_engine_s: float | None = None
    die_seen_s: float | None = None
    woken_s: float | None = None
    woken_by: str | None = None  # the reasons of the supervisor's first wake after the kill
    restart_s: float | None = None  # kill -> restart issued: the engine's "restart" event stamp
    started_s: float | None = None  # kill -> the new run's StartedAt
    sup_restart_logged_s: float | None = None
    restart_tick_s: float | None = None  # duration of the tick that restarted it (its tick line)
    ping_s: float | None = None
    pings_sent: int = 0
    error: str | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    fleet: Fleet = field(default_factory=Fleet)
    ctrs: object = None
    events: EngineEvents | None = None

    def setup(self) -> None:
        import yaml

        from supervisor.config import load_config
        from supervisor.durations import parse_duration
        from supervisor.observe.celeryapp import make_app
        from tests.support.podman import TEST_LABEL, Containers, connect, engine_url

        a, f = self.args, self.fleet
        self.interval_s = parse_duration(a.interval)
        self.rng = random.Random(a.seed)
        self.uid = "bd" + secrets.token_hex(3)
        try:
            client = connect()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # need() skips or fails as in a test: here it is a setup error
            raise SetupError(f"no Docker engine: {e}") from None
        self.ctrs = Containers(client, self.uid)
        self.events = EngineEvents(engine_url(), f"{TEST_LABEL}={self.uid}")
        url = f.open("bench-detect-docker-")
        self.hosts = [f"celery@{self.uid}-{i}" for i in range(1, a.workers + 1)]
        self.names = {h: f"bench-{h.partition('@')[2]}" for h in self.hosts}
        doc = {
            "broker": {"url": url},
            "loop": {"interval": a.interval, "state_path": str(Path(f.tmp) / "state.db"), "ping_timeout": "500ms"},
            "platforms": {"docker": {"base_url": engine_url(), "timeout": "20s"}},
            "groups": [{
                "name": "bench", "workers": self.hosts, "min_workers": a.workers,
                "heartbeat_timeout": a.heartbeat_timeout,
                "restart": {"platform": "docker", "target": "bench-{node}", "max_restarts": a.trials + 5,
                            "window": "1h", "backoff": "0s", "grace": "5s", "stop_timeout": "5s"},
            }],
        }
        f.config_path = Path(f.tmp) / "config.yaml"
        f.config_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        f.app = make_app(load_config(f.config_path, env={}).broker)
        t = time.monotonic()
        for h in self.hosts:
            self.ctrs.run_worker(self.names[h], h, url, queues=f"{self.uid}-q")
        missing = wait_all_ping(f.app, self.hosts, 90)
        if missing:
            raise SetupError(f"workers in containers did not answer ping within 90s: {missing}")
        log(f"started {a.workers} worker containers in {time.monotonic() - t:.1f}s; starting `supervisor run`")
        f.start_supervisor("DEBUG")

    def sup_alive(self) -> None:
        if self.fleet.sup.poll() is not None:
            raise SetupError(f"`supervisor run` exited with {self.fleet.sup.returncode}; see {self.fleet.tmp}")

    def wait_steady(self, timeout: float) -> str | None:
        """Every worker answers ping and the supervisor's ticks have said N/N alive for --settle seconds."""
        deadline = time.monotonic() + timeout
        missing = wait_all_ping(self.fleet.app, self.hosts, timeout)
        if missing:
            return f"not answering ping: {', '.join(missing)}"
        while time.monotonic() < deadline:
            self.sup_alive()
            since = self.fleet.suplog.all_alive_since(len(self.hosts))
            if since is not None and time.monotonic() - since >= self.args.settle:
                return None
            time.sleep(0.05)
        return f"the supervisor's ticks did not say {len(self.hosts)}/{len(self.hosts)} alive for {self.args.settle}s"

    def trial(self, n: int) -> Trial:
        a = self.args
        victim = self.hosts[(n - 1) % len(self.hosts)]
        name = self.names[victim]
        st = self.ctrs.state(name)
        tr = Trial(n, victim, name, st.get("Pid") or -1)
        if not st.get("Running") or tr.old_pid <= 0:
            tr.error = f"container {name} is not running"
            return tr
        log_path = Path(self.fleet.tmp) / "supervisor.log"
        offset = log_path.stat().st_size
        tr.phase_delay_s = round(self.rng.uniform(0, self.interval_s), 3)
        time.sleep(0.02 + tr.phase_delay_s)
        t0, w0 = time.monotonic(), time.time()
        os.kill(tr.old_pid, signal.SIGKILL)  # the container's main process, by its host PID: a crash
        deadline = t0 + a.timeout
        t_ping = None
        while time.monotonic() < deadline and self.fleet.sup.poll() is None:
            tr.pings_sent += 1
            if ping_host(self.fleet.app, victim, a.ping_timeout):
                t_ping = time.monotonic()
                break
        tr.ping_s = round(t_ping - t0, 4) if t_ping is not None else None
        # the engine's events and the supervisor's restart line come before the ping in practice
        end = time.monotonic() + 5
        while True:
            lines = self.sup_lines(log_path, offset, victim, name)
            if (lines[1][0] is not None and self.events.first(name, "start", w0)) or time.monotonic() > end:
                break
            time.sleep(0.05)
        after = self.ctrs.inspect(name)
        tr.new_pid = (after.get("State") or {}).get("Pid")
        from platforms.docker import parse_time

        def rel(t):
            return round(t - w0, 4) if t is not None else None

        die = self.events.first(name, "die", w0 - 0.01)
        if die:
            tr.die_seen_s, tr.die_engine_s = rel(die[0]), rel(die[1])
        restart = self.events.first(name, "restart", w0)
        tr.restart_s = rel(restart[1] if restart and restart[1] is not None else restart[0]) if restart else None
        started = parse_time((after.get("State") or {}).get("StartedAt"))
        tr.started_s = rel(started) if started is not None and started > w0 else None
        (woken, tr.woken_by), (logged, tr.restart_tick_s) = lines
        tr.woken_s, tr.sup_restart_logged_s = rel(woken), rel(logged)
        if tr.restart_s is None:
            tr.error = f"no restart of {name} within {a.timeout:g}s"
        elif tr.ping_s is None:
            tr.error = f"restarted, but no ping reply within {a.timeout:g}s"
        if self.fleet.sup.poll() is not None:
            tr.error = (tr.error + "; " if tr.error else "") + f"`supervisor run` exited with {self.fleet.sup.returncode}"
        return tr

    @staticmethod
    def sup_lines(path: Path, offset: int, host: str, name: str):
        """From the supervisor's log since `offset`: ((stamp, reasons) of its first wake that names the
        container `name`, else of its first wake; (stamp, tick duration) of its restart line for `host`):
        None where not logged yet."""
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return (None, None), (None, None)
        woken, first, logged, tick = (None, None), (None, None), None, None
        for line in lines:
            if woken[0] is None and " woken: " in line:
                w = (log_stamp(line[:23]), line.split(" woken: ", 1)[1][:200])
                first = first if first[0] is not None else w
                if f"container {name} " in w[1]:
                    woken = w
            m = RESTART_RE.search(line)
            if logged is None and m and m[2] == host:
                logged = log_stamp(line[:23])
            elif logged is not None and tick is None and (t := re.search(r"tick \d+: .* ([\d.]+)s$", line)):
                tick = float(t[1])
        return (woken if woken[0] is not None else first), (logged, tick)

    def run(self) -> dict:
        a, f = self.args, self.fleet
        msg = self.wait_steady(90)
        if msg:
            raise SetupError(f"no steady state after the supervisor's start: {msg}; see {f.tmp}")
        self.load_start = [round(x, 2) for x in os.getloadavg()]
        cpu0, wall0, ticks0 = proc_cpu(f.sup.pid), time.monotonic(), f.suplog.tick_count()
        trials: list[Trial] = []
        for n in range(1, a.trials + 1):
            if n > 1 and (msg := self.wait_steady(a.timeout)):
                trials.append(Trial(n, "-", "-", -1, error=f"no steady state before the trial: {msg}"))
                log(f"  trial {n:>3}: ABORTED: {trials[-1].error}")
                break
            tr = self.trial(n)
            trials.append(tr)
            log(f"  trial {n:>3}: {tr.container} pid {tr.old_pid} -> {tr.new_pid}: "
                + ", ".join(f"{label.split('-> ')[1]} {fmt_s(getattr(tr, key))}" for key, label in ROWS)
                + (f"  FAILED: {tr.error}" if tr.error else ""))
            if tr.error:
                try:
                    log(self.ctrs.client.api.logs(tr.container, tail=15).decode("utf-8", "replace"))
                except Exception:
                    pass
            if f.sup.poll() is not None:
                break
        self.wait_steady(a.timeout)  # the window covers the last victim's return
        cpu1, wall1 = proc_cpu(f.sup.pid), time.monotonic()
        ok = [t for t in trials if t.error is None]
        cpu, wall = (cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None), wall1 - wall0
        durations = f.suplog.tick_durations(ticks0)
        hwm = proc_status_kb(f.sup.pid, "VmHWM")
        res = {
            "setup": self.setup_info(),
            "trials": [asdict(t) for t in trials],
            "failed": [asdict(t) for t in trials if t.error is not None],
            "woken_by_the_death": sum(bool(t.woken_by and t.container in t.woken_by) for t in ok),
            "percentile_method": PERCENTILE_METHOD,
            "supervisor": {
                "pid": f.sup.pid,
                "cpu_s": round(cpu, 3) if cpu is not None else None,
                "wall_s": round(wall, 2),
                "cpu_pct_of_one_core": round(100 * cpu / wall, 2) if cpu is not None and wall > 0 else None,
                "ticks_in_window": len(durations),
                "tick_duration_s": summary(durations),
                "peak_rss_mb_vmhwm": round(hwm / 1024, 1) if hwm else None,
                "log_problems": f.suplog.problems[-20:],
            },
        }
        for key, _ in ROWS:
            res[key] = summary([getattr(t, key) for t in ok if getattr(t, key) is not None])
        return res

    def setup_info(self) -> dict:
        import docker

        from tests.support.podman import IMAGE, engine_url

        a = self.args
        ver = self.ctrs.client.version()
        return {
            "workers": a.workers, "hostnames": self.hosts, "interval": a.interval,
            "heartbeat_timeout": a.heartbeat_timeout, "trials": a.trials, "ping_poll_timeout_s": a.ping_timeout,
            "seed": a.seed, "settle_s": a.settle, "engine": engine_url(), "image": IMAGE,
            "engine_version": f"{(ver.get('Components') or [{}])[0].get('Name', 'engine')} {ver.get('Version')}",
            "docker_sdk": docker.__version__,
            **self.fleet.environment(self.load_start),
        }

    def cleanup(self) -> list[str]:
        done = []
        msg = self.fleet.stop_supervisor()  # first: it would restart the containers being removed
        if msg:
            done.append(msg)
        if self.events is not None:
            self.events.close()
        if self.ctrs is not None:
            self.ctrs.remove_all()
            label = ",".join(f"{k}={v}" for k, v in self.ctrs.labels.items())
            left = self.ctrs.client.containers.list(all=True, filters={"label": label})
            done.append(f"containers labelled {self.uid} removed ({len(left)} left)")
            self.ctrs.client.close()
        return done + self.fleet.stop(self.args.keep)


def print_text(res: dict) -> None:
    s = res["setup"]
    print("celery-supervisor detection benchmark, docker platform (bench/detect_docker.py)")
    print(f"  setup: {s['workers']} workers in containers ({s['image']}), --pool solo, engine {s['engine_version']} "
          f"at {s['engine']} (docker SDK {s['docker_sdk']}); loop.interval {s['interval']}, heartbeat_timeout "
          f"{s['heartbeat_timeout']}, {s['trials']} trials; SIGKILL of the container's host PID")
    print(f"  python {s['python']}, celery {s['celery']}, celery-supervisor {s['celery_supervisor']}, "
          f"redis {s['redis_version']}, {s['cpus']} CPUs, Linux {s['kernel']}; load average {s['loadavg_at_start']} "
          f"at the start, {s['loadavg_at_end']} at the end")
    print(f"  percentiles: {res['percentile_method']}")
    print()
    print(f"  {'':<30}{'n':>4}{'p50':>10}{'p95':>10}{'min':>10}{'max':>10}{'mean':>10}")
    for key, label in ROWS:
        d = res[key]
        print(f"  {label:<30}{d['n']:>4}" + "".join(f"{fmt_s(d[k]):>10}" for k in ("p50", "p95", "min", "max", "mean")))
    print(f"  the supervisor was woken by the victim's die event: {res['woken_by_the_death']}/{res['restart_s']['n']} "
          "(\"woken: docker: container NAME died\", its DEBUG line)")
    sv = res["supervisor"]
    td = sv["tick_duration_s"]
    print()
    print(f"  supervisor process: {sv['cpu_s']} CPU s over {sv['wall_s']} s wall = {sv['cpu_pct_of_one_core']} % of "
          f"one core; {sv['ticks_in_window']} ticks, duration p50 {fmt_s(td['p50'])}, p95 {fmt_s(td['p95'])}, "
          f"max {fmt_s(td['max'])}; peak RSS {sv['peak_rss_mb_vmhwm']} MB (VmHWM)")
    for line in sv["log_problems"]:
        print(f"  supervisor log: {line}")
    for t in res["failed"]:
        print(f"  FAILED trial {t['n']} ({t['container']}): {t['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_kill_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the random kill phase (default: random)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (config, supervisor log)")
    a = p.parse_args(argv)
    if a.trials < 1 or a.workers < 1:
        p.error("--trials and --workers must be at least 1")
    b = Bench(a)
    res, code = run_bench(b, lambda r: 1 if r["failed"] else 0)
    if res is not None:
        res["supervisor"]["exit_code_on_sigterm"] = b.fleet.sup_exit
        print(json.dumps(res, indent=2) if a.json else "", end="\n" if a.json else "")
        if not a.json:
            print_text(res)
    return code


if __name__ == "__main__":
    sys.exit(main())
