"""The compatibility matrix as a table, from the runs' JSON documents (``VersionRun.to_json()``)."""

from __future__ import annotations

from tests.compat.fleetrun import (
    BUSY_PHASES,
    BUSY_TASK_S,
    busy_page_problems,
    busy_restart_problems,
    healthy_problems,
    kill_problems,
)

CHECKS = (("healthy", healthy_problems), ("sigkill", kill_problems), ("busy-restart", busy_restart_problems),
          ("busy-page", busy_page_problems))


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _busy_one(b: dict | None) -> str:
    if not b:
        return "-"
    if b["restarts"] or b["starts"]:
        first = b["restarts"][0] if b["restarts"] else {}
        what = f"RESTARTED at {first.get('at', '?')} s"
    else:
        what = "not restarted"
    if len(b.get("copies") or []) > 1:
        what += f", {len(b['copies'])} copies"
    if b.get("status_mid"):
        what += f", {b['status_mid'].split(' ')[0]}"
    if b["alerts"]:
        what += f", {len(b['alerts'])} alert(s)"
    if b.get("once_findings"):
        what += f", once: {len(b['once_findings'])} finding(s)"
    return what


def _busy(r: dict) -> str:
    return "; ".join(f"{'by hand' if p == 'busy' else 'after restart'}: {_busy_one(r.get(p))}" for p in BUSY_PHASES)


def rows(runs: list[dict]) -> list[list[str]]:
    out = []
    for run in runs:
        for name, r in run["scenarios"].items():
            h, k = r.get("healthy") or {}, r.get("kill") or {}
            failed = [label for label, check in CHECKS if check(run, name)]
            out.append([
                name, r["setup"], run["version"],
                "-" if not h else str(max(len(h["restarts"]), h["starts"])),
                "-" if not h else str(len(h["alerts"])),
                _s(k.get("restart_s")), _s(k.get("ping_s")),
                "-" if "restarts" not in k else str(max(len(k["restarts"]), k["starts"])),
                _busy(r),
                "pass" if not failed else "FAIL: " + ", ".join(failed),
            ])
    return out


HEAD = ["scenario", "setup", "Celery", "restarts in 40 s healthy", "alerts healthy",
        "SIGKILL -> restart issued (s)", "SIGKILL -> ping (s)", "restarts after SIGKILL",
        f"busy ({BUSY_TASK_S:.0f} s task)", "result"]


def markdown(runs: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows(runs)]
    for run in runs:
        d = run.get("durations") or {}
        venvs = "; ".join(f"{f}: " + " ".join(f"{k} {v}" for k, v in vers.items())
                          for f, vers in (run.get("venvs") or {}).items())
        lines.append(f"\ncelery {run['version']}: run {d.get('total', '?')} s "
                     f"({', '.join(f'{k} {v} s' for k, v in d.items() if k != 'total')}); {venvs}")
        for phase, once in (run.get("once_mid_task") or {}).items():
            lines.append(f"  `supervisor once --dry-run --json` mid-task ({BUSY_PHASES[phase]}): {once}")
        if run.get("error"):
            lines.append(f"  run error: {run['error'].splitlines()[0]}")
    return "\n".join(lines)
