"""`supervisor run`: the APScheduler loop, signals, systemd notifications, config reload, the HTTP
endpoints and a clean stop.

Signals only set events; the main thread of ``run_daemon`` does the work:

- SIGTERM / SIGINT: ``STOPPING=1``, the tick in flight finishes, queued alerts get 3 s, exit 0;
- SIGHUP: ``RELOADING=1``; the config file is read and validated again. Invalid: every error is
  logged with its path and the running config stays. Valid: between two ticks a new Supervisor is
  built on the new config (its durable state is the same file, so budgets and announced alerts
  carry over), the old one is closed (its alert queue flushed), the new one started; the tick job
  is rescheduled when loop.interval changed, the HTTP server moved when http.listen changed; what
  changed is logged at INFO. Then ``READY=1``.

systemd (sdnotify.py): ``READY=1`` after the first complete cycle, ``WATCHDOG=1`` after each later
one (none after a cycle that raised), ``STATUS=`` a one-line summary each cycle.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

from supervisor import __version__, memory, osthread, redact
from supervisor.config import Config
from supervisor.durations import format_duration as fd
from supervisor.sdnotify import SdNotify
from supervisor.trend import QueueTrend

log = logging.getLogger("supervisor")
FAILURES_LOUD = 3  # cycles failing in a row before an ERROR says that the watchdog is no longer fed
EXIT_START = 2  # the daemon could not start (an HTTP port in use, ...)
TICK_LIMIT = 900.0  # a cycle running longer than this is wedged: the watchdog is no longer fed


class Daemon:
    """Runs Supervisor.tick every loop.interval on an APScheduler background scheduler.

    One tick at a time (max_instances=1, coalesce): a slow tick delays the next one, it never
    overlaps it. An exception in a tick is logged and the loop goes on.
    """

    def __init__(self, cfg: Config, config_path: str | None = None, **supervisor_kwargs):
        from supervisor.loop import Supervisor

        self.cfg = cfg
        self.config_path = config_path  # what SIGHUP re-reads (None: no reload)
        self.sd = SdNotify()  # reads and unsets $NOTIFY_SOCKET before any child process is started
        supervisor_kwargs.setdefault("state", "open")  # durable state at loop.state_path
        from supervisor.wake import Wakeup

        # deaths the platforms report, completed pings and heartbeat deadlines wake the loop between
        # ticks (supervisor/wake.py); a reload's new Supervisor gets the same one
        self.wakeup = supervisor_kwargs.setdefault("wakeup", Wakeup())
        self.store = None
        if supervisor_kwargs["state"] == "open":
            from supervisor.loop import open_state
            from supervisor.state import run_lock

            self._run_lock = run_lock(cfg.loop.state_path)  # StateError: another daemon uses this file
            # the daemon owns the store: a reload's new Supervisor shares it with the old one, whose
            # alerts still in flight settle their outbox rows on it
            self.store = supervisor_kwargs["state"] = open_state(cfg)
        self.sup = Supervisor(cfg, **supervisor_kwargs)
        from supervisor.lease import make_lease

        # ha: the leader lease (None: act alone). A reload keeps this same object: new_sup.lease = self.lease
        # the holder id persists in the state file: a leader restarted after a crash resumes its lease
        holder = self.sup.state.replica_id() if self.sup.state is not None else None
        self.lease = make_lease(cfg, holder=holder)  # LeaseError (a clear message) when it cannot be set up
        if self.lease is not None and self.sup.state is not None:
            # who pages a broker outage when the lease store (the broker's Redis) cannot be reached
            # goes by what this replica last saw of the lease, in an earlier run too
            state = self.sup.state
            self.lease.remember(state.load_memory().get("lease"))
            self.lease.on_change = lambda memory: state.save({"lease": memory})
        self.sup.lease = self.lease
        self._sup_kwargs = supervisor_kwargs
        self.stopping = threading.Event()
        self.wake = threading.Event()  # a signal arrived: the main loop looks now
        self.reload_requested = threading.Event()
        self.scheduler = None
        self.failures = 0
        self.last_error: str | None = None  # of the last failed tick
        self.tick_lock = threading.Lock()  # a reload swaps the Supervisor between two ticks
        self.ready_sent = False
        self.last_report = None  # the last completed tick's report (kept across reloads)
        self.last_completed: float | None = None  # time.monotonic() when it completed
        self.tick_started: float | None = None  # time.monotonic() when the cycle in flight began
        self.woken = 0  # extra ticks run on a wake (supervisor/wake.py)
        self.trend = QueueTrend()  # the last 15 minutes of queue lengths, for the status page
        self.status_text = "starting"
        self.metrics = None  # supervisor.metrics.Metrics, with http.listen (prometheus_client is lazy)
        self.http = None
        if cfg.http.listen:
            self._ensure_metrics()

    def _tick(self) -> None:
        osthread.name("cs-tick")  # the scheduler's executor thread (the wake thread keeps its own name)
        if self.stopping.is_set():
            return
        with self.tick_lock:
            if self.stopping.is_set():
                return
            sup = self.sup
            self.tick_started = time.monotonic()
            try:
                hang_point()
                report = sup.tick()
            except Exception as e:  # the loop must survive anything one tick meets
                self._tick_failed(e)
                return
            finally:
                self.tick_started = None
            self._tick_done(report, sup)

    def _wake_loop(self) -> None:
        """Run an extra tick soon after a wake (a death the platform reported, a heartbeat deadline
        that passed, a ping round that completed): coalesced (wakes that arrive before it starts are
        served by it) and at most one per wake.MIN_GAP. Never two ticks at once: _tick holds tick_lock."""
        osthread.name("cs-wake")
        from supervisor.wake import MIN_GAP

        last = 0.0
        wakeup = self.wakeup
        while not self.stopping.is_set():
            reasons, due = wakeup.wait(1.0)
            if self.stopping.is_set():
                return
            if due:
                try:
                    silent = self.sup.expired(due)
                except Exception as e:  # never lose the wake thread; the tick reconciles
                    log.warning("checking heartbeat deadlines: %s", redact.scrub(e))
                    silent = []
                reasons += [f"no heartbeat from {h} for its heartbeat_timeout" for h in silent[:3]]
                if len(silent) > 3:
                    reasons.append(f"and {len(silent) - 3} more silent")
            if not reasons:
                continue
            gap = MIN_GAP - (time.monotonic() - last)
            if gap > 0 and self.stopping.wait(gap):
                return
            reasons += wakeup.take()
            log.debug("woken: %s", "; ".join(reasons[:5]))
            self.woken += 1
            self._tick()
            last = time.monotonic()

    def _keepalive(self) -> None:
        """While one cycle waits on a slow platform (a restart lets the old worker stop for up to
        stop_timeout, and systemd's own TimeoutStopSec may be minutes), keep systemd's watchdog fed,
        up to TICK_LIMIT: a cycle stuck longer than that is wedged, and the watchdog restarts us."""
        period = self.sd.watchdog_usec / 3e6
        while not self.stopping.wait(period):
            started = self.tick_started
            limit = float(os.environ.get("SUPERVISOR_TICK_LIMIT") or TICK_LIMIT)  # test hook: see hang_point
            if started is not None and period < time.monotonic() - started < limit:
                self.sd.watchdog(f"cycle in progress for {fd(time.monotonic() - started)}: {self.status_text}")

    def _tick_failed(self, e: Exception) -> None:
        """No WATCHDOG=1: a loop that keeps failing (or hangs) is restarted by systemd's watchdog."""
        self.failures += 1
        self.last_error = redact.scrub(f"{type(e).__name__}: {e}")
        log.exception("tick failed (%d in a row): %s", self.failures, self.last_error)
        if self.failures == FAILURES_LOUD or (self.failures > FAILURES_LOUD and self.failures % 20 == 0):
            log.error("%d cycles in a row failed (last: %s): nothing is observed or restarted; the systemd "
                      "watchdog is no longer fed and restarts the supervisor after WatchdogSec",
                      self.failures, self.last_error)
        if self.metrics is not None:
            self.metrics.cycle_failed()
        self.sd.status(f"cycle failed ({self.failures} in a row): {self.last_error}")

    def _tick_done(self, report, sup) -> None:
        if self.failures >= FAILURES_LOUD:
            log.info("cycles complete again after %d failures", self.failures)
        self.failures = 0
        self.last_report = report
        self.last_completed = time.monotonic()
        if report.obs.broker_ok:
            self.trend.record(report.obs.now, {n: q.length for n, q in report.obs.queues.items()})
        if self.metrics is not None:
            try:
                self.metrics.observe(report, sup.cfg, sup.acting())
            except Exception as e:  # metrics must never cost a cycle
                log.warning("updating the metrics failed: %s", redact.scrub(e), exc_info=True)
        self.status_text = status_line(report, sup)
        if not self.ready_sent:
            log.info("first cycle complete: %s", self.status_text)
            self.sd.ready(self.status_text)
            self.ready_sent = True
        else:
            self.sd.watchdog(self.status_text)
        if report.duration > self.cfg.loop.interval:
            log.info("tick took %s, longer than loop.interval %s: the next one starts late",
                     fd(report.duration), fd(self.cfg.loop.interval))
        memory.trim()  # freed memory back to the system, every 30 s at most (RSS stays flat)

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        # a tick longer than the interval makes APScheduler warn "skipped: maximum number of running
        # instances reached" on every skipped run; we log our own line instead
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)

        cfg = self.cfg
        log.info("celery-supervisor %s: broker %s, every %s, %d group(s), %d queue(s), %d channel(s)",
                 __version__, cfg.broker.display_url, fd(cfg.loop.interval), len(cfg.groups), len(cfg.queues),
                 len(cfg.notify.channels))
        if self.lease is not None:  # first attempt now: a lone replica acts on its first tick
            leading = self.lease.start()
            if leading:
                role = "leader"
            elif self.lease.store_error is None:
                role = "standby, the leader acts"
            elif self.lease.may_alert():
                role = "lease store unreachable: this replica restarts nothing and pages a broker outage"
            else:
                role = (f"lease store unreachable: this replica restarts nothing and pages nothing "
                        f"({self.lease.seen_holder} led when last seen)")
            log.info("ha: %s (%s, ttl %s)", role, self.lease.where(), fd(self.lease.ttl))
        if cfg.http.listen:  # HttpError (port in use, ...): run_daemon exits 2 naming http.listen
            self.http = self._http_server(cfg.http.listen).start()
        if self.sd.watchdog_enabled:
            threading.Thread(target=self._keepalive, name="watchdog-keepalive", daemon=True).start()
        if self.sd.watchdog_usec is not None and cfg.loop.interval > self.sd.watchdog_usec / 2e6:
            log.warning("loop.interval %s is more than half the systemd watchdog (WatchdogSec=%s): a "
                        "healthy supervisor may be restarted; raise WatchdogSec", fd(cfg.loop.interval),
                        fd(self.sd.watchdog_usec / 1e6))
        for path, msg in cfg.missing_adapters():
            log.error("%s: %s: this group's workers are watched and alerted on, never restarted", path, msg)
        self.sup.start()
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(
            self._tick, "interval", seconds=cfg.loop.interval, id="tick", max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(cfg.loop.interval)), next_run_time=_now_dt(),
        )
        self.scheduler.start()
        threading.Thread(target=self._wake_loop, name="wake", daemon=True).start()

    def stop(self) -> None:
        """Finish the tick in flight, then stop everything."""
        self.stopping.set()
        self.wakeup.close()
        self.sd.stopping()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.http is not None:
            self.http.stop()
        if self.lease is not None:  # after the last tick: a clean stop hands over at once
            self.lease.stop(release=True)
        self.sup.close(flush=3.0)
        if self.store is not None:
            self.store.close()
        self.sd.close()
        log.info("stopped")

    # ------------------------------------------------------------ HTTP and metrics
    def _ensure_metrics(self) -> None:
        if self.metrics is None:
            from supervisor.metrics import Metrics

            self.metrics = Metrics()
            self.metrics.configure(self.cfg)
            self.metrics.chain_on_done(self.sup.notifier)

    def _http_server(self, listen: str):
        from supervisor.http import HttpServer

        self._ensure_metrics()
        return HttpServer(listen, self.metrics.registry, self.health, self.status_document,
                          token=lambda: self.cfg.http.token.get_secret_value() if self.cfg.http.token else None)

    def status_document(self) -> dict:
        from supervisor.status import status_document

        return status_document(self.sup, self.trend)

    def health(self) -> tuple[bool, str]:
        """/healthz: the last cycle completed within healthz_bound(loop.interval) and reached the broker."""
        from supervisor.http import healthz_bound

        failing = f"; {self.failures} cycle(s) failed since: {self.last_error}" if self.failures else ""
        if self.last_completed is None:
            return False, f"no cycle completed yet{failing}"
        age = time.monotonic() - self.last_completed
        bound = healthz_bound(self.cfg.loop.interval)
        if age > bound:
            return False, f"the last cycle completed {fd(age)} ago (more than {fd(bound)}){failing}"
        obs = self.last_report.obs
        if not obs.broker_ok:
            return False, f"broker unreachable in the last cycle: {obs.broker_error}"
        return True, f"ok: last cycle {fd(age)} ago, broker reachable{failing}"

    # ------------------------------------------------------------ SIGHUP
    def reload(self) -> bool:
        """Re-read the config file; True when the new one is in use. Never raises."""
        from supervisor.config import ConfigError, load_config

        path = self.config_path
        if not path:
            log.warning("SIGHUP: this daemon was started without a config file to re-read; ignored")
            return False
        self.sd.reloading(f"reloading {path}")
        log.info("SIGHUP: reloading %s", path)
        try:
            try:
                new_cfg = load_config(path)
                errors = new_cfg.missing_adapters()
            except ConfigError as e:
                errors = e.errors
            if errors:
                log.error("reload: %s is invalid (%d error%s); still running with the previous config",
                          path, len(errors), "s" if len(errors) != 1 else "")
                for p, msg in errors:
                    log.error("reload: %s: %s", p or path, msg)
                return False
            changes = config_changes(self.cfg, new_cfg)
            if not changes:
                log.info("reload: %s is unchanged", path)
                return True
            self._swap(new_cfg)
            log.info("reload: now running with %s; changed: %s", path, "; ".join(changes))
            return True
        except Exception as e:  # a reload must never take the daemon down
            log.exception("reload of %s failed, still running with the previous config: %s", path, redact.scrub(e))
            return False
        finally:
            self.sd.ready(self.status_text)

    def _swap(self, new_cfg: Config) -> None:
        from supervisor.loop import Supervisor

        old_cfg = self.cfg
        with self.tick_lock:  # between two ticks
            old = self.sup
            # built after the old one's last tick saved its memory: the new one restores it
            new = Supervisor(new_cfg, **self._sup_kwargs)
            new.lease = self.lease
            new._unsent = set(old._unsent)  # ha: what a standby did not page is paged if it takes over
            if old.outbox is not None and new.outbox is not None:
                # alerts the old notifier still delivers are not sent a second time by the new one
                new.outbox.share_queued(old.outbox)
            new.last_report = old.last_report
            if self.metrics is not None:
                self.metrics.chain_on_done(new.notifier)
            # the old one first: its queued alerts are flushed (and their outbox rows settled)
            # before the new one sends what the outbox still holds
            old.close(flush=3.0)
            new.start()
            self.sup, self.cfg = new, new_cfg
            if self.metrics is not None:
                self.metrics.configure(new_cfg)
        if new_cfg.loop.interval != old_cfg.loop.interval and self.scheduler is not None:
            self.scheduler.reschedule_job("tick", trigger="interval", seconds=new_cfg.loop.interval)
            self.scheduler.modify_job("tick", misfire_grace_time=max(1, int(new_cfg.loop.interval)))
        if new_cfg.http.listen != old_cfg.http.listen:
            self._move_http(new_cfg.http.listen)
        if new_cfg.ha != old_cfg.ha or (self.lease is not None and new_cfg.broker != old_cfg.broker):
            log.warning("reload: the ha section or the broker changed; the leader lease keeps its old "
                        "settings until the supervisor is restarted")

    def _move_http(self, listen: str | None) -> None:
        from supervisor.http import HttpError

        server = None
        if listen:
            try:
                server = self._http_server(listen).start()
            except HttpError as e:
                log.error("reload: %s; %s", e, "still serving on the previous address" if self.http else
                          "no HTTP endpoint")
                return
        if self.http is not None:
            self.http.stop()
            log.info("stopped serving HTTP on %s", self.http.listen)
        self.http = server


