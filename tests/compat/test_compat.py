"""Compatibility: real workers of the oldest and the newest Celery we support (each from a venv of
its own), in every setup of tests/compat/scenarios.py (pools prefork/solo/threads/gevent, without
heartbeat/gossip/mingle, setproctitle installed, the console script without -n), first started by
hand as their users would, kept alive by a real `supervisor run` on the local platform. One fleet
per Celery version runs every scenario at once (conftest.compat_run, phases in fleetrun.py); each
scenario and check below is its own test, so a failure names the setup and the reason. The
matrix table is printed at the end of the run (bench/compat_matrix.py prints it alone)."""

from __future__ import annotations

import pytest

from tests.compat.fleetrun import (
    BUSY_TASK_S,
    HEALTHY_S,
    HUNG_TIMEOUT,
    busy_page_problems,
    busy_restart_problems,
    healthy_problems,
    kill_problems,
)
from tests.compat.scenarios import BY_NAME, SCENARIOS

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]

NAMES = [s.name for s in SCENARIOS]


def check(problems, run, name: str, what: str) -> None:
    found = problems(run.to_json(), name)
    if found:
        pytest.fail(f"celery {run.version}, {name} ({BY_NAME[name].describe()}): {what}:\n- "
                    + "\n- ".join(found), pytrace=False)


@pytest.mark.parametrize("scenario", NAMES)
def test_healthy_worker_is_left_alone(compat_run, scenario):
    """40 s of a healthy worker: no restart, no alert, and `supervisor status` says alive."""
    check(healthy_problems, compat_run, scenario, f"{HEALTHY_S:.0f} s healthy")


@pytest.mark.parametrize("scenario", NAMES)
def test_sigkill_gives_one_restart_and_the_worker_answers_again(compat_run, scenario):
    """SIGKILL of the worker's main process: exactly one restart, one copy running, a pong."""
    check(kill_problems, compat_run, scenario, "SIGKILL of its main process")


@pytest.mark.parametrize("scenario", NAMES)
def test_busy_worker_is_not_restarted_before_hung_timeout(compat_run, scenario):
    """A task longer than heartbeat_timeout (a solo pool then neither heartbeats nor answers ping):
    the worker keeps its one process and is not restarted before hung_timeout; checked on the
    worker started by hand, and again on the one the supervisor started after the SIGKILL."""
    check(busy_restart_problems, compat_run, scenario,
          f"busy in a {BUSY_TASK_S:.0f} s task (hung_timeout {HUNG_TIMEOUT:.0f} s)")


@pytest.mark.parametrize("scenario", NAMES)
def test_busy_worker_pages_nothing(compat_run, scenario):
    """Busy is not broken: while busy within hung_timeout nothing is delivered about the worker or
    its queue, and `supervisor once` finds nothing to warn about."""
    check(busy_page_problems, compat_run, scenario,
          f"busy in a {BUSY_TASK_S:.0f} s task (hung_timeout {HUNG_TIMEOUT:.0f} s)")
