"""Worker virtualenvs for the compatibility suite (tests/compat): one venv per Celery version and
flavour, made with this machine's Python and pip, cached and reused.

    ~/.cache/celery-supervisor-tests/venvs/<celery version>-py<X.Y>[-<flavour>]/

(``$CELERY_SUPERVISOR_TESTS_CACHE`` replaces ``~/.cache/celery-supervisor-tests``.) A venv is
reused when its stamp file names the same requirements and Python and its interpreter still imports
Celery; otherwise it is built again. Builds hold a lock per venv, so two runs never build one venv
at once. A failed build raises ``VenvError`` with pip's last words: for the suite that is a failure,
never a skip.

Build them all ahead of the tests (what ``.ci/run`` does; the builds run in parallel):

    python -m tests.support.compat_venvs            # builds what is missing, prints what it has
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# The Celery versions the suite runs workers of: the oldest and the newest 5.x we support.
# 5.0.x and 5.1.x start on Python 3.11 with the kombu of their time, but their metadata
# (`pytz>dev`) is refused by pip >= 24.1 ("Please use pip<24.1"), so they cannot be installed
# with a current pip; 4.4.7 imports only on Python <= 3.8.
OLDEST = "5.2.7"
NEWEST = "5.7.0"
VERSIONS = (OLDEST, NEWEST)

# What a fleet of that version ran with: the kombu and redis-py of its release. Today's pip would
# pair celery 5.2.7 with kombu 5.7, whose Redis transport then fails to import ("No module named
# 'packaging'": celery 5.2's `redis` extra predates kombu's own).
ERA_PINS: dict[str, tuple[str, ...]] = {
    "5.2.7": ("kombu==5.2.4", "redis==4.3.4"),
}

# flavour -> extra packages. "plain" carries gevent (for --pool gevent); "setproctitle" is the
# same worker with setproctitle installed, as celery recommends and many images ship it.
FLAVOURS: dict[str, tuple[str, ...]] = {
    "plain": ("gevent",),
    "setproctitle": ("setproctitle",),
}

BUILD_TIMEOUT = 900.0  # one pip install, seconds
STAMP = "celery-supervisor-tests.json"


class VenvError(RuntimeError):
    """A venv could not be built or does not work."""


def cache_root() -> Path:
    base = os.environ.get("CELERY_SUPERVISOR_TESTS_CACHE") or os.path.expanduser("~/.cache/celery-supervisor-tests")
    return Path(base) / "venvs"


def base_python() -> str:
    """The interpreter new venvs are made from: the one behind this (virtual) environment."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def python_tag() -> str:
    return f"py{sys.version_info[0]}.{sys.version_info[1]}"


@dataclass(frozen=True)
class WorkerVenv:
    celery: str  # the Celery version, "5.7.0"
    flavour: str  # a key of FLAVOURS
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def celery_script(self) -> str:
        return str(self.path / "bin" / "celery")

    @property
    def requirements(self) -> list[str]:
        return [f"celery[redis]=={self.celery}", *ERA_PINS.get(self.celery, ()), *FLAVOURS[self.flavour]]

    @property
    def key(self) -> str:
        """What the cached venv must have been built from: requirements and interpreter."""
        raw = json.dumps([self.requirements, base_python(), sys.version], sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def stamp(self) -> dict | None:
        try:
            return json.loads((self.path / STAMP).read_text())
        except (OSError, ValueError):
            return None

    def versions(self) -> dict[str, str]:
        """Installed versions of what matters (from the stamp)."""
        s = self.stamp() or {}
        return dict(s.get("versions") or {})


def venv_for(celery: str, flavour: str = "plain") -> WorkerVenv:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}")
    suffix = "" if flavour == "plain" else f"-{flavour}"
    return WorkerVenv(celery, flavour, cache_root() / f"{celery}-{python_tag()}{suffix}")


_PROBE = (
    "import json, importlib.metadata as m\n"
    "import celery, kombu.transport.redis\n"
    "out = {}\n"
    "for d in ('celery', 'kombu', 'redis', 'billiard', 'gevent', 'setproctitle'):\n"
    "    try:\n"
    "        out[d] = m.version(d)\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "print(json.dumps(out))\n"
)


