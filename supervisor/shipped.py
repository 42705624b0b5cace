"""The files the package ships for deployment, printed by `supervisor print NAME`.

One source of truth: the files live at their repository paths (systemd/, deploy/, the top level),
where the tests and .ci read them; setup.py's build step copies them into the wheel under
``supervisor/data/``. An editable install (a checkout) has no copies: they are read from the
checkout."""

from __future__ import annotations

from pathlib import Path

# NAME -> (path in the repository, what it is)
FILES: dict[str, tuple[str, str]] = {
    "example-config": ("config.example.yaml", "every option, commented (supervisor check-config accepts it)"),
    "unit": ("systemd/celery-supervisor.service", "the systemd unit that runs `supervisor run`"),
    "worker-unit": ("systemd/celery-worker@.service", "a templated systemd unit for Celery workers"),
    "rbac": ("deploy/kubernetes/rbac.yaml", "the Kubernetes ServiceAccount, Role and RoleBinding it needs"),
}


def data_name(repo_path: str) -> str:
    """Its file name inside supervisor/data/."""
    return Path(repo_path).name


def read(name: str) -> str:
    from importlib import resources

    repo_path, _ = FILES[name]
    packaged = resources.files("supervisor").joinpath("data", data_name(repo_path))
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / repo_path
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise FileNotFoundError(f"{name}: {repo_path} is in neither the installed package nor a checkout")
