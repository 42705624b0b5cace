"""A real systemd (252, Debian bookworm) as PID 1 in a podman container, for the tests of the shipped
units and of the systemd adapter against the real ``systemctl`` / ``journalctl``.

``.ci/systemd-ci.sh setup`` builds the image (once, ~40 s); each test module boots a container of its
own from it (``start``, ~0.7 s, with ``--cgroupns=private --cap-add=SYS_ADMIN --network=host``: see
the script's header) and removes it afterwards (``teardown``, by its name). The host network lets
the services inside reach the test's private Redis and alert catcher on 127.0.0.1, and the test
reach their HTTP endpoints.

The installs are the README's own shell blocks, run as written inside the container
(``readme_block``): the package from a copy of this working tree, pip offline from a wheelhouse of
the dependencies (``PIP_NO_INDEX``/``PIP_FIND_LINKS``: the command stays the README's). The
wheelhouse is downloaded once by the container's own pip (its Python decides the markers), cached
under ``~/.cache/celery-supervisor-tests/systemd-wheels/``.

    c = Container.boot("sv-unit-123", hostname="sdunit")
    c.sh("systemctl daemon-reload")
    c.show("celery-supervisor.service")["ActiveState"]
    c.remove()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.brokers import need

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "systemd-ci.sh"
README = REPO / "README.md"
SETUP_HINT = "bash .ci/systemd-ci.sh setup"
CACHE = Path(os.environ.get("CELERY_SUPERVISOR_TESTS_CACHE") or Path.home() / ".cache" / "celery-supervisor-tests")
RUN_ID = os.environ.get("SD_RUN_ID") or f"pytest-{os.getpid()}"
# what `tar` leaves out of the copy of this tree that the README's `pip install ./celery-supervisor` installs
COPY_EXCLUDES = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
                 "supervisor-state.db*")


def _script(verb: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), verb], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def image() -> str:
    """The image's name (a tag per package list, from the script), or need() when it is missing."""
    if shutil.which("podman") is None:
        need(f"podman, for systemd as PID 1 in a container (run: {SETUP_HINT})")
    name = _script("image").stdout.strip()
    if not name or subprocess.run(["podman", "image", "exists", name]).returncode != 0:
        need(f"the image {name or '?'} with systemd as PID 1 (run: {SETUP_HINT})")
    return name


def readme_block(heading: str, lang: str = "sh", index: int = 0) -> str:
    """The ``index``-th fenced ``lang`` block of the README section that starts with ``heading``
    (a whole line such as ``## Running under systemd``), up to the next heading of that level or higher."""
    text = README.read_text(encoding="utf-8")
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index("\n" + heading + "\n") + 1
    nxt = re.compile(rf"^#{{1,{level}}} ", re.M)
    m = nxt.search(text, start + len(heading) + 1)
    section = text[start:m.start() if m else len(text)]
    blocks = re.findall(r"^( *)```" + re.escape(lang) + r"\n(.*?)^\1```", section, re.S | re.M)
    assert len(blocks) > index, f"README: no ```{lang} block #{index} under {heading!r}"
    indent, body = blocks[index]
    return "\n".join(line[len(indent):] for line in body.splitlines())


def shell_lines(block: str) -> list[str]:
    """The commands of a README shell block: comment lines and blank lines dropped, a here-document
    kept with its command as one item."""
    out: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.search(r"<<-?'?(\w+)'?", line)
        if m:
            body = []
            while i < len(lines) and lines[i].strip() != m.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line = "\n".join([line, *body, m.group(1)])
        out.append(line)
    return out


