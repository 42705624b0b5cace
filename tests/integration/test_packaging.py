"""The package as a new user gets it: a wheel built from a copy of the repository (the files git tracks
or would track: what a fresh clone holds once committed), installed with its dependencies in a fresh
virtualenv by pip, then `supervisor print NAME` for every shipped file, compared byte for byte with
the repository's, the printed example config accepted by `check-config`, the status page's files in
the installed package, and `--version` naming the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.shipped import FILES

REPO = Path(__file__).resolve().parents[2]


def _run(argv, cwd, timeout=600, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={k: v for k, v in (env or os.environ).items()
                            if k not in ("SUPERVISOR_CONFIG", "PYTHONPATH")})  # the fresh venv's own packages only
    assert r.returncode == 0, f"{argv} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with the wheel installed."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src], cwd=tmp)
    wheels = list(dist.glob("celery_supervisor-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    _run([venv / "bin/python", "-m", "pip", "install", "-q", wheels[0]], cwd=tmp)
    return venv / "bin"


def test_the_wheel_provides_units_example_config_and_rbac_through_the_cli(installed, tmp_path):
    for name, (rel, _) in FILES.items():
        r = _run([installed / "supervisor", "print", name], cwd=tmp_path)
        assert r.stdout == (REPO / rel).read_text(encoding="utf-8"), f"supervisor print {name} differs from {rel}"
    example = tmp_path / "supervisor.yaml"
    example.write_text(_run([installed / "supervisor", "print", "example-config"], cwd=tmp_path).stdout)
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "MATTERMOST_URL")}
    r = _run([installed / "supervisor", "check-config", "-c", example], cwd=tmp_path, env=env)
    assert r.stdout.splitlines()[0].endswith(": OK"), r.stdout

    # the installed package is the one run, and it carries the status page and the licence
    v = _run([installed / "supervisor", "--version"], cwd=tmp_path).stdout
    assert str(installed.parent) in v, v
    page = _run([installed / "python", "-c",
                 "from supervisor.http import PAGE, page_file; print(sum(len(page_file(n)) for n, _ in PAGE.values()))"],
                cwd=tmp_path).stdout
    assert int(page) > 1000
    lic = list(installed.parent.glob("lib/python*/site-packages/celery_supervisor-*.dist-info/licenses/LICENSE"))
    assert lic and "MIT License" in lic[0].read_text()


def test_print_refuses_an_unknown_name(installed, tmp_path):
    r = subprocess.run([str(installed / "supervisor"), "print", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "example-config" in r.stderr, r
