"""The status page (GET /) in a real headless Chromium (Debian's `chromium`, over the DevTools
protocol: tests/support/browser.py): a real fleet of 3 local workers behind `supervisor run` with a
token, one SIGKILLed and restarted, seen on the page without a reload; the screenshot is kept (CI
artifact: $SUPERVISOR_TEST_ARTIFACTS). Then the page's own behaviour on documents served by a real
HttpServer: stale data marked, retired workers not shown as failures, filters, hostile names shown
as text, and the render time of 1,000 workers (measured and kept, not asserted)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from supervisor.http import HttpServer
from tests.support.brokers import free_port
from tests.support.browser import Browser, artifacts_dir, synthetic_status
from tests.support.fleet import Fleet, local_restart, wait_until
from tests.support.workers import wait_ping

HTTP_TOKEN = "page-token-Zq81xLw3-4711"
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()


def rows(b: Browser) -> dict[str, dict]:
    """What the page shows per worker: hostname -> {status, pid, text}."""
    return b.eval("""Object.fromEntries([...document.querySelectorAll('tr.w')].map(r =>
        [r.dataset.hostname, {status: r.dataset.status, pid: r.children[3].textContent,
                              text: r.textContent}]))""")


# ---------------------------------------------------------------- a real fleet, with a token
def test_page_shows_a_real_fleet_and_a_killed_workers_restart_without_reload(
        browser, redis_url, tmp_path, uid, fleets):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    hosts = [f"celery@{uid}-{i}" for i in (1, 2, 3)]
    f = Fleet(tmp_path, {
        "broker": {"url": redis_url},
        "loop": {"interval": "1s", "ping_timeout": "500ms"},
        "groups": [{"name": "web", "workers": hosts, "min_workers": 3, "heartbeat_timeout": "4s",
                    "restart": local_restart(redis_url, queues=f"{uid}-q")}],
        "queues": [{"name": f"{uid}-q", "warning": 100}],
        "http": {"listen": f"127.0.0.1:{port}", "token": HTTP_TOKEN},
        "ha": {"lease": "off"},
    })
    fleets.append(f)
    app = f.start_workers(*hosts)
    f.run()

    # the browser sends the token as basic auth (the page itself holds no secret)
    browser.headers({"Authorization": "Basic " + base64.b64encode(f"ops:{HTTP_TOKEN}".encode()).decode()})
    wait_until(lambda: _http_ok(base), 60, what="the daemon's page")
    browser.open(f"{base}/")
    browser.wait(f"document.querySelectorAll('tr.w[data-status=alive]').length === {len(hosts)}", 60,
                 what="3 alive workers on the page")
    shown = rows(browser)
    assert sorted(shown) == hosts
    assert all(r["pid"].isdigit() and int(r["pid"]) == f.pid(h) for h, r in shown.items()), shown
    assert browser.eval("document.body.innerText").count(HTTP_TOKEN) == 0
    assert "STALE" not in browser.eval("document.body.innerText")

    # SIGKILL one worker; the page (never reloaded: a marker set now must survive) shows it back with a new
    # pid and the restart with its outcome
    browser.eval("window.notReloaded = true")
    polls = browser.eval("window.polls")
    victim = hosts[1]
    old = f.kill(victim)
    wait_until(lambda: (p := f.pid(victim)) not in (None, old) and p, 60, what="the restart")
    wait_ping(app, victim, 60)
    new = f.pid(victim)
    browser.wait(f"""(() => {{ const r = document.querySelector('tr.w[data-hostname="{victim}"]');
        return r && r.dataset.status === 'alive' && r.children[3].textContent === '{new}'; }})()""", 30,
                 what="the restarted worker alive with its new pid on the page")
    browser.wait(f"document.querySelector('tr[data-restart=\"{victim}\"]') !== null", 30,
                 what="the restart in the recent restarts")
    restart_row = browser.eval(f"document.querySelector('tr[data-restart=\"{victim}\"]').innerText")
    assert "ok" in restart_row.split() or "\tok\t" in restart_row, restart_row
    assert browser.eval("window.notReloaded === true"), "the page was reloaded"
    assert browser.eval("window.polls") > polls
    assert sum(r["status"] == "alive" for r in rows(browser).values()) == 3

    shot = browser.screenshot(artifacts_dir(tmp_path) / "status-page.png")
    assert shot.stat().st_size > 10_000
    if os.environ.get("SUPERVISOR_UPDATE_DOCS_SCREENSHOT") == "1":
        DOCS_SHOT.write_bytes(shot.read_bytes())
    assert f.stop() == 0


def _http_ok(base: str) -> bool:
    import urllib.request

    req = urllib.request.Request(f"{base}/status", headers={"Authorization": f"Bearer {HTTP_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200 and json.load(r).get("time") is not None
    except OSError:
        return False


# ---------------------------------------------------------------- the page's behaviour on given documents
class Doc:
    """The document a real HttpServer serves as /status, changed by the test."""

    def __init__(self, doc: dict):
        self.doc = doc

    def __call__(self) -> dict:
        return self.doc


@pytest.fixture
def served():
    from prometheus_client import CollectorRegistry

    servers = []

    def serve(doc: dict) -> tuple[str, Doc]:
        d = Doc(doc)
        s = HttpServer(f"127.0.0.1:{free_port()}", CollectorRegistry(), lambda: (True, "ok"), d).start()
        servers.append(s)
        return f"http://127.0.0.1:{s.port}", d

    yield serve
    for s in servers:
        s.stop()


def test_stale_data_is_marked_and_retired_workers_are_not_failures(browser, served):
    doc = synthetic_status(18, time.time())
    base, d = served(doc)
    browser.headers({})
    browser.open(f"{base}/")
    browser.wait("window.polls >= 1", 20)
    assert browser.eval("document.getElementById('stale').hidden") is True
    statuses = [r["status"] for r in rows(browser).values()]
    assert "retired" not in statuses and "lost" in statuses  # retired hidden by default, lost shown
    text = browser.eval("document.getElementById('groups').innerText")
    assert "need attention" in text
    # only problems: no alive, busy or retired row
    browser.eval("document.getElementById('f-state').value = 'problem';"
                 "document.getElementById('f-state').dispatchEvent(new Event('input'))")
    assert {r["status"] for r in rows(browser).values()} == {"lost"}
    browser.eval("document.getElementById('f-state').value = 'retired';"
                 "document.getElementById('f-state').dispatchEvent(new Event('input'))")
    assert {r["status"] for r in rows(browser).values()} == {"retired"}
    browser.eval("document.getElementById('f-state').value = '';"
                 "document.getElementById('f-worker').value = 'web-0003';"
                 "document.getElementById('f-worker').dispatchEvent(new Event('input'))")
    assert list(rows(browser)) == ["celery@web-0003"]

    # the daemon's last cycle 10 minutes old: marked stale at the next poll, without a reload
    d.doc = dict(doc, time=time.time() - 600)
    browser.wait("!document.getElementById('stale').hidden", 20, what="the stale banner")
    assert "STALE" in browser.eval("document.getElementById('stale').innerText")


def test_names_from_the_broker_are_shown_as_text(browser, served):
    doc = synthetic_status(2, time.time())
    evil = 'celery@<img src=x onerror="window.pwned=1">'
    doc["workers"][0].update(hostname=evil, reason="<script>window.pwned=2</script>")
    doc["queues"][0]["name"] = "<b>q</b>"
    base, _ = served(doc)
    browser.headers({})
    browser.open(f"{base}/")
    browser.wait("window.polls >= 1", 20)
    assert browser.eval("window.pwned === undefined")
    assert evil in rows(browser)
    assert browser.eval("document.querySelectorAll('#groups img, #queues b, #groups script').length") == 0


def test_render_time_of_1000_workers_is_measured(browser, served, tmp_path):
    """Measured, not asserted (timing on a shared machine): performance.now() around the page's own
    render of a /status document of 1,000 workers, and the time from navigation to the first render."""
    doc = synthetic_status(1000, time.time())
    base, _ = served(doc)
    browser.headers({})
    browser.open(f"{base}/")
    browser.wait("window.polls >= 1", 30)
    first = browser.eval("window.firstRenderAt")  # ms from navigation to the first render done (fetch included)
    assert browser.eval("document.querySelectorAll('tr.w').length") == len(
        [w for w in doc["workers"] if w["status"] != "retired"])
    browser.eval(f"window.synthetic = {json.dumps(doc)}")
    times = [browser.eval(f"window.renderStatus(window.synthetic, {doc['time']})") for _ in range(7)]
    times.sort()
    # the same with the browser's layout forced (offsetHeight) inside the measurement
    laid = sorted(browser.eval(f"""(() => {{ const t = performance.now();
        window.renderStatus(window.synthetic, {doc['time']}); document.body.offsetHeight;
        return performance.now() - t; }})()""") for _ in range(7))
    # a refresh as the page does it every 3 s: fetch /status (1,000 workers), parse, render
    refresh = []
    for _ in range(3):
        n = browser.eval("window.polls")
        browser.wait(f"window.polls > {n}", 20)
        refresh.append(browser.eval("window.lastPollMs"))
    result = {"workers": 1000, "render_ms_median": round(times[3], 1), "render_ms_max": round(times[-1], 1),
              "refresh_ms": [round(x, 1) for x in refresh],
              "render_and_layout_ms_median": round(laid[3], 1),
              "navigation_to_first_render_ms": round(first, 1)}
    (artifacts_dir(tmp_path) / "status-page-render.json").write_text(json.dumps(result, indent=2))
    print("status page, 1,000 workers:", result)
    assert all(t > 0 for t in times)
