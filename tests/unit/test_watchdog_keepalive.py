"""The watchdog is fed while one cycle waits on a slow platform, never for a wedged or idle loop."""

from __future__ import annotations

import threading
import time

from supervisor import daemon as daemon_mod
from supervisor.config import parse_config


class FakeSd:
    watchdog_usec = 150_000  # systemd's WatchdogSec=150ms: the keepalive looks every 50 ms
    watchdog_enabled = True

    def __init__(self):
        self.sent: list[str] = []

    def watchdog(self, status=None):
        self.sent.append(status or "")


def test_keepalive_feeds_only_a_cycle_in_progress_and_not_a_wedged_one(tmp_path, monkeypatch):
    cfg = parse_config({"broker": {"url": "redis://127.0.0.1:1/0"}, "ha": {"lease": "off"},
                        "loop": {"state_path": str(tmp_path / "state.db")}})
    d = daemon_mod.Daemon(cfg)
    sd = d.sd = FakeSd()
    t = threading.Thread(target=d._keepalive, daemon=True)
    t.start()
    try:
        time.sleep(0.3)
        assert sd.sent == [], "idle between cycles: only a completed cycle feeds the watchdog"
        d.tick_started = time.monotonic() - 1.0  # a restart waiting for its platform
        deadline = time.monotonic() + 5
        while not sd.sent and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sd.sent and "cycle in progress" in sd.sent[0]
        monkeypatch.setattr(daemon_mod, "TICK_LIMIT", 0.5)  # the same cycle, now past the limit: wedged
        time.sleep(0.2)
        n = len(sd.sent)
        time.sleep(0.3)
        assert len(sd.sent) == n, "a wedged cycle is no longer covered"
    finally:
        d.stopping.set()
        t.join(2)
        d.sup.close(flush=0)
        d.store.close()
