"""platforms/systemd.py's pure parts: systemctl show output, timestamps, spans, state mapping."""

from __future__ import annotations

import math
import time

import pytest

from platforms import PlatformError
from platforms.systemd import exit_text, parse_show, parse_span, parse_timestamp, target_state, unit_name


def test_parse_show_blocks_and_empty_values():
    text = "Id=a.service\nActiveState=failed\nExecMainExitTimestamp=\n\nId=b.service\nDescription=x=y\n"
    assert parse_show(text) == [{"Id": "a.service", "ActiveState": "failed", "ExecMainExitTimestamp": ""},
                                {"Id": "b.service", "Description": "x=y"}]
    assert parse_show("") == []


def test_timestamps():
    assert parse_timestamp("Tue 2024-01-16 10:23:45 UTC") == 1705400625.0
    assert parse_timestamp("Tue 2024-01-16 10:23:45.250000 UTC") == 1705400625.25
    assert parse_timestamp("@1705400625") == 1705400625.0
    assert parse_timestamp("Tue 2024-01-16 11:23:45 Europe/Paris") == 1705400625.0
    local = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(1705400625))
    assert parse_timestamp(local) == 1705400625.0
    for empty in ("", "n/a", None, "garbage"):
        assert parse_timestamp(empty) is None


def test_spans():
    assert parse_span("1min 30s") == 90.0
    assert parse_span("90") == 90.0
    assert parse_span("500ms") == 0.5
    assert parse_span("2min") == 120.0
    assert parse_span("infinity") == math.inf
    assert parse_span("") is None and parse_span("3 parsecs") is None


def test_exit_text():
    assert exit_text({"ExecMainCode": "2", "ExecMainStatus": "9"}) == "code=killed, status=9/KILL"
    assert exit_text({"ExecMainCode": "1", "ExecMainStatus": "3"}) == "code=exited, status=3"
    assert exit_text({"ExecMainCode": "0", "ExecMainStatus": "0"}) == ""


@pytest.mark.parametrize("props, state", [
    ({"LoadState": "loaded", "ActiveState": "active", "SubState": "running", "MainPID": "7"}, "running"),
    ({"LoadState": "loaded", "ActiveState": "reloading", "SubState": "reload"}, "running"),
    ({"LoadState": "loaded", "ActiveState": "failed", "SubState": "failed", "Result": "signal",
      "ExecMainCode": "2", "ExecMainStatus": "9", "ExecMainExitTimestamp": "@100"}, "crashed"),
    ({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "success",
      "ExecMainCode": "2", "ExecMainStatus": "15", "ExecMainExitTimestamp": "@100"}, "exited"),
    ({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "exit-code",
      "ExecMainExitTimestamp": "@100"}, "crashed"),
    ({"LoadState": "loaded", "ActiveState": "activating", "SubState": "auto-restart"}, "restarting"),
    ({"LoadState": "loaded", "ActiveState": "deactivating", "SubState": "stop-sigterm"}, "stopping"),
    ({"LoadState": "not-found", "ActiveState": "inactive"}, "missing"),
    ({"LoadState": "masked", "ActiveState": "inactive"}, "missing"),
    ({"LoadState": "bad-setting", "ActiveState": "inactive"}, "unknown"),
    ({"LoadState": "loaded", "ActiveState": "maintenance"}, "unknown"),
])
def test_states(props, state):
    got, detail, since = target_state(props)
    assert got == state, detail
    if state in ("crashed", "exited"):
        assert since == 100.0


def test_never_started_unit_is_exited_without_a_witnessed_time():
    assert target_state({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead"})[::2] == ("exited", None)


def test_unit_names():
    assert unit_name("celery-worker@{worker}.service", "w2@web-1") == "celery-worker@w2.service"
    assert unit_name("celery-{node}", "w2@web-1") == "celery-web-1.service"
    with pytest.raises(PlatformError):
        unit_name("celery-worker@{worker}.service", "w 2@web-1")
    with pytest.raises(PlatformError):
        unit_name("{worker}.service", "-rf@x")
