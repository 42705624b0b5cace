"""`supervisor run`: the APScheduler loop, signals, and a clean stop."""

from __future__ import annotations

import logging
import signal
import threading
import time

from supervisor import __version__, redact
from supervisor.config import Config
from supervisor.durations import format_duration as fd

log = logging.getLogger("supervisor")


class Daemon:
    """Runs Supervisor.tick every loop.interval on an APScheduler background scheduler.

    One tick at a time (max_instances=1, coalesce): a slow tick delays the next one, it never
    overlaps it. An exception in a tick is logged and the loop goes on.
    """

    def __init__(self, cfg: Config, **supervisor_kwargs):
        from supervisor.loop import Supervisor

        self.cfg = cfg
        self.sup = Supervisor(cfg, **supervisor_kwargs)
        self.stopping = threading.Event()
        self.scheduler = None
        self.failures = 0

    def _tick(self) -> None:
        if self.stopping.is_set():
            return
        try:
            report = self.sup.tick()
            self.failures = 0
            if report.duration > self.cfg.loop.interval:
                log.info("tick took %s, longer than loop.interval %s: the next one starts late",
                         fd(report.duration), fd(self.cfg.loop.interval))
        except Exception as e:  # the loop must survive anything one tick meets
            self.failures += 1
            log.exception("tick failed (%d in a row): %s", self.failures, redact.scrub(e))

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        # a tick longer than the interval makes APScheduler warn "skipped: maximum number of running
        # instances reached" on every skipped run; we log our own line instead
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)

        cfg = self.cfg
        log.info("celery-supervisor %s: broker %s, every %s, %d group(s), %d queue(s), %d channel(s)",
                 __version__, cfg.broker.display_url, fd(cfg.loop.interval), len(cfg.groups), len(cfg.queues),
                 len(cfg.notify.channels))
        if cfg.ha.lease != "off":
            log.warning("ha.lease is %r but this version holds no leader lease yet: run a single replica "
                        "(a second one would also restart workers); set ha.lease: off to silence this",
                        cfg.ha.lease)
        if cfg.http.listen:
            log.warning("http.listen is set but this version serves no HTTP endpoint yet")
        for path, msg in cfg.missing_adapters():
            log.error("%s: %s: this group's workers are watched and alerted on, never restarted", path, msg)
        self.sup.start()
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(
            self._tick, "interval", seconds=cfg.loop.interval, id="tick", max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(cfg.loop.interval)), next_run_time=_now_dt(),
        )
        self.scheduler.start()

    def stop(self) -> None:
        """Finish the tick in flight, then stop everything."""
        self.stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        self.sup.close(flush=3.0)
        log.info("stopped")

    def request_stop(self, *_args) -> None:
        self.stopping.set()


def _now_dt():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def run_daemon(cfg: Config) -> int:
    d = Daemon(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, d.request_stop)
    d.start()
    try:
        while not d.stopping.wait(1.0):
            pass
    finally:
        t0 = time.monotonic()
        d.stop()
        log.debug("shutdown took %.2fs", time.monotonic() - t0)
    return 0
