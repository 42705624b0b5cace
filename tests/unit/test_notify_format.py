"""What alerts say, where they go, and which Apprise type they carry. Pure: no network, no Apprise."""

from __future__ import annotations

import pytest

from supervisor import redact
from supervisor.config import ChannelConfig
from supervisor.model import RuleState, Transition
from supervisor.notify import (
    DETAIL_LIMIT,
    Message,
    build_test_message,
    iso_utc,
    message_for,
    notify_type,
    routes,
    truncate_detail,
)

SINCE = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def tr(
    new="firing",
    severity="critical",
    rule="worker_lost",
    subject="celery@w1",
    group="default",
    summary="celery@w1 sent no heartbeat for 12.0s",
    hostname="celery@w1",
    fired=30.0,
    resolved=300.0,
):
    st = RuleState(
        key=f"{rule}:{subject}",
        rule=rule,
        subject=subject,
        state=new,
        severity=severity,
        summary=summary,
        since=SINCE,
        group=group,
        hostname=hostname,
        fired_at=SINCE + fired if fired is not None else None,
        resolved_at=SINCE + resolved if new == "resolved" else None,
    )
    return Transition(key=st.key, old="pending", new=new, state=st)


def test_firing_title_and_body():
    m = message_for(tr(), detail="restarted through local: pid 4242")
    assert m.title == "[FIRING critical] worker_lost celery@w1 (group default)"
    assert (m.kind, m.severity, m.key, m.group, m.hostname) == (
        "firing",
        "critical",
        "worker_lost:celery@w1",
        "default",
        "celery@w1",
    )
    lines = m.body.splitlines()
    assert lines[0] == "celery@w1 sent no heartbeat for 12.0s"
    assert "group:       default" in lines
    assert "since:       2023-11-14T22:13:20Z (for 30.0s)" in lines
    assert "fired at:    2023-11-14T22:13:50Z" in lines
    assert "What the supervisor did:" in lines and "restarted through local: pid 4242" in lines


def test_firing_duration_runs_to_now_when_given():
    m = message_for(tr(), now=SINCE + 245)
    assert "since:       2023-11-14T22:13:20Z (for 4m05s)" in m.body.splitlines()


def test_resolved_title_and_body():
    m = message_for(tr(new="resolved"))
    assert m.title == "[RESOLVED] worker_lost celery@w1 (group default)"
    assert (m.kind, m.severity) == ("resolved", "critical")  # keeps the severity it fired with
    lines = m.body.splitlines()
    assert lines[0] == "Resolved: celery@w1 sent no heartbeat for 12.0s"
    assert "since:       2023-11-14T22:13:20Z (held 5m00s)" in lines
    assert "resolved at: 2023-11-14T22:18:20Z (firing for 4m30s)" in lines


def test_no_group_no_hostname():
    m = message_for(
        tr(
            rule="queue_backlog",
            subject="default",
            group=None,
            hostname=None,
            severity="warning",
            summary="queue default holds 1500 messages",
        )
    )
    assert m.title == "[FIRING warning] queue_backlog default"
    assert "group:" not in m.body and "hostname:" not in m.body
    assert m.group is None and m.hostname is None


def test_hostname_shown_when_subject_differs():
    m = message_for(tr(rule="worker_unresponsive", subject="celery-worker@w1.service", hostname="celery@w1"))
    assert "hostname:    celery@w1" in m.body.splitlines()


def test_detail_truncated_keeping_first_line_and_the_end():
    logs = "\n".join(f"log line {i:05d} " + "x" * 50 for i in range(500))
    detail = "restarted through docker: celery-w1\n" + logs
    out = truncate_detail(detail)
    assert len(out) <= DETAIL_LIMIT
    assert out.startswith("restarted through docker: celery-w1\n[... ")
    assert "characters left out ...]" in out
    assert out.endswith("log line 00499 " + "x" * 50)
    assert "log line 00000" not in out
    # the tail starts on a whole line
    assert out.splitlines()[2].startswith("log line ")
    m = message_for(tr(), detail=detail)
    assert "log line 00499" in m.body and len(m.body) < DETAIL_LIMIT + 1000


def test_short_detail_untouched():
    assert truncate_detail("a\nb\n") == "a\nb"


def test_secrets_scrubbed_from_title_and_body():
    redact.register_secret("hunter2-unit-secret")
    m = message_for(
        tr(subject="celery@w1", summary="connect failed: redis://u:pw1234@h/0 (hunter2-unit-secret)"),
        detail="env SECRET=hunter2-unit-secret",
    )
    assert "hunter2-unit-secret" not in m.body and "pw1234" not in m.body
    assert redact.MASK in m.body


def test_iso_utc():
    assert iso_utc(SINCE) == "2023-11-14T22:13:20Z"
    assert iso_utc(None) == "-"


@pytest.mark.parametrize(
    ("kind", "severity", "expected"),
    [
        ("firing", "critical", "failure"),
        ("firing", "warning", "warning"),
        ("firing", "info", "info"),
        ("info", "warning", "warning"),
        ("resolved", "critical", "success"),
        ("resolved", "warning", "success"),
        ("test", "info", "info"),
    ],
)
def test_notify_type(kind, severity, expected):
    assert notify_type(Message(title="t", body="b", severity=severity, kind=kind)) == expected


def test_routes():
    pager = ChannelConfig(name="pager", url="json://x/p", severities=["critical"])
    chat = ChannelConfig(name="chat", url="json://x/c", severities=["warning", "critical"])
    feed = ChannelConfig(name="feed", url="json://x/f", severities=["info"])
    chans = [pager, chat, feed]

    def names(kind, sev):
        return [c.name for c in routes(Message("t", "b", sev, kind), chans)]

    assert names("firing", "critical") == ["pager", "chat"]
    assert names("firing", "warning") == ["chat"]
    assert names("resolved", "critical") == ["pager", "chat"]
    assert names("resolved", "warning") == ["chat"]
    assert names("info", "info") == ["feed"]
    assert names("test", "info") == ["pager", "chat", "feed"]


def test_test_message():
    m = build_test_message(now=SINCE)
    assert m.kind == "test" and m.title.startswith("[TEST] celery-supervisor on ")
    assert "2023-11-14T22:13:20Z" in m.body
