"""Issue 9, hostile input, through the real command line: every finding of the fuzz run as a user
meets it. Each answer comes within the contract's 10 s, with no traceback, exit 2 (the config) or 3
(could not observe, the state file), and one line naming what to fix.

- the config file and its YAML: a device, a FIFO, a directory, a file over 1 MiB, nesting 1000
  deep, an alias bomb, a recursive alias, a 5,000-digit integer, a lone surrogate, channels: 5;
- what `check-config` used to pass and the daemon then died on (a template that cannot render, a
  transport option of the wrong type, port 99999, ssl_cert_reqs=bogus, an absurd ping_timeout, a
  5,000-character state_path): refused by `check-config`, `once` and `nagios` alike, before any
  broker is asked;
- the state file: a directory, not a database, on a read-only file system, and not readable by
  the user (run without root's CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: the file permissions
  apply to root too): `status` and `once` exit 3 with the reason; `once` no longer claims a
  daemon acts when none holds the lock;
- a handful of the property-based test's mutated configs (tests/unit/test_config_fuzz.py) through
  a real subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from supervisor.state import run_lock
from tests.support.brokers import free_port
from tests.support.cli import CliResult, cli_argv, cli_env, run_cli, write_config
from tests.unit.test_config_fuzz import ENV, mutated_docs, mutated_texts

CONTRACT = 10.0  # issue 9: every hostile case answers within this
NOBODY = 65534


def closed_broker() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # never connected to: every case fails before


def clean(r: CliResult, codes: tuple[int, ...]) -> None:
    assert "Traceback" not in r.output, f"a traceback was printed:\n{r}"
    assert r.rc in codes, f"expected exit {codes}:\n{r}"


def one_error(r: CliResult, path: str, *words: str) -> str:
    """The command printed exactly one error, on the line of ``path`` (or of the file), with ``words``."""
    lines = r.err.splitlines()
    assert lines and lines[0].endswith("invalid config (1 error):"), str(r)
    [line] = lines[1:]
    assert line.startswith(f"  {path}: " if path else "  "), str(r)
    for w in words:
        assert w in line, f"{w!r} not in the error line:\n{r}"
    return line


# ================================================================ the file and its YAML
def _bomb(levels: int = 7, width: int = 10) -> str:
    lines = ["broker: {url: 'redis://127.0.0.1:6379/0'}", "a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


FILE_CASES = {
    # name: (file text, error path, words in the line)
    "channels_5": ("broker: {url: 'redis://h:6379/0'}\nnotify: {channels: 5}\n", "notify.channels", ["valid list"]),
    "channels_true": ("broker: {url: 'redis://h:6379/0'}\nnotify: {channels: true}\n", "notify.channels", ["list"]),
    "channels_1.5": ("broker: {url: 'redis://h:6379/0'}\nnotify: {channels: 1.5}\n", "notify.channels", ["list"]),
    "recursive_alias": ("broker: {url: 'redis://h:6379/0'}\ngroups: &g [*g]\n", "", ["line 2", "recursive alias"]),
    "nesting_1000": ("broker: {url: 'redis://h:6379/0'}\nx: " + "[" * 1000 + "]" * 1000 + "\n", "",
                     ["line 2", "nested deeper than 50"]),
    "alias_bomb_7x10": (_bomb(7, 10), "", ["aliases", "expand to more than"]),
    "alias_bomb_9x9": (_bomb(9, 9), "", ["aliases", "expand to more than"]),
    "integer_5000_digits": ("broker: {url: 'redis://h:6379/0'}\nqueues: [{name: q, warning: " + "7" * 5000 + "}]\n",
                            "", ["line 2", "5000 digits"]),
    "surrogate_in_glob": ("broker: {url: 'redis://h:6379/0'}\ngroups: [{name: g, hostnames: [\"celery@\\ud800*\"]}]\n",
                          "groups.0.hostnames.0", ["lone surrogate"]),
    "surrogate_in_url": ('broker: {url: "redis://h\\udcff:6379/0"}\n', "broker.url", ["lone surrogate"]),
    "key_twice": ("broker: {url: 'redis://h:6379/0'}\nloop: {interval: 5s}\nloop: {interval: 1s}\n", "",
                  ["line 3", "'loop' is given twice"]),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_yaml_is_one_line_with_exit_2(tmp_path, case):
    text, path, words = FILE_CASES[case]
    cfg = write_config(tmp_path / "c.yaml", text)
    r = run_cli("check-config", "-c", cfg, timeout=CONTRACT)
    clean(r, (2,))
    print(one_error(r, path, *words))


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "too_large", "missing"])
def test_config_paths_that_are_not_a_yaml_file(tmp_path, kind):
    if kind == "device":
        p, words = Path("/dev/zero"), ["character device"]  # used to read until MemoryError
    elif kind == "fifo":
        p, words = tmp_path / "c.yaml", ["FIFO"]  # used to block for ever: nobody writes to it
        os.mkfifo(p)
    elif kind == "directory":
        p, words = tmp_path, ["is a directory"]
    elif kind == "too_large":
        p, words = tmp_path / "c.yaml", ["larger than 1024 KiB"]
        p.write_text("broker: {url: 'redis://h:6379/0'}\n" + "#" * (1536 * 1024) + "\n")
    else:
        p, words = tmp_path / "nope.yaml", ["does not exist"]
    r = run_cli("check-config", "-c", p, timeout=CONTRACT)
    clean(r, (2,))
    print(one_error(r, "", str(p), *words))


# ================================================================ what the daemon used to die on later
def _group(restart: dict) -> dict:
    return {"name": "g", "hostnames": ["celery@g-*"], "restart": restart}


def _local(command: str) -> dict:
    return _group({"platform": "local", "target": command})


LATER_CASES = {
    # name: (config changes, error path, words)
    "template_format_spec": ({"groups": [_local("celery worker -n {hostname:d}")]}, "groups.0.restart.target",
                             ["{hostname:d}", "plain substitution"]),
    "template_conversion": ({"groups": [_local("celery worker -n {hostname!x}")]}, "groups.0.restart.target",
                            ["{hostname!x}", "plain substitution"]),
    "template_width": ({"groups": [_group({"platform": "systemd", "target": "w@{worker:>9999999}.service"})]},
                       "groups.0.restart.target", ["plain substitution"]),
    "template_unbalanced_quote": ({"groups": [_local("celery worker -n it's-{hostname}")]}, "groups.0.restart.target",
                                  ["no closing quotation"]),
    "transport_keyprefix_int": ({"broker": {"transport_options": {"global_keyprefix": 5}}},
                                "broker.transport_options.global_keyprefix", ["must be text"]),
    "transport_sep_int": ({"broker": {"transport_options": {"sep": 5}}}, "broker.transport_options.sep",
                          ["must be text"]),
    "transport_priority_steps": ({"broker": {"transport_options": {"priority_steps": 5}}},
                                 "broker.transport_options.priority_steps", ["list of priorities"]),
    "transport_timeout_text": ({"broker": {"transport_options": {"socket_timeout": "10s"}}},
                               "broker.transport_options.socket_timeout", ["number of seconds"]),
    "port_99999": ({"broker": {"url": "redis://127.0.0.1:99999/0"}}, "broker.url", ["1 to 65535"]),
    "ssl_cert_reqs_bogus": ({"broker": {"url": "rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus"}}, "broker.url",
                            ["ssl_cert_reqs must be one of"]),
    "password_with_hash": ({"broker": {"url": "redis://:S3CRET#tail@127.0.0.1:6379/9"}}, "broker.url",
                           ["URL-encoded"]),
    "ping_timeout_1e300": ({"loop": {"ping_timeout": 1e300}}, "loop.ping_timeout", ["365d"]),
    "ping_timeout_60": ({"loop": {"ping_timeout": 60}}, "loop.ping_timeout", ["at most 10s"]),
    "ping_timeout_over_interval": ({"loop": {"ping_timeout": "3s", "interval": "2s"}}, "loop.ping_timeout",
                                   ["longer than interval"]),
    "state_path_5000": ({"loop": {"state_path": "/tmp/" + "s" * 5000}}, "loop.state_path", ["at most 4095 bytes"]),
}


def _config(tmp_path: Path, changes: dict) -> Path:
    data = {"broker": {"url": closed_broker()}, "loop": {"state_path": str(tmp_path / "state.db")},
            "ha": {"lease": "off"}}
    for section, value in changes.items():
        data[section] = {**data.get(section, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path / "c.yaml", data)


@pytest.mark.parametrize("case", sorted(LATER_CASES))
def test_check_config_catches_what_once_and_nagios_died_on(tmp_path, case):
    """check-config used to say OK; `once` then printed "internal error" and a traceback (or, for
    ping_timeout: 60, took 63 s). Now all three refuse the file, before any broker is asked."""
    changes, path, words = LATER_CASES[case]
    cfg = _config(tmp_path, changes)
    with ThreadPoolExecutor(max_workers=3) as ex:
        results = list(ex.map(lambda command: run_cli(command, "-c", cfg, timeout=CONTRACT),
                              ("check-config", "once", "nagios")))
    for r in results:
        clean(r, (2,))
        line = one_error(r, path, *words)
        assert "S3CRET" not in r.output
        if r.args[0] == "nagios":  # the monitoring system shows stdout only: one plugin line there too
            assert r.out.startswith("CELERY CRITICAL - invalid config ") and len(r.out.splitlines()) == 1, str(r)
    print(line)


def test_lease_off_unquoted_is_off(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", f"broker: {{url: '{closed_broker()}'}}\nha: {{lease: off}}\n"
                                            "notify: {repeat_every: off}\n")
    r = run_cli("check-config", "-c", cfg, timeout=CONTRACT)
    assert r.rc == 0 and r.out.startswith(f"{cfg}: OK"), str(r)


# ================================================================ the state file
def _drop_dac() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set,
    so that root after exec obeys file permissions like any user (as `setpriv --bounding-set
    -dac_override,-dac_read_search` does)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os.write(2, f"prctl(PR_CAPBSET_DROP, {cap}) failed: errno {ctypes.get_errno()}\n".encode())
            os._exit(99)


def run_as_user(*args: str) -> CliResult:
    """`supervisor ARGS` subject to file permissions (as root: without the DAC capabilities)."""
    t0 = time.monotonic()
    proc = subprocess.run(cli_argv(*args), env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=CONTRACT, preexec_fn=_drop_dac if os.geteuid() == 0 else None)
    r = CliResult(tuple(map(str, args)), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
    assert r.rc != 99, f"could not drop root's file capabilities:\n{r}"
    return r


def _not_mine(path: Path, mode: int) -> None:
    """``path`` with ``mode`` and, as root, owned by nobody (root without DAC capabilities is "other")."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    path.chmod(mode)