def _now_dt():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def status_line(report, sup) -> str:
    """One line for systemd's STATUS= (systemctl status)."""
    obs, d = report.obs, report.decision
    if not obs.broker_ok:
        head = f"broker unreachable: {obs.broker_error}"
    else:
        alive = sum(v.alive for v in d.verdicts)
        firing = sum(st.state == "firing" for st in d.states.values())
        head = f"{alive}/{len(d.verdicts)} workers alive, {firing} firing"
    role = "" if sup.lease is None else ("; leader" if sup.acting() else "; standby")
    return redact.scrub(f"cycle {sup.ticks}: {head}{role}")


_SECRET_KEY = re.compile(r"\.env\.|pass|pwd|token|secret|key|credential|auth|dsn|private|cookie", re.I)


def config_changes(old: Config, new: Config, limit: int = 12) -> list[str]:
    """What a reload changes, one item per setting ("loop.interval: 1.0 -> 2.0", "groups[g2] added",
    "groups[g].min_workers: 1 -> 2"); secret values are never shown."""
    a, ia = _flat(old.model_dump(by_alias=True))
    b, ib = _flat(new.model_dump(by_alias=True))
    out = [f"{k} removed" for k in ia if k not in ib] + [f"{k} added" for k in ib if k not in ia]
    gone = tuple(f"{k}." for k in set(ia) ^ set(ib))
    # a section that went from null to set (or back) is one change, not one per key inside it
    sections = {k for k in a if a[k] is None and any(x.startswith(f"{k}.") for x in b)}
    sections |= {k for k in b if b[k] is None and any(x.startswith(f"{k}.") for x in a)}
    for k in sorted(sections):
        out.append(f"{k} {'set' if a.get(k) is None else 'unset'}")
    inside = tuple(f"{k}." for k in sections)
    for k in list(a) + [k for k in b if k not in a]:
        if k in sections or k.startswith(inside):
            continue
        if k.startswith(gone) or any(i.startswith(f"{k}[") for i in (*ia, *ib)):
            continue  # inside an item added or removed; or a named list, empty on one side
        if k not in b:
            out.append(f"{k} removed")
        elif k not in a:
            out.append(f"{k} added")
        elif a[k] != b[k]:
            if _SECRET_KEY.search(k):  # an environment variable, a password: say it changed, not to what
                out.append(f"{k} changed")
            else:
                out.append(f"{k}: {_show(a[k])} -> {_show(b[k])}")
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more"]
    return out


