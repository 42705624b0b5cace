"""supervisor.metrics fed from real decisions of the core (recorded fleets), read back through
prometheus_client's own exposition and parser, as a scraper sees them."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.loop import TickReport
from supervisor.metrics import STATUSES, Metrics
from supervisor.model import Action
from supervisor.notify import Message, Notifier
from tests.unit.recorded import BROKER_PASSWORD, Fleet, group_cfg, make_config

W1, W2, W3 = (f"celery@web-{i}" for i in range(1, 4))


def scrape(m: Metrics) -> dict:
    text = generate_latest(m.registry).decode()
    assert BROKER_PASSWORD not in text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: dict, name: str, **labels):
    return samples.get((name, frozenset(labels.items())))


def config(queues=("jobs",)):
    return make_config([group_cfg("web"), group_cfg("batch", restart=False)],
                       queues=[{"name": q, "warning": 10} for q in queues],
                       notify={"channels": [{"name": "ops", "url": "json://127.0.0.1:9/x"}]})


def test_workers_findings_queues_restarts_from_real_decisions():
    cfg = config()
    f = Fleet(cfg)
    f.up(W1, W2, W3, at=0)
    f.queue("jobs", 12, consumers=3)
    f.run(0, 30)
    m = Metrics()
    m.configure(cfg)
    s = scrape(m)
    for g in ("web", "batch"):  # every series exists from the start, at 0
        assert all(val(s, "celery_supervisor_workers", group=g, status=st) == 0 for st in STATUSES)
    assert val(s, "celery_supervisor_restarts_total", group="web", outcome="ok") == 0
    assert val(s, "celery_supervisor_alerts_total", channel="ops", outcome="delivered") == 0

    f.down(W1)
    d = f.tick(45)  # W1 silent past heartbeat_timeout, no pong: lost, restart planned
    assert [p.hostname for p in d.plans] == [W1]
    actions = [Action("restart", "web", "web-1.service", "worker_lost", hostname=W1, executed=True, result="ok"),
               Action("restart", "web", "web-2.service", "x", hostname=W2, executed=True, result="failed: boom"),
               Action("restart", "web", "web-3.service", "x", hostname=W3, result="not executed: budget spent")]
    m.observe(TickReport(f.observation(45), d, actions, duration=0.25), cfg, leader=True, completed_at=1000.0)
    s = scrape(m)
    assert val(s, "celery_supervisor_workers", group="web", status="alive") == 2
    assert val(s, "celery_supervisor_workers", group="web", status="lost") == 1
    firing = sum(v for (n, lab), v in s.items() if n == "celery_supervisor_findings" and ("state", "firing") in lab)
    assert firing == sum(st.state == "firing" for st in d.states.values()) >= 1
    assert val(s, "celery_supervisor_findings", rule="worker_lost", state="firing") == 1
    assert val(s, "celery_supervisor_queue_length", queue="jobs") == 12
    assert val(s, "celery_supervisor_queue_consumers", queue="jobs") == 3
    assert val(s, "celery_supervisor_queue_unacked", queue="jobs") is None  # not known on this broker
    for outcome in ("ok", "failed", "not_executed"):
        assert val(s, "celery_supervisor_restarts_total", group="web", outcome=outcome) == 1
    assert val(s, "celery_supervisor_cycle_duration_seconds_count") == 1
    assert val(s, "celery_supervisor_cycle_duration_seconds_sum") == 0.25
    assert val(s, "celery_supervisor_last_cycle_timestamp_seconds") == 1000.0
    assert val(s, "celery_supervisor_broker_up") == 1 and val(s, "celery_supervisor_leader") == 1

    # W1 back: the finding resolves; its series stays, at 0 (an alert rule sees it go to 0)
    f.up(W1, at=50)
    d = f.tick(120)
    m.observe(TickReport(f.observation(120), d, []), cfg, leader=False)
    s = scrape(m)
    assert val(s, "celery_supervisor_findings", rule="worker_lost", state="firing") == 0
    assert val(s, "celery_supervisor_workers", group="web", status="lost") == 0
    assert val(s, "celery_supervisor_leader") == 0  # a standby
    assert val(s, "celery_supervisor_restarts_total", group="web", outcome="ok") == 1  # counters never go back

    # the broker down: broker_up 0, the queue counts of the last good cycle stay (last_cycle dates them)
    f.broker_down()
    d = f.tick(125)
    m.observe(TickReport(f.observation(125), d, []), cfg, leader=True)
    s = scrape(m)
    assert val(s, "celery_supervisor_broker_up") == 0
    assert val(s, "celery_supervisor_queue_length", queue="jobs") == 12
    m.cycle_failed()
    assert val(scrape(m), "celery_supervisor_cycles_total", outcome="failed") == 1
    assert val(scrape(m), "celery_supervisor_cycles_total", outcome="ok") == 3


def test_a_reload_drops_the_series_of_removed_groups_and_queues():
    cfg = config(queues=("jobs", "old"))
    f = Fleet(cfg)
    f.up(W1, at=0)
    f.queue("jobs", 1)
    f.queue("old", 5)
    m = Metrics()
    m.configure(cfg)
    m.observe(TickReport(f.observation(0), f.tick(0), []), cfg, leader=True)
    assert val(scrape(m), "celery_supervisor_queue_length", queue="old") == 5
    new = make_config([group_cfg("web")], queues=[{"name": "jobs"}])
    m.configure(new)
    s = scrape(m)
    assert val(s, "celery_supervisor_queue_length", queue="old") is None
    assert val(s, "celery_supervisor_queue_length", queue="jobs") == 1
    assert val(s, "celery_supervisor_workers", group="batch", status="alive") is None
    assert val(s, "celery_supervisor_workers", group="web", status="alive") == 1  # not reset by a reload


def test_alerts_counted_through_on_done_after_the_existing_hook():
    cfg = config()
    n = Notifier(cfg.notify)
    calls = []
    n.on_done = lambda ch, msg, ok, err: calls.append(("outbox", ch, ok))
    m = Metrics()
    m.configure(cfg)
    m.chain_on_done(n)
    m.chain_on_done(n)  # twice: still counted once
    msg = Message("t", "b", "warning", "firing")
    n.on_done("ops", msg, True, None)
    n.on_done("ops", msg, False, "HTTP 500")
    s = scrape(m)
    assert calls == [("outbox", "ops", True), ("outbox", "ops", False)]
    assert val(s, "celery_supervisor_alerts_total", channel="ops", outcome="delivered") == 1
    assert val(s, "celery_supervisor_alerts_total", channel="ops", outcome="failed") == 1
    n.close(0.5)


def test_own_registry_not_the_global_one():
    from prometheus_client import REGISTRY

    Metrics()
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("celery_supervisor")]