def _make_state(path: Path) -> None:
    from supervisor.state import StateStore

    StateStore(path).close()


@pytest.fixture
def restore_modes():
    paths: list[Path] = []
    yield paths
    for p in paths:  # let tmp_path be removed
        if p.exists():
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_state_directory_not_readable(tmp_path, restore_modes):
    d = tmp_path / "private"
    d.mkdir()
    _make_state(d / "state.db")
    _not_mine(d / "state.db", 0o600)
    _not_mine(d, 0o700)
    restore_modes.append(d)
    cfg = _config(tmp_path, {"loop": {"state_path": str(d / "state.db")}})
    cfg.chmod(0o644)
    status = run_as_user("status", "-c", str(cfg))  # was: PermissionError traceback, exit 1
    clean(status, (3,))
    assert status.err.strip() == f"cannot use loop.state_path {d / 'state.db'}: permission denied", str(status)
    once = run_as_user("once", "-c", str(cfg))  # was: "only plans (as --dry-run)", then a traceback
    clean(once, (3,))
    assert "permission denied" in once.err and "only plans" not in once.output, str(once)
    assert len(once.err.strip().splitlines()) == 1, str(once)


def test_state_file_not_readable(tmp_path, restore_modes):
    d = tmp_path / "shared"
    d.mkdir()
    _make_state(d / "state.db")
    _not_mine(d / "state.db", 0o600)
    restore_modes.append(d / "state.db")
    cfg = _config(tmp_path, {"loop": {"state_path": str(d / "state.db")}})
    cfg.chmod(0o644)
    d.chmod(0o777)  # the lock file can be created next to it: only the state file itself is refused
    status = run_as_user("status", "-c", str(cfg))
    clean(status, (3,))
    assert "cannot read the state file" in status.err and "permission denied" in status.err, str(status)
    once = run_as_user("once", "-c", str(cfg))  # was: "planning without it" and exit 0
    clean(once, (3,))
    assert "cannot write the state file" in once.err and "permission denied" in once.err, str(once)
    assert len(once.err.strip().splitlines()) == 1, str(once)


