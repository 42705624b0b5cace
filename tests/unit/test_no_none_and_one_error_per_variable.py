"""Issue 12's output fixes: a missing ${VAR} is one error (not also "bad scheme" / "required" for the
value it left empty), and nothing prints `None` for an unknown count or an unset threshold (`status`'s
table, `check-config`, `once`)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from supervisor.config import ConfigError, parse_config
from supervisor.status import render_table


def test_each_missing_variable_is_one_error_at_its_path():
    data = {"broker": {"url": "${NOPE_BROKER}"},
            "notify": {"channels": [{"name": "ops", "url": "${NOPE_HOOK}"}]},
            "loop": {"interval": "${NOPE_TICK}"},
            "groups": [{"name": "g", "hostnames": ["celery@x-*"], "min_workers": "${NOPE_MIN}"}]}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert sorted(p for p, _ in e.value.errors) == [
        "broker.url", "groups.0.min_workers", "loop.interval", "notify.channels.0.url"], e.value.errors
    assert all("is not set" in m for _, m in e.value.errors), e.value.errors


def test_a_missing_variable_beside_another_problem_keeps_both():
    data = {"broker": {"url": "${NOPE_BROKER}"}, "loop": {"interval": "soon"},
            "groups": [{"name": "g", "hostnames": ["celery@x-*"]}]}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert sorted(p for p, _ in e.value.errors) == ["broker.url", "loop.interval"], e.value.errors


def test_status_table_shows_unknown_counts_as_a_dash():
    doc = {"time": 100.0, "age": 1.0, "state_path": "/x.db", "broker": {"url": "redis://h/0", "ok": True},
           "workers": [{"hostname": "celery@a", "group": "g", "status": "alive", "last_heartbeat_age": None,
                        "active": None, "concurrency": None, "target": None, "platform_state": None}],
           "queues": [{"name": "q", "length": 5, "ready": None, "unacked": None, "consumers": None}],
           "findings": [], "recent_restarts": [], "budgets": [], "silences": [], "outbox": {}}
    text = render_table(doc, now=101.0)
    assert "None" not in text, text
    assert re.search(r"^\s+q\s+5\s+-\s+-\s+-", text, re.M), text


def test_check_config_shows_an_unset_threshold_as_off(tmp_path):
    from supervisor.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("broker: {url: 'redis://127.0.0.1:6379/0'}\n"
                    "groups: [{name: g, hostnames: ['celery@x-*']}]\n"
                    "queues: [{name: q, warning: 10}]\n")
    r = CliRunner().invoke(main, ["check-config", "-c", str(path)])
    assert r.exit_code == 0, r.output
    assert "None" not in r.output and "queue q: warning 10, critical off" in r.output, r.output
