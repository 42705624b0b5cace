"""The status document: what `supervisor status [--json]`, `/status` and the table show.

One document, two sources: the running supervisor (``/status``: its last tick) or the state file
(``supervisor status``: the last tick the daemon saved there). To the tick's own document
(workers, queues, findings, actions: the `once --json` keys) it adds the durable parts: restart
budgets, recent restarts, silences, the outbox. No secret is in it (URLs are shown redacted)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from supervisor import redact
from supervisor.durations import format_duration as fd

if TYPE_CHECKING:
    from supervisor.config import Config
    from supervisor.loop import Supervisor
    from supervisor.state import StateStore
    from supervisor.trend import QueueTrend

EMPTY = {"time": None, "workers": [], "queues": [], "findings": [], "actions": []}


def status_document(sup: Supervisor, trend: QueueTrend | None = None) -> dict:
    """The live document of a running supervisor (``/status``); with the daemon's ``trend``, each
    queue carries its last 15 minutes of lengths (``trend``: [[time, length], ...])."""
    from supervisor.loop import report_json

    r = sup.last_report
    doc = dict(EMPTY) if r is None else report_json(r, sup.cfg)
    doc["leader"] = sup.acting()
    if r is not None:
        _add_pid_and_since(doc, r)
    if trend is not None:
        for q in doc.get("queues", []):
            q["trend"] = trend.points(q.get("name"))
    doc["loop_interval"] = sup.cfg.loop.interval  # the status page marks data older than 3 cycles stale
    return add_durable(doc, sup.cfg, sup.state, sup.clock())


def _add_pid_and_since(doc: dict, r) -> None:
    """The status page's extras: each worker's pid (from its last heartbeat) and since when each
    finding's condition holds (its rule state)."""
    for w in doc.get("workers", []):
        seen = r.obs.workers.get(w.get("hostname"))
        w.setdefault("pid", seen.pid if seen is not None else None)
    states = r.decision.states
    for f in doc.get("findings", []):
        st = states.get(f"{f.get('rule')}:{f.get('subject')}")
        f.setdefault("since", st.since if st is not None else None)


def document_from_state(cfg: Config, store: StateStore, now: float | None = None) -> dict:
    """What ``supervisor status`` shows: the last tick saved by the daemon, plus the durable parts."""
    now = time.time() if now is None else now
    mem = store.load_memory()
    doc = dict(mem.get("status") or EMPTY)
    updated = store.memory_updated("status")
    doc["saved_at"] = updated
    doc["age"] = round(now - updated, 3) if updated else None
    doc["stale"] = updated is None or now - updated > max(3 * cfg.loop.interval, 30.0)
    return add_durable(doc, cfg, store, now)


def add_durable(doc: dict, cfg: Config, store: StateStore | None, now: float) -> dict:
    from supervisor import policy

    doc["state_path"] = str(cfg.loop.state_path)
    if store is None:
        doc.update(budgets=[], recent_restarts=[], silences=[], outbox={})
        return doc
    windows = {g.name: g.restart.window for g in cfg.groups if g.restart is not None}
    history = store.history(now - max(windows.values(), default=0.0))
    state = policy.PolicyState(history=history)
    groups = {}
    for row in store.recent_restarts(500):
        groups.setdefault(row.target, (row.group, row.hostname))
    budgets = []
    for target in sorted(history):
        grp, hostname = groups.get(target, (None, None))
        g = cfg.group(grp) if grp else None
        if g is None or g.restart is None:
            continue
        b = policy.budget(state, g, target, now)
        if b.used == 0:
            continue
        budgets.append({"target": target, "group": g.name, "hostname": hostname, "used": b.used, "max": b.max,
                        "left": b.left, "spent": b.spent, "window": g.restart.window,
                        "next_allowed_at": b.next_at if b.next_at and b.next_at > now else None})
    doc["budgets"] = budgets
    doc["recent_restarts"] = [
        {"at": r.at, "target": r.target, "group": r.group, "hostname": r.hostname, "reason": r.reason,
         "outcome": r.outcome, "message": redact.scrub(r.message or "")}
        for r in store.recent_restarts(20)
    ]
    doc["silences"] = [s.to_json() for s in store.silences(now)]
    doc["outbox"] = store.outbox_counts()
    return doc


