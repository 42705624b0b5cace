"""Observing the fleet through the broker: heartbeats, targeted pings, queue backlogs.

Modules (imported lazily: celery and kombu cost a few tenths of a second):

- ``celeryapp``: ``make_app(broker)``, ``check_broker(app, timeout)``, ``BrokerUnreachable``
- ``heartbeats``: ``HeartbeatSource``, ``HeartbeatSnapshot``, ``EventReceiverSource`` (kombu, RabbitMQ),
  ``make_source(app, broker)`` (picks the source for a broker)
- ``redis_heartbeats``: ``RedisHeartbeatSource`` (the lean source for Redis brokers)
- ``control``: ``ping(app, hostnames, timeout)``, ``active_queues(app, expected, timeout)``
- ``queues``: ``QueueReader(broker, app).read(names)``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_app": "celeryapp",
    "check_broker": "celeryapp",
    "BrokerUnreachable": "celeryapp",
    "HeartbeatSource": "heartbeats",
    "HeartbeatSnapshot": "heartbeats",
    "EventReceiverSource": "heartbeats",
    "make_source": "heartbeats",
    "RedisHeartbeatSource": "redis_heartbeats",
    "ping": "control",
    "active_queues": "control",
    "QueueReader": "queues",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