@pytest.mark.parametrize("kind", ["directory", "not_a_database", "read_only_fs"])
def test_state_path_unusable(tmp_path, kind):
    if kind == "directory":
        state = tmp_path / "statedir"
        state.mkdir()
        status_words = once_words = ["is a directory"]
    elif kind == "not_a_database":
        state = tmp_path / "state.db"
        state.write_text("this is not a database\n" * 100)
        status_words, once_words = ["not a readable SQLite database"], None  # `once` moves it aside (by design)
    else:
        state = Path("/proc/celery-supervisor-test.db")  # nothing can be created there, not even by root
        status_words, once_words = ["no state file at"], ["cannot create the lock file", "no such file or directory"]
    cfg = _config(tmp_path, {"loop": {"state_path": str(state)}})
    status = run_cli("status", "-c", cfg, timeout=CONTRACT)
    clean(status, (3,))
    assert len(status.err.strip().splitlines()) == 1 and all(w in status.err for w in status_words), str(status)
    if once_words is None:
        return
    once = run_cli("once", "-c", cfg, timeout=CONTRACT)  # /proc: was exit 0 "this pass only plans"
    clean(once, (3,))
    assert len(once.err.strip().splitlines()) == 1 and all(w in once.err for w in once_words), str(once)
    assert "only plans" not in once.output


