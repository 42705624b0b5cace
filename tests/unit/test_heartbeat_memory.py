"""The heartbeat memory stays flat: workers that left for good are forgotten (no broker needed:
the source is fed events directly, as its receiver thread would)."""

from supervisor.config import BrokerConfig
from supervisor.observe.celeryapp import make_app
from supervisor.observe.heartbeats import EventReceiverSource


def test_events_are_stamped_on_our_clock_and_left_workers_can_be_forgotten():
    now = [1000.0]
    src = EventReceiverSource(make_app(BrokerConfig(url="redis://127.0.0.1:1/0")), clock=lambda: now[0])
    src._on_worker_event({"type": "worker-heartbeat", "hostname": "celery@a", "timestamp": 1.0, "active": 2})
    now[0] = 1005.0
    src._on_worker_event({"type": "worker-offline", "hostname": "celery@a"})
    seen = src.snapshot().workers["celery@a"]
    assert (seen.last_heartbeat, seen.offline_at, seen.active) == (1000.0, 1005.0, 2)
    src.forget(["celery@a", "celery@never-seen"])
    assert src.snapshot().workers == {}
