"""The Nagios plugin line: `CELERY CRITICAL - summary | perfdata`."""

from __future__ import annotations

import re

from supervisor.config import Config

STATUS = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}


def _label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", name)


def nagios_line(report, cfg: Config) -> str:
    d, obs = report.decision, report.obs
    code = report.exit_code
    if code == 3:
        return f"CELERY UNKNOWN - could not observe the broker {cfg.broker.display_url}: {obs.broker_error}"
    alive = [v for v in d.verdicts if v.alive]  # alive, or busy within hung_timeout
    counted = [v for v in d.verdicts if v.status not in ("retired",)]
    parts = [f"{len(alive)}/{len(counted)} workers alive"]
    bad = [f for f in d.findings if f.severity in ("warning", "critical")]
    parts += [f.summary for f in sorted(bad, key=lambda f: f.severity != "critical")[:5]]
    if len(bad) > 5:
        parts.append(f"and {len(bad) - 5} more")
    perf = [f"workers_alive={len(alive)};;;0", f"workers_expected={len(counted)};;;0"]
    for g in cfg.groups:
        n = sum(v.alive for v in d.verdicts if v.group == g.name)
        crit = f"{g.min_workers}:" if g.min_workers else ""
        perf.append(f"group_{_label(g.name)}_alive={n};;{crit};0")
    for q in cfg.queues:
        seen = obs.queues.get(q.name)
        if seen is None or seen.length is None:
            continue
        w = "" if q.warning is None else q.warning
        c = "" if q.critical is None else q.critical
        perf.append(f"queue_{_label(q.name)}={seen.length};{w};{c};0")
    summary = "; ".join(parts).replace("|", "/")
    return f"CELERY {STATUS[code]} - {summary} | {' '.join(perf)}"