def test_once_only_plans_when_a_daemon_really_holds_the_lock(tmp_path, redis_url):
    """The one case where an unusable lock is not an error: another process holds it."""
    cfg = _config(tmp_path, {"broker": {"url": redis_url}})
    held = run_lock(tmp_path / "state.db")  # as a running `supervisor run` does
    try:
        r = run_cli("once", "-c", cfg, timeout=30)
    finally:
        held.close()
    clean(r, (0,))
    assert f"(pid {os.getpid()}) already uses the state file" in r.err and "only plans" in r.err, str(r)


# ================================================================ the fuzz, a handful through a real process
HANDFUL = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.function_scoped_fixture])


def _fuzz_env() -> dict[str, str]:
    return cli_env(drop=tuple(k for k, v in ENV.items() if v is None))


def _check(r: CliResult) -> None:
    assert "Traceback" not in r.output and r.rc in (0, 2), str(r)
    if r.rc == 2:
        assert re.match(r".+: invalid config \(\d+ errors?\):\n", r.err), str(r)


def test_mutated_configs_through_a_real_process(tmp_path):
    import yaml

    seen: list[int] = []

    @HANDFUL
    @given(mutated_docs())
    def docs(doc):
        p = tmp_path / "doc.yaml"
        p.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=False), encoding="ascii")
        r = run_cli("check-config", "-c", p, env=_fuzz_env(), timeout=CONTRACT)
        _check(r)
        seen.append(r.rc)

    @HANDFUL
    @given(mutated_texts())
    def texts(text):
        p = tmp_path / "text.yaml"
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
        r = run_cli("check-config", "-c", p, env=_fuzz_env(), timeout=CONTRACT)
        _check(r)
        seen.append(r.rc)

    docs()
    texts()
    assert len(seen) >= 12, seen
    print(f"\nsubprocess fuzz: {len(seen)} cases, exit codes {sorted(set(seen))}", file=sys.stderr)
