"""The SQLite state file: what survives, what is moved aside, budgets, silences, the outbox."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from supervisor.state import SCHEMA_VERSION, StateError, StateStore, run_lock


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_memory_outbox_and_history_survive_reopening(tmp_path):
    clock = Clock()
    p = tmp_path / "state.db"
    s = StateStore(p, clock=clock)
    s.save({"core": {"book": {"notified": {"k": "critical"}}}}, [("m1", "ops", {"title": "t", "key": "k"})])
    row = s.restart_started(clock.t, "g.w1", "g", "celery@w1", "lost")
    s.restart_finished(row, True, "started")
    s.close()
    s = StateStore(p, clock=clock)
    assert s.load_memory()["core"]["book"]["notified"] == {"k": "critical"}
    assert [(m, c, b["title"]) for m, c, b, _ in s.outbox_pending()] == [("m1", "ops", "t")]
    assert s.history(clock.t - 10) == {"g.w1": [clock.t]}
    assert s.recent_restarts()[0].outcome == "ok"
    assert sqlite3.connect(p).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reset_clears_a_budget_by_target_or_hostname(tmp_path):
    clock = Clock()
    s = StateStore(tmp_path / "s.db", clock=clock)
    for _ in range(3):
        s.restart_started(clock.t, "g.w1", "g", "celery@w1", "lost")
    s.restart_started(clock.t, "g.w2", "g", "celery@w2", "lost")
    assert s.reset("celery@w1") == 3
    assert s.history(0) == {"g.w2": [clock.t]}
    assert s.reset("g.w2") == 1 and s.history(0) == {}
    assert s.reset("nobody") == 0


def test_silences_expire_and_can_be_ended(tmp_path):
    clock = Clock()
    s = StateStore(tmp_path / "s.db", clock=clock)
    a = s.add_silence("g", 60, "deploy", "alice")
    s.add_silence("celery@w1", 3600, "maintenance")
    assert [x.match for x in s.silences()] == ["g", "celery@w1"]
    assert a.covers("g", "celery@w9") and not a.covers("other", "celery@w9")
    clock.t += 61
    assert [x.match for x in s.silences()] == ["celery@w1"]
    assert s.expire_silence("celery@w1") == 1 and s.silences() == []


def test_outbox_retry_then_delivered(tmp_path):
    clock = Clock()
    s = StateStore(tmp_path / "s.db", clock=clock)
    s.save({}, [("m1", "ops", {"title": "a"}), ("m1", "mail", {"title": "a"})])
    s.outbox_done("m1", "ops", False, "500", retry_at=clock.t + 60)
    assert [c for _, c, _, _ in s.outbox_pending(due_before=clock.t)] == ["mail"]
    s.outbox_done("m1", "mail", True, None)
    clock.t += 61
    assert [(c, a) for _, c, _, a in s.outbox_pending(due_before=clock.t)] == [("ops", 1)]
    s.outbox_done("m1", "ops", True, None)
    assert s.outbox_counts() == {"delivered": 2}


def test_a_corrupt_file_is_moved_aside_and_reported(tmp_path, caplog):
    p = tmp_path / "state.db"
    p.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, logger="supervisor"):
        s = StateStore(p)
    assert s.moved_aside is not None and s.moved_aside.read_bytes().startswith(b"this is not")
    assert "moved aside" in caplog.text and str(s.moved_aside) in caplog.text
    s.save({"x": 1})
    assert s.load_memory() == {"x": 1}


def test_a_newer_schema_is_moved_aside_not_overwritten(tmp_path, caplog):
    p = tmp_path / "state.db"
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE future (x)")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with caplog.at_level(logging.ERROR, logger="supervisor"):
        s = StateStore(p)
    assert ".newer-" in s.moved_aside.name
    assert f"schema version {SCHEMA_VERSION + 1}" in caplog.text
    kept = sqlite3.connect(s.moved_aside).execute("PRAGMA user_version").fetchone()[0]
    assert kept == SCHEMA_VERSION + 1


def test_readonly_never_creates_and_explains(tmp_path):
    with pytest.raises(StateError, match="no state file"):
        StateStore(tmp_path / "none.db", readonly=True)
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(StateError, match="no celery-supervisor state"):
        StateStore(tmp_path / "empty.db", readonly=True)


def test_unwritable_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StateError, match="directory of loop.state_path"):
        StateStore(f / "sub" / "state.db")


def test_one_daemon_per_state_file(tmp_path):
    held = run_lock(tmp_path / "state.db")
    try:
        with pytest.raises(StateError, match="already uses the state file"):
            run_lock(tmp_path / "state.db")
    finally:
        held.close()
    run_lock(tmp_path / "state.db").close()


def test_replica_id_is_stable(tmp_path):
    s = StateStore(tmp_path / "s.db")
    rid = s.replica_id()
    s.close()
    assert StateStore(tmp_path / "s.db").replica_id() == rid
    assert StateStore(tmp_path / "t.db").replica_id() != rid


def test_a_locked_database_is_an_error_never_moved_aside(tmp_path):
    p = tmp_path / "state.db"
    StateStore(p).close()
    holder = sqlite3.connect(p, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # e.g. `supervisor silence` writing right now
    try:
        with pytest.raises(StateError, match="locked"):
            StateStore(p, busy_timeout=0.2)
        assert p.exists() and not list(tmp_path.glob("state.db.corrupt-*"))
    finally:
        holder.execute("ROLLBACK")
    assert StateStore(p).load_memory() == {}


def test_memory_values_keep_what_json_keeps(tmp_path):
    """The status document is encoded with orjson; what orjson refuses (an integer past 64 bits) falls
    back to the stdlib, a NaN is stored as null (valid JSON for /status), and non-string keys as strings."""
    s = StateStore(tmp_path / "state.db", clock=Clock())
    doc = {"workers": [{"hostname": "celery@w-1", "alive": True, "processed": 12, "silent_for": 1.5, "x": None}],
           "é": "ünïcode"}
    s.save({"status": doc, "big": {"n": 2**70}, "nan": {"f": float("nan")}, "keys": {3: "three"}})
    s.close()
    mem = StateStore(tmp_path / "state.db", clock=Clock()).load_memory()
    assert mem["status"] == doc
    assert mem["big"] == {"n": 2**70}
    assert mem["nan"] == {"f": None}
    assert mem["keys"] == {"3": "three"}
