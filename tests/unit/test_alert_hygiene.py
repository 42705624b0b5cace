"""Alerts an on-call engineer should (and should not) get: replayed through the core, no broker."""

from __future__ import annotations

from supervisor.notify import message_for, routes
from tests.unit.recorded import Fleet, fired, group_cfg, make_config, resolved, restarts

W1, W2 = "celery@web-1", "celery@web-2"


def test_a_broker_blip_shorter_than_the_hold_pages_nobody_but_the_exit_code_says_it():
    f = Fleet(make_config([group_cfg("web")]))
    f.up(W1, at=0)
    f.run(0, 20)
    f.broker_down()
    d = f.tick(25)
    assert d.exit_code == 3 and fired(d) == []
    f.broker_up(at=28)
    ds = f.run(30, 60)
    assert fired(ds) == [] and resolved(ds) == [] and restarts(ds) == []


def test_a_real_outage_pages_once_and_resolves_once():
    f = Fleet(make_config([group_cfg("web")]))
    f.up(W1, at=0)
    f.run(0, 20)
    f.broker_down()
    ds = f.run(25, 60)
    assert fired(ds) == ["broker_unreachable:broker"]
    f.broker_up(at=62)
    ds = f.run(65, 120)
    assert resolved(ds) == ["broker_unreachable:broker"] and fired(ds) == [] and restarts(ds) == []


def test_heartbeat_stream_down_while_the_broker_answers_is_not_healthy():
    f = Fleet(make_config([group_cfg("web", workers=[W1])]))
    f.up(W1, at=0)
    f.run(0, 20)
    f.listening_since = None  # e.g. no permission on the celeryev exchange
    d = f.tick(25)
    assert d.exit_code == 3, "could not observe the workers: never 'OK'"
    ds = f.run(30, 50)
    assert fired(ds) == ["heartbeats_unavailable:broker"] and restarts(ds) == []


def test_glob_group_below_min_does_not_page_at_start_before_workers_are_heard():
    f = Fleet(make_config([group_cfg("web", min_workers=2)]))
    d = f.tick(1)  # nothing heard yet: a glob group cannot be counted
    assert "group_below_min:web" not in {x.key for x in d.findings}
    f.up(W1, W2, at=2)
    ds = f.run(3, 30)
    assert fired(ds) == []


def test_resolved_goes_where_the_firing_went_even_after_a_downgrade():
    cfg = make_config(
        [group_cfg("web")], queues=[{"name": "q", "warning": 100, "critical": 1000}],
        notify={"channels": [{"name": "pager", "url": "json://127.0.0.1:1/p", "severities": ["critical"]}]},
    )
    f = Fleet(cfg)
    f.queue("q", 5000, consumers=1)
    first = [t for t in f.tick(1).transitions if t.new == "firing"]
    f.queue("q", 500, consumers=1)  # critical -> warning: no new page
    assert f.tick(6).transitions == []
    f.queue("q", 0, consumers=1)
    [tr] = [t for t in f.tick(11).transitions if t.new == "resolved"]
    assert [c.name for c in routes(message_for(first[0]), cfg.notify.channels)] == ["pager"]
    assert [c.name for c in routes(message_for(tr), cfg.notify.channels)] == ["pager"]


def test_a_value_hovering_around_a_threshold_pages_once():
    f = Fleet(make_config([group_cfg("web")], queues=[{"name": "q", "warning": 100, "critical": 1000}]))
    pages = []
    for i, n in enumerate([1500, 900, 1200, 950, 1300]):
        f.queue("q", n, consumers=1)
        pages += [t for t in f.tick(1 + 5 * i).transitions if t.new == "firing"]
    assert [(t.key, t.state.severity) for t in pages] == [("queue_backlog:q", "critical")]


def test_unknown_consumer_count_neither_resolves_nor_refires():
    f = Fleet(make_config([group_cfg("web")], queues=[{"name": "q", "min_consumers": 1}]))
    f.queue("q", 0, consumers=0)
    assert fired(f.tick(1)) == ["queue_consumers:q"]
    f.queue("q", 0, consumers=None)  # e.g. the stream just reconnected: not counted this tick
    d = f.tick(6)
    assert d.transitions == []
    f.queue("q", 0, consumers=0)
    assert f.tick(11).transitions == []


def test_explicit_group_is_counted_as_soon_as_its_workers_are_judged():
    f = Fleet(make_config([group_cfg("web", workers=[W1, W2], min_workers=2, hostnames=[])]))
    f.up(W1, W2, at=0)
    f.tick(1)
    f.down(W2)
    f.target(W2, "exited", since=2)
    d = f.tick(2.5)  # 2.5 s after the stream connected: no glob to wait for
    assert "group_below_min:web" in {x.key for x in d.findings} and d.exit_code == 2
    # one page per kill: the shortfall is web-2's own worker_lost alert, not a second one
    assert fired(d) == [f"worker_lost:{W2}"]


def test_group_below_min_pages_when_no_worker_alert_explains_it():
    f = Fleet(make_config([group_cfg("web", min_workers=2)]))
    f.up(W1, W2, at=0)
    f.run(0, 15)
    f.offline(W2, at=16)  # left gracefully: retired quietly, no worker alert...
    f.target(W2, "exited", since=16)
    ds = f.run(20, 30)
    assert fired(ds) == ["group_below_min:web"]  # ...so the group speaks
