"""A Docker engine for the docker adapter's tests: podman's Docker-compatible API, driven by the real
``docker`` SDK (``bash .ci/podman-ci.sh setup`` starts it on unix:///run/podman-ci/podman.sock).

Workers run INSIDE containers of the tiny image ``localhost/ci-busybox``, with this test run's own
Python (interpreter, venv with celery[redis], tests/support/app) bind-mounted read-only and the
host's network (``network_mode="host"``: the worker reaches the test's private Redis on 127.0.0.1).
Every container a test starts carries the label ``celery-supervisor-test=<uid>`` and is removed
afterwards (containers outlive the process that started them).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tests.support.brokers import need
from tests.support.workers import APP_DIR

PODMAN_CI_SOCKET = "unix:///run/podman-ci/podman.sock"
IMAGE = os.environ.get("PODMAN_CI_IMAGE", "localhost/ci-busybox:latest")
TEST_LABEL = "celery-supervisor-test"
SETUP_HINT = "bash .ci/podman-ci.sh setup"


def engine_url() -> str:
    """DOCKER_HOST when set, else podman-ci's socket."""
    return os.environ.get("DOCKER_HOST") or PODMAN_CI_SOCKET


def connect(timeout: float = 30.0):
    """A docker SDK client to the engine, or need() (skip / fail in CI) when there is none."""
    try:
        import docker
    except ImportError:
        need("the docker SDK (pip install 'celery-supervisor[docker]')")
    url = engine_url()
    if url.startswith("unix://") and not os.path.exists(url[len("unix://"):]):
        need(f"podman's Docker API at {url} (run: {SETUP_HINT})")
    try:
        client = docker.DockerClient(base_url=url, timeout=timeout)
        client.ping()
    except Exception as e:
        need(f"podman's Docker API at {url} (run: {SETUP_HINT}): {e}")
    try:
        client.images.get(IMAGE)
    except Exception:
        client.close()
        need(f"the image {IMAGE} (run: {SETUP_HINT})")
    return client


def host_python_mounts() -> dict[str, dict[str, str]]:
    """Bind mounts that let the busybox image run this very interpreter and its venv."""
    mounts: dict[str, dict[str, str]] = {"/usr": {"bind": "/usr", "mode": "ro"}}
    for src, dst in (("/usr/lib", "/lib"), ("/usr/lib64", "/lib64")):
        if os.path.isdir(src):
            mounts[src] = {"bind": dst, "mode": "ro"}
    for p in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        if not p.startswith("/usr/") and p != "/usr":
            mounts[p] = {"bind": p, "mode": "ro"}
    # sys.executable may be a symlink into yet another tree (pyenv): mount the interpreter's own prefix
    exe_prefix = str(Path(os.path.realpath(sys.executable)).parent.parent)
    if not exe_prefix.startswith("/usr") and not any(exe_prefix.startswith(p) for p in mounts):
        mounts[exe_prefix] = {"bind": exe_prefix, "mode": "ro"}
    mounts[str(APP_DIR)] = {"bind": "/app", "mode": "ro"}
    return mounts


def worker_command(hostname: str, queues: str, pool: str = "solo", loglevel: str = "INFO") -> list[str]:
    # sys.executable, not its realpath: the venv's python finds the venv's site-packages
    return [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", hostname, "-Q", queues,
            "--pool", pool, "--concurrency", "1", "--without-mingle", "--without-gossip", "-l", loglevel]


class Containers:
    """Starts worker containers for one test and removes them (by its label) afterwards."""

    def __init__(self, client, uid: str):
        self.client = client
        self.uid = uid
        self.labels = {TEST_LABEL: uid}

    def run_worker(self, name: str, hostname: str, broker_url: str, queues: str, labels: dict | None = None,
                   restart_policy: dict | None = None, container_hostname: str | None = None,
                   environment: dict | None = None):
        """A container ``name`` whose own hostname is the node part of ``hostname`` (as with
        ``-n celery@%h``), running a real Celery worker for ``hostname``."""
        node = hostname.partition("@")[2]
        kw = {}
        if restart_policy:
            kw["restart_policy"] = restart_policy
        return self.client.containers.run(
            IMAGE, worker_command(hostname, queues), name=name, hostname=container_hostname or node,
            network_mode="host", labels={**self.labels, **(labels or {})}, working_dir="/app",
            volumes=host_python_mounts(), detach=True,
            environment={"PYTHONPATH": "/app", "PYTHONUNBUFFERED": "1", "HOME": "/root",
                         "CELERY_BROKER_URL": broker_url, **(environment or {})},
            **kw,
        )

    def run(self, name: str, command: list[str], labels: dict | None = None, **kw):
        """Any busybox container (a sleeper, a crasher)."""
        return self.client.containers.run(IMAGE, command, name=name, network_mode="host",
                                          labels={**self.labels, **(labels or {})}, detach=True, **kw)

    def inspect(self, name: str) -> dict:
        return self.client.api.inspect_container(name)

    def state(self, name: str) -> dict:
        return self.inspect(name)["State"]

    def kill(self, name: str) -> float:
        """SIGKILL through the API; returns time.time() of the kill."""
        t = time.time()
        self.client.api.kill(name, signal="SIGKILL")
        return t

    def kill_host_pid(self, name: str) -> float:
        """SIGKILL the container's PID 1 from the host (a crash: the engine's restart policy applies)."""
        pid = self.state(name)["Pid"]
        t = time.time()
        os.kill(pid, 9)
        return t

    def wait_dead(self, name: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(name)
            if not st["Running"]:  # Status reads "stopped" for a moment on podman, then "exited"
                return st
            time.sleep(0.02)
        raise AssertionError(f"container {name} still running {timeout}s after the kill")

    def remove_all(self) -> None:
        for c in self.client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={self.uid}"}):
            try:
                c.remove(force=True)
            except Exception:
                pass
