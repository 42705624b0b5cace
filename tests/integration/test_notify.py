"""Real Apprise deliveries to local catchers: JSON webhook, Mattermost webhook, SMTP mail.

No mock of Apprise: the Notifier builds real Apprise objects, which open real sockets to an HTTP
server and an SMTP server started here on free ports. Assertions are about what arrived and in
which order, with generous deadlines, never small wall-clock bounds.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from supervisor.config import NotifyConfig
from supervisor.model import RuleState, Transition
from supervisor.notify import INVALID_URL, Message, Notifier, channel_errors, message_for
from tests.support.catchers import HttpCatcher, SmtpCatcher, dead_port

SINCE = 1_700_000_000.0
MM_TOKEN = "mmTok3nSecretValue9871"
SMTP_PASSWORD = "Smtp-Pa55word-Secret"


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def http():
    with HttpCatcher() as c:
        yield c


@pytest.fixture
def http2():
    with HttpCatcher() as c:
        yield c


@pytest.fixture
def smtp():
    with SmtpCatcher() as c:
        yield c


@pytest.fixture
def notifier_factory():
    made: list[Notifier] = []

    def make(channels: list[dict], retry=("100ms", "200ms", "300ms"), **kw) -> Notifier:
        cfg = NotifyConfig.model_validate({"channels": channels, "retry": list(retry)})
        n = Notifier(cfg, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close(timeout=2)


def transition(
    new="firing",
    severity="critical",
    rule="worker_lost",
    subject="celery@w1",
    group="default",
    summary="celery@w1 sent no heartbeat for 12.0s and did not answer ping",
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
        hostname=subject if subject.startswith("celery@") else None,
        fired_at=SINCE + 30,
        resolved_at=SINCE + 300 if new == "resolved" else None,
    )
    return Transition(key=st.key, old="pending" if new == "firing" else "firing", new=new, state=st)


def chan(name: str, url: str, severities=("warning", "critical"), timeout="10s") -> dict:
    return {"name": name, "url": url, "severities": list(severities), "timeout": timeout}


# ---------------------------------------------------------------- deliveries
def test_json_webhook_gets_firing_then_resolved(http, notifier_factory):
    n = notifier_factory([chan("ops", f"json://{http.base}/hook")])
    fire = message_for(transition(), detail="restarted through local: pid 4242 started")
    actions = n.send(fire)
    assert [(a.kind, a.target, a.group, a.hostname, a.executed, a.severity, a.result) for a in actions] == [
        ("alert", "ops", "default", "celery@w1", True, "critical", "queued")
    ]
    assert actions[0].reason == "[FIRING critical] worker_lost celery@w1 (group default)"
    req = http.wait_for(lambda r: r.path == "/hook")
    assert req.method == "POST"
    assert req.headers.get("Content-Type", "").startswith("application/json")
    assert req.json["title"] == "[FIRING critical] worker_lost celery@w1 (group default)"
    assert req.json["type"] == "failure"
    body = req.json["message"]
    assert "did not answer ping" in body
    assert "group:       default" in body
    assert "2023-11-14T22:13:20Z" in body
    assert "restarted through local: pid 4242 started" in body

    n.send(message_for(transition(new="resolved")))
    req2 = http.wait_for(lambda r: r.path == "/hook", count=2)
    assert req2.json["title"] == "[RESOLVED] worker_lost celery@w1 (group default)"
    assert req2.json["type"] == "success"
    assert "resolved at: 2023-11-14T22:18:20Z" in req2.json["message"]
    assert n.flush(10)
    assert n.stats()["ops"]["delivered"] == 2
    assert n.pending() == 0


def test_mattermost_webhook_body(http, notifier_factory):
    n = notifier_factory([chan("chat", f"mmost://{http.base}/{MM_TOKEN}")])
    msg = message_for(
        transition(
            severity="warning",
            rule="queue_backlog",
            subject="default",
            group=None,
            summary="queue default holds 1500 messages (warning at 1000)",
        )
    )
    n.send(msg)
    req = http.wait_for(lambda r: r.path == f"/hooks/{MM_TOKEN}")
    assert req.method == "POST"
    # Mattermost has no title field: Apprise puts the title on the first line of "text"
    text = req.json["text"]
    assert text.splitlines()[0] == "[FIRING warning] queue_backlog default"
    assert "queue default holds 1500 messages" in text
    assert req.json["username"]
    assert "warning" in req.json.get("icon_url", "")  # Apprise's WARNING notify type


def test_email_through_local_smtp(smtp, notifier_factory):
    url = (
        f"mailto://alerts:{SMTP_PASSWORD}@127.0.0.1:{smtp.port}"
        "?from=supervisor@example.com&to=oncall@example.com"
    )
    n = notifier_factory([chan("mail", url, severities=["critical"])])
    n.send(message_for(transition(), detail="restarted through systemd: celery-worker@w1.service"))
    m = smtp.wait_for()
    assert m.subject == "[FIRING critical] worker_lost celery@w1 (group default)"
    assert "did not answer ping" in m.body
    assert "restarted through systemd" in m.body
    assert m.rcpt_tos == ["oncall@example.com"]
    assert m.mail_from == "supervisor@example.com"
    assert m.login == "alerts"  # it authenticated (plain SMTP, AUTH without TLS)
    assert n.flush(10)
    assert n.stats()["mail"]["delivered"] == 1


# ---------------------------------------------------------------- routing
def test_routing_by_severity(http, http2, notifier_factory):
    n = notifier_factory(
        [
            chan("pager", f"json://{http.base}/crit", severities=["critical"]),
            chan("chat", f"json://{http2.base}/warn", severities=["warning"]),
        ]
    )
    acts = n.send(message_for(transition(severity="critical")))
    assert [a.target for a in acts] == ["pager"]
    acts = n.send(message_for(transition(new="resolved", severity="critical")))
    assert [a.target for a in acts] == ["pager"]  # resolved goes where its firing went
    acts = n.send(message_for(transition(severity="warning", subject="celery@w2")))
    assert [a.target for a in acts] == ["chat"]
    info = Message(title="supervisor started", body="hello", severity="info", kind="info")
    assert n.send(info) == []  # nobody takes info
    assert n.flush(15)
    assert [r.json["title"] for r in http.received()] == [
        "[FIRING critical] worker_lost celery@w1 (group default)",
        "[RESOLVED] worker_lost celery@w1 (group default)",
    ]
    assert [r.json["title"] for r in http2.received()] == [
        "[FIRING warning] worker_lost celery@w2 (group default)"
    ]


# ---------------------------------------------------------------- retry
def test_retried_after_two_500s_arrives_once(http, notifier_factory, caplog):
    caplog.set_level(logging.INFO)
    n = notifier_factory([chan("ops", f"json://{http.base}/hook")], retry=["100ms", "200ms", "300ms"])
    http.fail_next(2, status=500)
    n.send(message_for(transition()))
    http.wait_for(lambda r: r.status == 200)
    assert n.flush(15)
    assert [r.status for r in http.received()] == [500, 500, 200]
    assert len(http.received(answered=200)) == 1
    st = n.stats()["ops"]
    assert (st["delivered"], st["failed"], st["retried"], st["dropped"]) == (1, 2, 2, 0)
    warnings = [r for r in caplog.records if r.name == "supervisor.notify" and r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("channel ops" in r.getMessage() for r in warnings)
    assert "500" in warnings[0].getMessage() or "Internal Server Error" in warnings[0].getMessage()


def test_gives_up_after_retries_with_error_log(http, notifier_factory, caplog):
    caplog.set_level(logging.INFO)
    done = []
    n = notifier_factory(
        [chan("ops", f"json://{http.base}/hook")],
        retry=["100ms"],
        on_done=lambda ch, m, ok, err: done.append((ch, m.title, ok, err)),
    )
    http.fail_next(5, status=503)
    n.send(message_for(transition()))
    assert n.flush(15)
    assert [r.status for r in http.received()] == [503, 503]
    st = n.stats()["ops"]
    assert (st["delivered"], st["failed"], st["retried"], st["dropped"]) == (0, 2, 1, 1)
    errors = [r for r in caplog.records if r.name == "supervisor.notify" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "channel ops dropped after 2 attempts" in errors[0].getMessage()
    assert len(done) == 1 and done[0][:3] == (
        "ops",
        "[FIRING critical] worker_lost celery@w1 (group default)",
        False,
    )


def test_resolved_waits_for_its_firing_being_retried(http, notifier_factory):
    """Messages of one rule key keep their order on a channel even when the first one is retried."""
    n = notifier_factory([chan("ops", f"json://{http.base}/hook")], retry=["300ms"])
    http.fail_next(1, status=500)
    n.send(message_for(transition()))
    http.wait_for(lambda r: r.status == 500)
    n.send(message_for(transition(new="resolved")))
    other = message_for(transition(subject="celery@w9"))
    n.send(other)  # another key is not held back by the retry
    assert n.flush(15)
    delivered = [r.json["title"] for r in http.received(answered=200)]
    assert delivered.index("[FIRING critical] worker_lost celery@w1 (group default)") < delivered.index(
        "[RESOLVED] worker_lost celery@w1 (group default)"
    )
    assert delivered[0] == other.title


# ---------------------------------------------------------------- a hanging channel
def test_hanging_channel_delays_nobody(http, http2, notifier_factory, caplog):
    caplog.set_level(logging.INFO)
    slow, good = http, http2
    slow.hang_next(60, n=10)  # every request to it is held for 60 s
    n = notifier_factory(
        [
            # rto=30: Apprise itself would wait 30 s for an answer; our attempt timeout (2s) is shorter
            chan("slow", f"json://{slow.base}/slow?rto=30", timeout="2s"),
            chan("good", f"json://{good.base}/good", timeout="10s"),
        ],
        retry=["100ms"],
    )
    first = message_for(transition())
    actions = n.send(first)
    # send() returned before the hanging attempt could even be given up on
    assert n.stats()["slow"]["failed"] == 0
    assert [(a.target, a.result) for a in actions] == [("slow", "queued"), ("good", "queued")]

    slow.wait_hanging(1)
    good.wait_for(lambda r: r.json and r.json["title"] == first.title and r.status == 200)
    assert slow.hanging >= 1 and not slow.received(answered=200)  # the other one still hangs

    second = message_for(transition(subject="celery@w2"))
    n.send(second)
    good.wait_for(lambda r: r.json and r.json["title"] == second.title and r.status == 200)
    assert slow.hanging >= 1

    # the slow channel: each attempt abandoned after its timeout, retried once, then dropped
    deadline = time.monotonic() + 60
    while n.stats()["slow"]["dropped"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    st = n.stats()["slow"]
    assert st["dropped"] == 2 and st["delivered"] == 0 and st["failed"] == 4
    # each attempt was abandoned at its timeout (at most 3 may hang at once; a 4th is not started)
    fails = [
        r.getMessage()
        for r in caplog.records
        if r.name == "supervisor.notify" and r.levelno >= logging.WARNING
    ]
    assert sum("no answer within 2.0s" in f for f in fails) >= 3
    assert slow.hanging >= 1  # all of that happened while its requests were still held
    assert n.stats()["good"]["delivered"] == 2
    assert any(
        r.levelno == logging.ERROR and "channel slow dropped" in r.getMessage() for r in caplog.records
    )


# ---------------------------------------------------------------- secrets
def test_no_secret_in_logs_or_actions(http, smtp, notifier_factory, caplog):
    caplog.set_level(logging.DEBUG)
    # also listen on Apprise's own logger, below our filter, at DEBUG: its URL lines must be scrubbed
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    alog = logging.getLogger("apprise")
    keep, old_level = Keep(level=logging.DEBUG), alog.level
    alog.addHandler(keep)
    alog.setLevel(logging.DEBUG)
    try:
        n = notifier_factory(
            [
                chan("chat", f"mmost://{http.base}/{MM_TOKEN}"),
                # info only: test_all reaches it (Apprise paces mail 5.5 s apart on one object)
                chan(
                    "mail",
                    f"mailto://alerts:{SMTP_PASSWORD}@127.0.0.1:{smtp.port}"
                    "?from=supervisor@example.com&to=oncall@example.com",
                    severities=["info"],
                ),
                chan("deadchat", f"mmost://127.0.0.1:{dead_port()}/{MM_TOKEN}x"),
                chan("broken", f"foo://user:{SMTP_PASSWORD}@example.com/{MM_TOKEN}"),
            ],
            retry=["100ms"],
        )
        http.fail_next(1, status=500)
        actions = n.send(message_for(transition()))
        actions += n.send(message_for(transition(new="resolved")))
        assert n.flush(20)
        results = n.test_all(timeout=10)
    finally:
        alog.removeHandler(keep)
        alog.setLevel(old_level)

    assert http.received(path=f"/hooks/{MM_TOKEN}", answered=200)  # deliveries did happen
    assert smtp.messages
    assert any("Mattermost" in r.getMessage() for r in seen)  # and Apprise did log about them
    texts = [r.getMessage() for r in caplog.records] + [r.getMessage() for r in seen]
    texts += [r.exc_text or "" for r in caplog.records]
    texts += [repr(a.to_json()) for a in actions] + [repr(results), repr(n.stats()), repr(n.errors)]
    for secret in (MM_TOKEN, SMTP_PASSWORD):
        leaks = [t for t in texts if secret in t]
        assert not leaks, leaks
    # the scrubbed lines are still there, masked
    assert any("/hooks/****" in t for t in texts)
    assert results["broken"] and INVALID_URL in results["broken"]
    assert results["deadchat"] is not None and results["chat"] is None and results["mail"] is None


# ---------------------------------------------------------------- test_all and bad URLs
def test_test_all_reports_success_and_dead_port(http, notifier_factory):
    n = notifier_factory(
        [
            chan("good", f"json://{http.base}/hook", severities=["critical"]),
            chan("dead", f"json://127.0.0.1:{dead_port()}/hook", timeout="5s"),
        ]
    )
    res = n.test_all(timeout=10)
    assert res["good"] is None
    assert res["dead"] and isinstance(res["dead"], str)
    req = http.wait_for()
    assert req.json["title"].startswith("[TEST] celery-supervisor")
    assert req.json["type"] == "info"
    assert n.pending() == 0  # test_all does not go through the queues


def test_invalid_url_reported_by_name_without_url(http, notifier_factory, caplog):
    caplog.set_level(logging.INFO)
    secret = "InvalidUrlSecretToken77"
    n = notifier_factory(
        [
            chan("good", f"json://{http.base}/hook"),
            chan("typo", f"mmostt://chat.example.com/{secret}"),
        ]
    )
    assert set(n.errors) == {"typo"}
    assert "'typo'" in n.errors["typo"] and INVALID_URL in n.errors["typo"]
    errs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("typo" in e and INVALID_URL in e for e in errs)
    assert not any(secret in r.getMessage() for r in caplog.records)
    acts = {a.target: a for a in n.send(message_for(transition()))}
    assert acts["good"].executed and acts["good"].result == "queued"
    assert not acts["typo"].executed and INVALID_URL in acts["typo"].result
    assert secret not in repr(acts["typo"].to_json())
    assert n.flush(10)
    assert n.test_all(timeout=10)["typo"] == n.errors["typo"]
    assert channel_errors(n.cfg) == n.errors  # what check-config can call, without a Notifier


def test_close_delivers_queued_then_refuses(http, notifier_factory):
    n = notifier_factory([chan("ops", f"json://{http.base}/hook")])
    for i in range(5):
        n.send(message_for(transition(subject=f"celery@w{i}")))
    assert n.close(timeout=15) is True
    assert len(http.received(answered=200)) == 5
    acts = n.send(message_for(transition()))
    assert [(a.executed, a.result) for a in acts] == [(False, "failed: notifier closed")]


def test_importing_notify_does_not_import_apprise():
    """Apprise costs 0.1 to 0.3 s to import and load: only a Notifier pulls it in."""
    code = "import sys, supervisor.notify; print('apprise' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_send_resolved_false_sends_no_resolved(http):
    cfg = NotifyConfig.model_validate(
        {"channels": [chan("ops", f"json://{http.base}/hook")], "send_resolved": False}
    )
    n = Notifier(cfg)
    try:
        assert n.send(message_for(transition(new="resolved"))) == []
        assert len(n.send(message_for(transition()))) == 1
        assert n.flush(10)
        assert [r.json["title"] for r in http.received()] == [
            "[FIRING critical] worker_lost celery@w1 (group default)"
        ]
    finally:
        n.close(2)


def test_full_queue_drops_oldest_waiting(http, notifier_factory, caplog):
    caplog.set_level(logging.INFO)
    http.hang_next(60, n=1)
    n = notifier_factory(
        [chan("ops", f"json://{http.base}/hook?rto=30", timeout="1s")], retry=["100ms"], max_queue=2
    )
    msgs = [message_for(transition(subject=f"celery@w{i}")) for i in range(4)]
    n.send(msgs[0])
    http.wait_hanging(1)  # the first is in flight, held by the server
    for m in msgs[1:]:
        assert n.send(m)[0].result == "queued"
    assert n.flush(20)
    st = n.stats()["ops"]
    assert (st["delivered"], st["dropped"]) == (2, 2)
    titles = [r.json["title"] for r in http.received(answered=200)]
    assert len(titles) == 2 and msgs[3].title in titles  # the newest always survives
    assert sum("more than 2 messages wait" in r.getMessage() for r in caplog.records) == 2
