"""The Celery compatibility matrix as a table: runs the compatibility suite (tests/compat) and prints,
per scenario and Celery version, restarts in the 40 s healthy window, seconds from SIGKILL to the
restart the supervisor issued (its own record, `supervisor status --json`) and to the worker's
first pong, restarts after the SIGKILL, what a 15 s task did (started by hand, then started by the
supervisor), and which checks failed; then each run's duration and the worker venvs' versions.

Usage:  python bench/compat_matrix.py [--celery 5.2.7,5.7.0] [--from results.json] [--json OUT]
        --from prints the table of an earlier run's results (SUPERVISOR_COMPAT_RESULTS=FILE pytest ...)
Exit code: pytest's (0 when every scenario passed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.compat.matrix import markdown  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--celery", help="Celery versions, comma-separated (default: the suite's, oldest and newest)")
    ap.add_argument("--from", dest="source", help="print the table of this results file; run nothing")
    ap.add_argument("--json", help="also copy the results document here")
    a = ap.parse_args()
    rc = 0
    if a.source:
        doc = json.loads(Path(a.source).read_text())
        took = doc.get("suite_seconds")
    else:
        out = Path(tempfile.mkdtemp(prefix="compat-matrix-")) / "results.json"
        env = {**os.environ, "SUPERVISOR_COMPAT_RESULTS": str(out)}
        if a.celery:
            env["SUPERVISOR_COMPAT_CELERY"] = a.celery
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "tests/compat", "-q", "-p", "no:cacheprovider"],
                             cwd=ROOT, env=env)
        took = round(time.monotonic() - t0, 1)
        if not out.exists():
            print("the suite wrote no results (see pytest's output above)", file=sys.stderr)
            return rc or 2
        doc = json.loads(out.read_text())
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    print()
    print(markdown(doc["runs"]))
    print(f"\ncompatibility suite: {took} s in all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