def _probe(v: WorkerVenv) -> dict[str, str]:
    """Runs the venv's python: Celery and kombu's Redis transport import; their versions."""
    try:
        r = subprocess.run([v.python, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VenvError(f"{v.path}: its python does not run: {e}") from None
    if r.returncode != 0:
        raise VenvError(f"{v.path}: celery does not import:\n{r.stderr.strip()[-2000:]}")
    versions = json.loads(r.stdout.strip().splitlines()[-1])
    if versions.get("celery") != v.celery:
        raise VenvError(f"{v.path}: celery {versions.get('celery')} installed, {v.celery} wanted")
    return versions


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure(v: WorkerVenv, log=None) -> WorkerVenv:
    """The venv, built if absent or stale. Raises VenvError when it cannot be built."""
    say = log or (lambda msg: None)
    with _locked(v.path.with_name(v.path.name + ".lock")):
        s = v.stamp()
        if s is not None and s.get("key") == v.key:
            try:
                _probe(v)
                return v
            except VenvError as e:
                say(f"{v.path.name}: cached venv is broken, rebuilding ({e})")
        if v.path.exists():
            shutil.rmtree(v.path)
        t0 = time.monotonic()
        say(f"{v.path.name}: building ({' '.join(v.requirements)})")
        try:
            return _build(v, t0, say)
        except BaseException:
            shutil.rmtree(v.path, ignore_errors=True)  # never leave half a venv behind
            raise


def _build(v: WorkerVenv, t0: float, say) -> WorkerVenv:
    try:
        r = subprocess.run([base_python(), "-m", "venv", str(v.path)], capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise VenvError(f"{v.path}: python -m venv failed:\n{(r.stdout + r.stderr).strip()[-2000:]}")
        r = subprocess.run([v.python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *v.requirements], capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise VenvError(f"{v.path}: {e.cmd[:3]} took more than {e.timeout:.0f}s") from None
    if r.returncode != 0:
        out = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "is ignored" not in line)
        raise VenvError(f"{v.path}: pip install {' '.join(v.requirements)} failed "
                        f"(exit {r.returncode}):\n{out.strip()[-3000:]}")
    versions = _probe(v)
    (v.path / STAMP).write_text(json.dumps({
        "key": v.key, "requirements": v.requirements, "python": base_python(), "python_version": sys.version,
        "versions": versions, "built_at": time.time(), "build_seconds": round(time.monotonic() - t0, 1),
    }, indent=1))
    say(f"{v.path.name}: built in {time.monotonic() - t0:.0f}s: "
        + ", ".join(f"{k} {x}" for k, x in versions.items()))
    return v


def all_venvs(versions=VERSIONS) -> list[WorkerVenv]:
    return [venv_for(c, f) for c in versions for f in FLAVOURS]


def ensure_all(versions=VERSIONS, log=None) -> list[WorkerVenv]:
    """Every venv the suite needs, built in parallel; VenvError names every one that failed."""
    venvs = all_venvs(versions)
    errors = []
    with ThreadPoolExecutor(max_workers=len(venvs)) as pool:
        futures = [pool.submit(ensure, v, log) for v in venvs]
        for f in futures:
            try:
                f.result()
            except VenvError as e:
                errors.append(str(e))
    if errors:
        raise VenvError("\n\n".join(errors))
    return venvs


def suite_versions() -> tuple[str, ...]:
    """The versions the suite runs: VERSIONS, or $SUPERVISOR_COMPAT_CELERY ("5.2.7,5.7.0")."""
    raw = os.environ.get("SUPERVISOR_COMPAT_CELERY", "").strip()
    return tuple(x.strip() for x in raw.split(",") if x.strip()) or VERSIONS


def main() -> int:
    t0 = time.monotonic()
    try:
        venvs = ensure_all(suite_versions(), log=lambda m: print(f"compat venvs: {m}", flush=True))
    except VenvError as e:
        print(f"compat venvs: FAILED\n{e}", file=sys.stderr)
        return 1
    for v in venvs:
        ver = v.versions()
        print(f"compat venvs: {v.path}  " + " ".join(f"{k}={x}" for k, x in ver.items()))
    print(f"compat venvs: ready in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