class Container:
    """One container with systemd as PID 1; every call runs ``podman exec`` in it as root."""

    def __init__(self, name: str, hostname: str):
        self.name = name
        self.hostname = hostname

    # ---- life
    @classmethod
    def boot(cls, name: str, hostname: str, mounts: list[tuple[str, str, str]] = ()) -> Container:
        """``mounts``: (host path, container path, "ro"|"rw")."""
        image()
        args = []
        for src, dst, mode in mounts:
            if any(ch.isspace() for ch in src + dst):
                raise AssertionError(f"a mount path with a space cannot pass through SD_RUN_ARGS: {src!r}")
            args += ["-v", f"{src}:{dst}:{mode}"]
        c = cls(name, hostname)
        env = {"SD_NAME": name, "SD_HOSTNAME": hostname, "SD_RUN_ARGS": " ".join(args), "SD_RUN_ID": RUN_ID}
        r = _script("start", env)
        if r.returncode != 0:
            c.remove()
            need(f"systemd as PID 1 in container {name}: `{SCRIPT.name} start` failed: {r.stderr.strip()[-800:]}")
        return c

    def remove(self) -> None:
        """This container only (the script's teardown, by name)."""
        _script("teardown", {"SD_NAME": self.name, "SD_RUN_ID": ""}, timeout=60)

    # ---- commands inside
    def run(self, argv: list[str], input: str | None = None, check: bool = True, timeout: float = 120,
            user: str | None = None, env: dict[str, str] | None = None, workdir: str | None = None
            ) -> subprocess.CompletedProcess:
        cmd = ["podman", "exec", "-i"]
        if user:
            cmd += ["--user", user]
        for k, v in (env or {}).items():
            cmd += ["--env", f"{k}={v}"]
        if workdir:
            cmd += ["--workdir", workdir]
        cmd += [self.name, *argv]
        try:
            r = subprocess.run(cmd, input=input if input is not None else "", capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"`{shlex.join(argv)}` in {self.name} took longer than {timeout}s: "
                                 f"{e.stdout!r} {e.stderr!r}") from None
        if check and r.returncode != 0:
            raise AssertionError(f"`{shlex.join(argv)}` in {self.name} -> exit {r.returncode}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-ec", script], **kw)

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root:root") -> None:
        self.run(["sh", "-ec", f'mkdir -p "$(dirname {shlex.quote(path)})"; cat > {shlex.quote(path)}; '
                               f"chmod {mode} {shlex.quote(path)}; chown {owner} {shlex.quote(path)}"], input=text)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, props: tuple[str, ...] = ()) -> dict[str, str]:
        args = ["show", unit] + (["-p", ",".join(props)] if props else [])
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, ("MainPID",))["MainPID"] or 0)

    def journal(self, unit: str, lines: int | None = None) -> list[dict]:
        """The unit's journal entries (JSON: MESSAGE, _PID, __REALTIME_TIMESTAMP, ...), oldest first."""
        args = ["journalctl", "--no-pager", "-q", "-o", "json", "-u", unit] + (["-n", str(lines)] if lines else [])
        out = self.run(args).stdout
        entries = []
        for line in out.splitlines():
            if line.strip():
                e = json.loads(line)
                if isinstance(e.get("MESSAGE"), list):  # non-UTF-8 bytes come as a list of ints
                    e["MESSAGE"] = bytes(e["MESSAGE"]).decode("utf-8", "replace")
                entries.append(e)
        return entries

    def messages(self, unit: str) -> list[str]:
        return [e.get("MESSAGE", "") for e in self.journal(unit)]

    def proc_status(self, pid: int) -> dict[str, str]:
        out = self.run(["cat", f"/proc/{pid}/status"]).stdout
        return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}

    # ---- the README's installs
    def copy_checkout(self, dest: str = "/root/install/celery-supervisor", src: str = "/mnt/src") -> None:
        """A copy of this working tree (mounted read-only at ``src``) as a user's checkout."""
        excl = " ".join(f"--exclude={shlex.quote(p)}" for p in COPY_EXCLUDES)
        self.sh(f"mkdir -p {dest} && cd {src} && tar {excl} -cf - . | tar -C {dest} -xf -")


