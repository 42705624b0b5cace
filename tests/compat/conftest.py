"""The compatibility suite's fleet: one run per Celery version (module scope), shared by the
parametrized tests that read its results, so that one 40-second healthy window serves every
scenario and each scenario is still reported as its own test."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.compat.fleetrun import VersionRun
from tests.support.compat_venvs import VenvError, ensure_all, suite_versions

RUNS: list[VersionRun] = []
_T0: list[float] = []


@pytest.fixture(scope="module", params=suite_versions(), ids=lambda v: f"celery{v}")
def compat_run(request, redis_server, tmp_path_factory):
    """All scenarios of one Celery version, run once under one `supervisor run` (see fleetrun.py)."""
    import redis

    version = request.param
    if not _T0:
        _T0.append(time.monotonic())
    problem = None
    try:
        ensure_all((version,))  # built ahead by .ci/run; built here when absent
    except VenvError as e:
        problem = str(e)
    if problem:  # a failure, never a skip
        pytest.fail(f"cannot build the worker venvs of celery {version}:\n{problem}", pytrace=False)
    url = f"{redis_server.url}/0"  # db 0 of this run's private server: the other tests use 1..15
    redis.Redis.from_url(url).flushdb()
    uid = f"p{os.getpid() % 100000}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELERY_BROKER_URL", url)  # the config says url: ${CELERY_BROKER_URL}, as the README's
        run = VersionRun(version, tmp_path_factory.mktemp(f"compat-{version}"), url, uid).run()
    RUNS.append(run)
    yield run


def pytest_terminal_summary(terminalreporter):
    if not RUNS:
        return
    from tests.compat.matrix import markdown

    docs = [r.to_json() for r in RUNS]
    tr = terminalreporter
    tr.section("celery compatibility matrix")
    tr.write_line(markdown(docs))
    tr.write_line(f"compatibility suite: {time.monotonic() - _T0[0]:.0f} s from its first fixture")
    path = os.environ.get("SUPERVISOR_COMPAT_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump({"runs": docs, "suite_seconds": round(time.monotonic() - _T0[0], 1)}, f, indent=1,
                      default=str)