# ---------------------------------------------------------------- the table for people
def _ago(now: float, t: float | None) -> str:
    return "-" if t is None else f"{fd(max(0.0, now - t))} ago"


def _slots(w: dict) -> str:
    """active/concurrency (issue 10): a full pool is busy, never stalled."""
    a, c = w.get("active"), w.get("concurrency")
    return "-" if a is None and c is None else f"{'?' if a is None else a}/{'?' if c is None else c}"


def _num(x, unit: str = "") -> str:
    return "-" if x is None else f"{x:g}{unit}"


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    if not rows:
        return ["  (none)"]
    rows = [["-" if x is None else x for x in r] for r in rows]  # unknown, not "None"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip()] + [fmt.format(*map(str, r)).rstrip() for r in rows]


def render_table(doc: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    out = []
    age = doc.get("age")
    when = "never" if doc.get("time") is None else f"{fd(age)} ago" if age is not None else "-"
    stale = "  STALE: is `supervisor run` running with this config?" if doc.get("stale") else ""
    out.append(f"celery-supervisor status: last cycle {when}{stale}")
    b = doc.get("broker") or {}
    if b:
        out.append(f"broker: {b.get('url')}  {'ok' if b.get('ok') else 'UNREACHABLE: ' + str(b.get('error'))}")
    out.append(f"state: {doc.get('state_path')}")
    out += ["", "WORKERS"]
    out += _table([[w["hostname"], w["group"], w["status"] + (f" ({w['stall']})" if w.get("stall") else ""),
                    "-" if w.get("last_heartbeat_age") is None else f"{w['last_heartbeat_age']:.1f}s ago",
                    _slots(w), _num(w.get("processed_rate"), "/s"),
                    "-" if w.get("last_task_age") is None else f"{fd(w['last_task_age'])} ago",
                    w.get("target") or "-", w.get("platform_state") or "-"] for w in doc.get("workers", [])],
                  ["HOSTNAME", "GROUP", "STATUS", "HEARTBEAT", "ACTIVE", "TAKES", "LAST TASK", "TARGET", "PLATFORM"])
    out += ["", "QUEUES"]
    out += _table([[q["name"], q.get("length"), q.get("ready"), q.get("unacked"), q.get("consumers"),
                    _num(q.get("drain_rate"), "/s") + (" SATURATED" if q.get("saturated") else "")]
                   for q in doc.get("queues", [])], ["NAME", "LENGTH", "READY", "UNACKED", "CONSUMERS", "DRAINS"])
    out += ["", "FINDINGS"]
    out += _table([[f.get("state", "-"), f["severity"], f["rule"], f["subject"], f["summary"][:80]]
                   for f in doc.get("findings", [])], ["STATE", "SEVERITY", "RULE", "SUBJECT", "SUMMARY"])
    out += ["", "RECENT RESTARTS"]
    out += _table([[_ago(now, r["at"]), r["target"], r.get("hostname") or "-", r["outcome"],
                    (r.get("reason") or "")[:60]] for r in doc.get("recent_restarts", [])[:10]],
                  ["WHEN", "TARGET", "HOSTNAME", "OUTCOME", "REASON"])
    out += ["", "RESTART BUDGETS (targets restarted within their window)"]
    out += _table([[x["target"], x["group"], f"{x['used']}/{x['max']}", "SPENT" if x["spent"] else x["left"],
                    "-" if not x.get("next_allowed_at") else f"in {fd(x['next_allowed_at'] - now)}"]
                   for x in doc.get("budgets", [])], ["TARGET", "GROUP", "USED", "LEFT", "NEXT ALLOWED"])
    out += ["", "SILENCES"]
    out += _table([[s["id"], s["match"], f"for {fd(s['until'] - now)}", s["reason"], s.get("author") or "-"]
                   for s in doc.get("silences", [])], ["ID", "MATCH", "ENDS", "REASON", "BY"])
    ob = doc.get("outbox") or {}
    out += ["", f"ALERT OUTBOX: {ob.get('pending', 0)} pending, {ob.get('delivered', 0)} delivered, "
                f"{ob.get('failed', 0)} failed (last 24h)"]
    return redact.scrub("\n".join(out))