# ---------------------------------------------------------------- the wheelhouse (pip offline in the container)
def wheelhouse_key(image_name: str) -> str:
    """New dependencies (any change of pyproject.toml) or another image: another wheelhouse."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return hashlib.sha256(json.dumps([image_name, pyproject]).encode()).hexdigest()[:16]


def ca_bundle() -> str | None:
    """The CA file this machine's pip trusts (a TLS-inspecting proxy's CA may be in it)."""
    for p in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE"),
              "/etc/ssl/certs/ca-certificates.crt"):
        if p and os.path.isfile(p):
            return p
    return None


def wheelhouse(c: Container, host_dir: Path, mounted_at: str = "/mnt/wheels") -> None:
    """Fill ``host_dir`` (mounted read-write at ``mounted_at``) with wheels of the package's
    dependencies for the container's Python, downloaded by the container's own pip, once."""
    done = host_dir / ".complete"
    if done.exists():
        return
    with open(host_dir.parent / f"{host_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return
        env = {"PIP_CERT": "/mnt/ca.crt"} if ca_bundle() else {}
        r = c.sh("python3 -m venv /tmp/dl-venv && cd /root/install && "
                 f"/tmp/dl-venv/bin/pip download -q -d {mounted_at} ./celery-supervisor 'setuptools>=68' wheel",
                 env=env, check=False, timeout=600)
        if r.returncode != 0:
            need(f"the package's dependencies from PyPI for the container's pip: {r.stderr.strip()[-1500:]}")
        done.write_text(time.strftime("%F %T\n"))


def standard_mounts(wheel_dir: Path) -> list[tuple[str, str, str]]:
    mounts = [(str(REPO), "/mnt/src", "ro"), (str(wheel_dir), "/mnt/wheels", "rw")]
    ca = ca_bundle()
    if ca:
        mounts.append((ca, "/mnt/ca.crt", "ro"))
    return mounts


def wheel_dir_for(image_name: str) -> Path:
    d = CACHE / "systemd-wheels" / wheelhouse_key(image_name)
    d.mkdir(parents=True, exist_ok=True)
    return d


OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/mnt/wheels"}


def boot_with_checkout(name: str, hostname: str) -> Container:
    """A container with a copy of this tree at /root/install/celery-supervisor and the wheelhouse
    ready at /mnt/wheels."""
    wd = wheel_dir_for(image())
    c = Container.boot(name, hostname, standard_mounts(wd))
    try:
        c.copy_checkout()
        wheelhouse(c, wd)
    except BaseException:
        c.remove()
        raise
    return c


def install_supervisor(c: Container, config_text: str, env_text: str) -> float:
    """README "Running under systemd", its install block as written, in /root/install (where the
    checkout and the user's config.yaml are). The secrets file is filled between the block's last
    two steps (the README's `install -m 0600 /dev/null ...` makes it empty); returns how long the
    final `systemctl enable --now celery-supervisor` took."""
    lines = shell_lines(readme_block("## Running under systemd"))
    assert lines[-1] == "systemctl enable --now celery-supervisor", lines
    c.write("/root/install/config.yaml", config_text)
    c.sh("\n".join(lines[:-1]), workdir="/root/install", env=OFFLINE_PIP, timeout=300)
    c.write("/etc/celery-supervisor/env", env_text, mode="0600")
    t0 = time.monotonic()
    c.sh(lines[-1], workdir="/root/install")
    return time.monotonic() - t0


def install_workers(c: Container, worker_env: str, app_source: str) -> None:
    """README "Installing the worker unit", its block as written (as root: `sudo ` dropped; the
    example worker.env replaced by ``worker_env``), with the app module in /opt/celery."""
    lines = shell_lines(readme_block("#### Installing the worker unit"))
    script = []
    for line in lines:
        line = re.sub(r"(^|&& )sudo ", r"\1", line)
        if line.startswith("tee /etc/celery/worker.env"):
            head = line.splitlines()[0]
            line = "\n".join([head, worker_env.rstrip("\n"), "ENV"])
        script.append(line)
    app_step = [i for i, s in enumerate(script) if s.startswith("systemctl enable --now")]
    assert app_step, script
    # the app's code goes where WorkingDirectory points, before the workers start
    c.write("/opt/celery/proj.py", app_source)
    c.sh("\n".join(script), workdir="/root/install", env=OFFLINE_PIP, timeout=300)


def unit_text(name: str) -> str:
    return (REPO / "systemd" / name).read_text(encoding="utf-8")


@contextlib.contextmanager
def module_container(prefix: str, hostname: str):
    c = boot_with_checkout(f"{prefix}-{os.getpid()}", hostname)
    try:
        yield c
    finally:
        c.remove()