def _flat(v, prefix: str = "", out: dict | None = None, items: list | None = None) -> tuple[dict, list]:
    """(dotted path -> value, keys of named items such as groups[g])."""
    out = {} if out is None else out
    items = [] if items is None else items
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(x, f"{prefix}.{k}" if prefix else str(k), out, items)
    elif isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
        for x in v:  # named items (groups, queues, channels): an added or removed one is one change
            key = f"{prefix}[{x['name']}]"
            items.append(key)
            _flat(x, key, out, items)
    else:
        out[prefix] = v
    return out, items


def _show(v) -> str:
    from pydantic import SecretStr

    if isinstance(v, SecretStr):
        return "(secret)"
    if isinstance(v, dict):
        return "(changed)"
    text = redact.scrub(v if isinstance(v, str) else repr(v))
    return text if len(text) <= 60 else text[:57] + "..."


def hang_point() -> None:
    """Fault injection for the watchdog test under a real systemd (tests/integration/
    test_real_systemd_unit.py): while the file SUPERVISOR_HANG_FILE names exists, the cycle hangs,
    as one stuck on a dead socket would. SUPERVISOR_TICK_LIMIT (seconds) shortens TICK_LIMIT, after
    which the keepalive stops feeding the watchdog for the hung cycle."""
    path = os.environ.get("SUPERVISOR_HANG_FILE")
    if path and os.path.exists(path):
        log.warning("SUPERVISOR_HANG_FILE %s exists: this cycle hangs (a test of the watchdog)", path)
        while os.path.exists(path):
            time.sleep(0.2)


def run_daemon(cfg: Config, config_path: str | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 0); SIGHUP reloads ``config_path``. Exit 2 when the daemon
    cannot start (http.listen in use)."""
    from supervisor.http import HttpError

    stop, reload_, wake = threading.Event(), threading.Event(), threading.Event()

    def on_stop(*_a):
        stop.set()
        wake.set()

    def on_reload(*_a):
        reload_.set()
        wake.set()

    # before the Daemon is built (which takes a moment): an early SIGHUP must not kill the process
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    d = Daemon(cfg, config_path=config_path)
    d.stopping, d.reload_requested, d.wake = stop, reload_, wake
    try:
        try:
            d.start()
        except HttpError as e:
            log.error("cannot start: %s (check http.listen in %s)", e, config_path or "the config")
            return EXIT_START
        while not stop.is_set():
            wake.wait(1.0)
            wake.clear()
            if reload_.is_set() and not stop.is_set():
                reload_.clear()
                d.reload()
    finally:
        t0 = time.monotonic()
        d.stop()
        log.debug("shutdown took %.2fs", time.monotonic() - t0)
    return 0
