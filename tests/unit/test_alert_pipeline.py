"""The alert pipeline's stages in the pure core: silence, dedup, flap damping, repeat, and the
memory that survives a restart (no broker, injected clock)."""

from __future__ import annotations

from supervisor.decide import Core
from supervisor.model import Finding
from supervisor.notify import message_for
from supervisor.rules import FLAP_COUNT, FLAP_WINDOW, RuleBook
from tests.unit.recorded import Fleet, fired, group_cfg, make_config, resolved

W1 = "celery@web-1"
BACKLOG = Finding("queue_backlog", "jobs", "warning", "jobs holds 1200 messages", hold=0.0)


def told(trs) -> list[str]:
    return [("FLAPPING " if t.flapping else "") + t.new for t in trs]


def test_a_flapping_finding_pages_until_it_is_flapping_then_once_resolved_when_stable():
    book = RuleBook()
    out = []
    t = 0.0
    for _ in range(6):  # fires and clears every minute
        out += told(book.advance([BACKLOG], t))
        out += told(book.advance([], t + 30))
        t += 60
    # 1st and 2nd flap page (firing + resolved), the 3rd says it flaps; then silence
    assert out == ["firing", "resolved", "firing", "resolved", "FLAPPING firing"], out
    assert FLAP_COUNT == 3
    # stable (clear) for a whole window: one RESOLVED, then a new firing pages normally again
    quiet = told(book.advance([], t + FLAP_WINDOW))
    assert quiet == ["resolved"]
    assert book.notified == {} and book.flapping == {}
    later = t + 2 * FLAP_WINDOW
    assert told(book.advance([BACKLOG], later)) == ["firing"]


def test_flapping_that_ends_firing_stays_announced_and_resolves_normally():
    book = RuleBook()
    t = 0.0
    for _ in range(3):
        book.advance([BACKLOG], t)
        book.advance([], t + 30)
        t += 60
    assert "queue_backlog:jobs" in book.flapping
    assert told(book.advance([BACKLOG], t)) == []  # still flapping: no page
    assert told(book.advance([BACKLOG], t + FLAP_WINDOW + 1)) == []  # stable, firing: nothing new
    assert book.flapping == {}
    assert told(book.advance([], t + FLAP_WINDOW + 2)) == ["resolved"]


def test_flapping_message_says_so():
    book = RuleBook()
    trs = []
    for i in range(3):
        trs += book.advance([BACKLOG], i * 60.0)
        book.advance([], i * 60.0 + 30)
    m = message_for(trs[-1])
    assert m.title.startswith("[FLAPPING warning] queue_backlog jobs") and "flapping" in m.body


def test_repeat_every_reminds_of_what_still_fires_and_not_of_the_rest():
    book = RuleBook()
    book.advance([BACKLOG], 0.0)
    assert book.due_repeats(100.0, 3600.0) == []
    book.advance([BACKLOG], 3600.0)
    due = book.due_repeats(3600.0, 3600.0)
    assert [t.key for t in due] == ["queue_backlog:jobs"]
    assert book.due_repeats(3601.0, 3600.0) == []  # once per period
    assert book.due_repeats(7200.0, 3600.0, muted={"queue_backlog:jobs"}) == []  # silenced
    assert book.due_repeats(7200.0, 0.0) == []  # repeat_every 0: never


def test_a_silenced_worker_is_not_announced_until_the_silence_ends():
    f = Fleet(make_config([group_cfg("web", workers=[W1])]))
    f.up(W1, at=0)
    f.run(0, 20)
    f.down(W1)
    quiet = f.run(25, 60, silenced=lambda fd: fd.hostname == W1)
    assert fired(quiet) == [], "silenced: no page"
    assert f.core.silenced == {f"worker_lost:{W1}"}
    loud = f.tick(65, silenced=lambda fd: False)
    assert fired(loud) == [f"worker_lost:{W1}"], "announced once the silence ends, as it still fires"


def test_the_core_memory_round_trips_so_a_restart_does_not_re_page():
    f = Fleet(make_config([group_cfg("web", workers=[W1])]))
    f.up(W1, at=0)
    f.run(0, 20)
    f.down(W1)
    ds = f.run(25, 60)
    assert fired(ds) == [f"worker_lost:{W1}"]
    memory = f.core.to_json()
    import json

    again = Core(f.cfg)
    again.restore(json.loads(json.dumps(memory)))  # through JSON, as the state file keeps it
    f.core = again
    ds = f.run(65, 80)
    assert fired(ds) == [], "already announced before the restart"
    f.up(W1, at=81)
    ds = f.run(85, 120)
    assert resolved(ds) == [f"worker_lost:{W1}"], "and resolved once, as it was announced"


def test_a_glob_worker_lost_before_a_supervisor_restart_is_not_falsely_resolved():
    cfg = make_config([group_cfg("web", restart=False)])  # alert only: no platform to ask
    f = Fleet(cfg)
    f.up(W1, at=0)
    f.run(0, 20)
    f.down(W1)
    assert fired(f.run(25, 60)) == [f"worker_lost:{W1}"]
    again = Core(cfg)
    again.restore(f.core.to_json())
    g = Fleet(cfg, start=61, core=again)  # a fresh heartbeat memory: W1 is never heard again
    ds = g.run(61, 120)
    assert resolved(ds) == [] and fired(ds) == [], "still lost: neither resolved nor paged again"
    assert W1 in again.remembered_hostnames("web")


def test_a_canary_that_was_not_executed_is_chosen_again_not_declared_systemic():
    from tests.unit.recorded import restarts

    hosts = [f"celery@web-{i}" for i in range(1, 5)]
    f = Fleet(make_config([group_cfg("web")]))
    f.up(*hosts, at=0)
    f.run(0, 20)
    f.down(*hosts[:3])
    d = f.tick(40, execute=False)  # the shell did not run it (a standby, an unconfirmed lease)
    canary = [p for p in d.plans if p.canary]
    assert len(canary) == 1
    f.core.not_executed(canary[0])
    d2 = f.tick(45)
    assert [p.canary for p in d2.plans] == [True], "a canary is planned again"
    assert f.core.policy.groups["web"].mode == "canary"
    assert "group_systemic:web" not in fired(f.log) and restarts(d2)
