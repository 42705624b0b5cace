"""The `supervisor` command. Heavy modules (celery, apprise, adapters) are imported inside commands."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from supervisor import __version__, redact

EXIT_INVALID_CONFIG = 2
EXIT_UNKNOWN = 3  # could not observe, or an internal error (Nagios: UNKNOWN)


def _version_text() -> str:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    return f"celery-supervisor {__version__} (package 'supervisor' at {here})"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    redact.install_log_filter(handler)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("kombu", "celery", "amqp", "apscheduler", "apprise", "urllib3", "redis"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


def _printable_streams() -> None:
    """Whatever a message holds (a lone surrogate from a forged event, an odd byte in a path), printing
    it never raises: unencodable characters are shown as escapes."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (tests' captured streams)
            pass


def no_traceback(plugin_prefix: str | None = None):
    """A command that never ends in a traceback: an unexpected exception is one line on stderr
    (``plugin_prefix``: also the plugin's status line on stdout) and exit 3, never exit 1, which
    Nagios would read as WARNING. ``--log-level DEBUG`` logs where it happened."""

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                return f(*args, **kwargs)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except Exception as e:
                logging.getLogger("supervisor").debug("internal error", exc_info=True)
                what = f"{type(e).__name__}: {redact.scrub(e)}" if str(e) else type(e).__name__
                if plugin_prefix is not None:
                    click.echo(f"{plugin_prefix}internal error: {what}")
                click.echo(f"internal error: {what} (a bug: please report it; --log-level DEBUG shows where)",
                           err=True)
                sys.exit(EXIT_UNKNOWN)

        return wrapper

    return deco


def _state_problem(e: Exception) -> str:
    """A StateError as one line that says what to fix."""
    msg = str(e)
    return msg if "loop.state_path" in msg else f"{msg} (fix loop.state_path: a file this user can create, read and write)"


def load(path: str, stdout_prefix: str | None = None):
    """The config, or exit 2 printing every error with its path (never a traceback, never a secret).
    ``stdout_prefix``: also one line on stdout (`nagios`: the monitoring system shows only stdout)."""
    from supervisor.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        if stdout_prefix is not None:
            p, msg = e.errors[0]
            more = f" (and {len(e.errors) - 1} more: supervisor check-config)" if len(e.errors) > 1 else ""
            click.echo(f"{stdout_prefix}invalid config {path}: {f'{p}: ' if p else ''}{msg}{more}")
        click.echo(f"{path}: invalid config ({len(e.errors)} error{'s' if len(e.errors) != 1 else ''}):", err=True)
        for p, msg in e.errors:
            click.echo(f"  {p}: {msg}" if p else f"  {msg}", err=True)
        sys.exit(EXIT_INVALID_CONFIG)


config_option = click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=True), envvar="SUPERVISOR_CONFIG",
    help="The YAML config file (or $SUPERVISOR_CONFIG).",
)
log_option = click.option("--log-level", default="INFO", show_default=True,
                          type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, message=_version_text())
def main() -> None:
    """celery-supervisor: watches Celery worker heartbeats and queue backlogs, alerts through Apprise,
    and restarts lost workers through their platform (local, systemd, docker, kubernetes, cloudfoundry).

    \b
    Exit codes of `once` and `nagios`: 0 healthy, 1 warning, 2 critical, 3 could not observe.
    `check-config` exits 2 on an invalid file.
    """
    _printable_streams()


@main.command("check-config")
@config_option
@no_traceback()
def check_config(config_path: str) -> None:
    """Validate the config file; print every error with its path."""
    cfg = load(config_path)
    missing = cfg.missing_adapters()
    if missing:
        click.echo(f"{config_path}: invalid config ({len(missing)} error{'s' if len(missing) != 1 else ''}):", err=True)
        for p, msg in missing:
            click.echo(f"  {p}: {msg}", err=True)
        sys.exit(EXIT_INVALID_CONFIG)
    from supervisor.config import printable

    lines = [f"{config_path}: OK", f"  broker: {cfg.broker.display_url}",
             f"  loop: every {cfg.loop.interval:g}s, state at {cfg.loop.state_path}"]
    for g in cfg.groups:
        how = f"restart through {g.restart.platform}" if g.restart else "alert only (no restart section)"
        match = ", ".join(g.workers + g.hostnames)
        lines.append(f"  group {g.name}: {match}; min_workers {g.min_workers}; {how}")
    for q in cfg.queues:
        def off(x):  # an unset threshold is off, not "None"
            return "off" if x is None else x

        lines.append(f"  queue {q.name}: warning {off(q.warning)}, critical {off(q.critical)}, for {q.for_:g}s, "
                     f"min_consumers {off(q.min_consumers)}")
    for c in cfg.notify.channels:
        lines.append(f"  channel {c.name}: {redact.redact_apprise_url(c.url.get_secret_value())} "
                     f"({', '.join(c.severities)})")
    for line in lines:  # names are the user's text: one line each, no escape sequences
        click.echo(printable(line))


def _print_report(report, cfg) -> None:
    from supervisor.loop import report_json

    doc = report_json(report, cfg)
    b = doc["broker"]
    click.echo(f"broker {b['url']}: {'ok' if b['ok'] else 'UNREACHABLE: ' + str(b['error'])}")
    if doc["workers"]:
        click.echo("workers:")
        for w in doc["workers"]:
            click.echo(f"  {w['hostname']:<32} {w['group']:<12} {w['status']:<13} {w['reason']}")
    if doc["queues"]:
        click.echo("queues:")
        for q in doc["queues"]:
            extra = f" consumers={q['consumers']}" if q["consumers"] is not None else ""
            err = f" ERROR {q['error']}" if q["error"] else ""
            length = "unknown" if q["length"] is None else q["length"]
            click.echo(f"  {q['name']:<32} length={length}{extra}{err}")
    if doc["findings"]:
        click.echo("findings:")
        for f in doc["findings"]:
            click.echo(f"  [{f['severity']}/{f['state']}] {f['summary']}")
    for name, err in doc["platform_errors"].items():
        click.echo(f"platform error in group {name}: {err}")
    if doc["actions"]:
        click.echo("actions:" + (" (dry run: nothing executed)" if not any(a["executed"] for a in doc["actions"]) else ""))
        for a in doc["actions"]:
            if a["kind"] == "restart":
                left = f"; budget left after it: {a['budget_left']}" if a.get("budget_left") is not None else ""
                click.echo(f"  restart {a['hostname']} ({a['target']}): {a['reason']}{left}")
                if a.get("command"):
                    click.echo(f"    by hand: {a['command']}")
                click.echo(f"    -> {a.get('result')}")
            else:
                click.echo(f"  alert to {a['target']}: {a['reason']} -> {a.get('result')}")
    else:
        click.echo("actions: none")
    for host, note in doc["notes"].items():
        click.echo(f"note: {host} not restarted now: {note}")
    click.echo({0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN (could not observe)"}[report.exit_code])


@main.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Execute nothing; print each planned action, its reason and budget.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (workers, queues, findings, actions).")
@log_option
@no_traceback()
def once(config_path: str, dry_run: bool, as_json: bool, log_level: str) -> None:
    """One observe/decide/act pass; exit 0 ok, 1 warning, 2 critical, 3 could not observe."""
    setup_logging(log_level if not as_json else "ERROR")
    cfg = load(config_path)
    from supervisor.loop import report_json

    report = _one_pass(cfg, dry_run=dry_run, flush=10.0)
    if as_json:
        click.echo(json.dumps(report_json(report, cfg), indent=2, default=str))
    else:
        _print_report(report, cfg)
    sys.exit(report.exit_code)


def _one_pass(cfg, dry_run: bool, flush: float, on_error: str | None = None, state="open"):
    """One `once` pass. A plugin-style command answers UNKNOWN (3) on an internal error, never a
    traceback and exit 1 (which Nagios would read as WARNING)."""
    from supervisor.loop import Supervisor
    from supervisor.state import StateError, StateLocked, run_lock

    def unknown(message: str):
        if on_error:
            click.echo(f"{on_error}{message}")
        click.echo(message, err=True)
        sys.exit(EXIT_UNKNOWN)

    held = None
    if state == "open" and not dry_run:
        try:  # one acting supervisor per state file: a running daemon owns it
            held = run_lock(cfg.loop.state_path)
        except StateLocked as e:
            click.echo(f"{e}\nthis pass only plans (as --dry-run): the daemon acts", err=True)
            dry_run = True
        except StateError as e:  # no daemon holds it: the state file cannot be used at all
            unknown(_state_problem(e))
    if state == "open" and dry_run:
        try:
            cfg.loop.state_path.exists()
        except OSError as e:  # a dry run plans without the state it cannot read, and says why
            click.echo(f"cannot read loop.state_path {cfg.loop.state_path}: {e.strerror or e}: "
                       "this pass plans without it", err=True)
            state = None
    try:
        # `once` keeps its restarts, announced alerts and outbox in the state file like the daemon
        # (a cron job does not re-page nor refill budgets); a dry run only reads it; nagios has none
        try:
            sup = Supervisor(cfg, dry_run=dry_run, one_shot=True, state=state)
        except StateError as e:
            unknown(_state_problem(e))
        lease = None
        try:
            if not dry_run:  # a running leader (`supervisor run` replicas) acts; this pass then only plans
                from supervisor.lease import lease_for_one_pass

                lease = sup.lease = lease_for_one_pass(cfg)
                if lease is not None and not lease.is_leader():
                    why = (f"cannot reach the lease store ({lease.store_error})" if lease.store_error else
                           f"another replica holds the leader lease ({lease.seen_holder})")
                    click.echo(f"{why}: this pass restarts nothing"
                               f"{'' if lease.store_error else ' and sends no alert'}", err=True)
            return sup.once()
        finally:
            if lease is not None:
                lease.stop(release=True)
            sup.close(flush=flush)
    except Exception as e:
        logging.getLogger("supervisor").debug("internal error", exc_info=True)  # --log-level DEBUG: where
        what = f"{type(e).__name__}: {redact.scrub(e)}" if str(e) else type(e).__name__
        unknown(f"internal error (could not observe): {what}")
    finally:
        if held is not None:
            held.close()


@main.command()
@config_option
@log_option
@no_traceback(plugin_prefix="CELERY UNKNOWN - ")
def nagios(config_path: str, log_level: str) -> None:
    """One Nagios plugin line with perfdata. Observes only: restarts and alerts nothing."""
    setup_logging("ERROR" if log_level.upper() == "INFO" else log_level)
    cfg = load(config_path, stdout_prefix="CELERY CRITICAL - ")
    from supervisor.nagios import nagios_line

    report = _one_pass(cfg, dry_run=True, flush=0.0, on_error="CELERY UNKNOWN - ", state=None)
    click.echo(nagios_line(report, cfg))
    sys.exit(report.exit_code)


@main.command()
@config_option
@log_option
def run(config_path: str, log_level: str) -> None:
    """The daemon: observe, decide and act every loop.interval until SIGTERM or SIGINT; SIGHUP
    re-reads the config file (an invalid one is logged and the running config kept)."""
    setup_logging(log_level)
    cfg = load(config_path)
    from supervisor.daemon import run_daemon
    from supervisor.lease import LeaseError
    from supervisor.state import StateError

    try:
        rc = run_daemon(cfg, config_path=config_path)  # SIGHUP re-reads config_path
    except LeaseError as e:  # ha.lease cannot be set up: never run as a second acting replica
        click.echo(f"ha.lease {cfg.ha.lease}: {e}", err=True)
        sys.exit(EXIT_INVALID_CONFIG)
    except StateError as e:  # the state file cannot be used, or another daemon holds it
        click.echo(_state_problem(e), err=True)
        sys.exit(EXIT_INVALID_CONFIG)
    sys.exit(rc)


@main.command("test-alert")
@config_option
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait for each channel.")
def test_alert(config_path: str, timeout: float) -> None:
    """Send one test notification to every channel; report each channel's result."""
    setup_logging("WARNING")
    cfg = load(config_path)
    if not cfg.notify.channels:
        click.echo("no channels configured under notify.channels")
        sys.exit(1)
    from supervisor.notify import Notifier

    n = Notifier(cfg.notify)
    try:
        results = n.test_all(timeout)
    finally:
        n.close(1.0)
    failed = 0
    for name, err in results.items():
        click.echo(f"  {name}: {'delivered' if err is None else 'FAILED: ' + err}")
        failed += err is not None
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--workers", default=3, show_default=True, help="How many local workers to start.")
@click.option("--keep-dir", is_flag=True, help="Keep the demo's temporary folder (logs, config).")
def demo(workers: int, keep_dir: bool) -> None:
    """Start an embedded Redis, local workers and the supervisor; SIGKILL a worker and narrate
    detection, confirmation, restart and recovery. Cleans up every process it started."""
    from supervisor.demo import run_demo

    sys.exit(run_demo(workers=workers, keep_dir=keep_dir))



# ---------------------------------------------------------------- durable state: status, silence, reset
def _open_state(cfg, readonly: bool):
    """The state file of this config, or exit 3 with the reason (no traceback)."""
    from supervisor.state import StateError, StateStore

    path = cfg.loop.state_path
    try:
        missing = not path.exists()
    except OSError:  # permission denied on a directory of the path: StateStore says so
        missing = False
    if readonly and missing:
        click.echo(f"no state file at {path} (loop.state_path): has `supervisor run` run with this config?", err=True)
        sys.exit(EXIT_UNKNOWN)
    try:
        return StateStore(path, readonly=readonly)
    except StateError as e:
        click.echo(_state_problem(e), err=True)
        sys.exit(EXIT_UNKNOWN)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON (for scripts).")
@no_traceback()
def status(config_path: str, as_json: bool) -> None:
    """What the daemon knows: workers, queues, findings, recent restarts, budgets, silences.

    Read from the state file the daemon writes every cycle (loop.state_path). Exit 0, or 3 when
    there is no state or its last cycle is stale (the daemon is not running)."""
    setup_logging("WARNING")
    cfg = load(config_path)
    import sqlite3

    from supervisor.status import document_from_state, render_table

    store = _open_state(cfg, readonly=True)
    try:
        doc = document_from_state(cfg, store)
    except sqlite3.Error as e:  # locked for longer than the busy timeout, damaged, an I/O error
        click.echo(f"cannot read the state file {cfg.loop.state_path}: {e}", err=True)
        sys.exit(EXIT_UNKNOWN)
    finally:
        store.close()
    if as_json:
        click.echo(redact.scrub(json.dumps(doc, indent=2, default=str)))
    else:
        click.echo(render_table(doc))
    sys.exit(3 if doc["stale"] else 0)


@main.command()
@config_option
@click.argument("match")
@click.option("--for", "duration", default="1h", show_default=True, help="How long: 30m, 2h, 1d ...")
@click.option("--reason", default=None, help="Why (shown in status and logs); required for a new silence.")
@click.option("--remove", is_flag=True, help="End the silences of MATCH (or the silence with id MATCH) now.")
def silence(config_path: str, match: str, duration: str, reason: str | None, remove: bool) -> None:
    """Mute the alerts of a GROUP or a worker HOSTNAME for a while (restarts still happen).

    A finding that still fires when the silence ends is announced then."""
    setup_logging("WARNING")
    cfg = load(config_path)
    from supervisor.durations import format_duration, parse_duration

    store = _open_state(cfg, readonly=False)
    try:
        if remove:
            n = store.expire_silence(match)
            click.echo(f"ended {n} silence(s) of {match}")
            sys.exit(0 if n else 1)
        if not reason:
            click.echo("--reason is required: say why (it is shown in status and logs)", err=True)
            sys.exit(2)
        try:
            seconds = parse_duration(duration)
        except ValueError as e:
            click.echo(f"--for: {e}", err=True)
            sys.exit(2)
        if seconds <= 0:
            click.echo("--for: must be longer than 0", err=True)
            sys.exit(2)
        known = {g.name for g in cfg.groups} | {w for g in cfg.groups for w in g.workers}
        if match not in known and cfg.group_of(match) is None:
            click.echo(f"{match!r} is neither a group of this config nor a hostname its groups match", err=True)
            sys.exit(2)
        import getpass

        s = store.add_silence(match, seconds, reason, author=getpass.getuser())
        click.echo(f"silenced {match} for {format_duration(seconds)} (id {s.id}): {reason}")
    finally:
        store.close()


@main.command()
@config_option
@click.argument("target")
def reset(config_path: str, target: str) -> None:
    """Clear the restart budget of a TARGET (its platform id, or the worker's hostname)."""
    setup_logging("WARNING")
    cfg = load(config_path)
    store = _open_state(cfg, readonly=False)
    try:
        n = store.reset(target)
        if n == 0:
            known = sorted({t for t, _ in store.known_targets()} | {h for _, h in store.known_targets() if h})
            click.echo(f"no restart recorded for {target!r}" + (f"; known: {', '.join(known)}" if known else ""),
                       err=True)
            sys.exit(1)
        click.echo(f"cleared {n} restart(s) of {target}: its budget is full again")
    finally:
        store.close()


# ---------------------------------------------------------------- the shipped deployment files (issue 12)
def _shipped_names() -> list[str]:
    from supervisor.shipped import FILES

    return list(FILES)


def _shipped_help() -> str:
    from supervisor.shipped import FILES

    return "\b\n" + "\n".join(f"  {name:<15} {path}: {what}" for name, (path, what) in FILES.items())


@main.command("print", help="Print a deployment file the package ships, to redirect where it belongs:\n\n"
                            + _shipped_help() + "\n\n\b\ne.g. supervisor print unit > "
                            "/etc/systemd/system/celery-supervisor.service")
@click.argument("name", type=click.Choice(_shipped_names()))
@no_traceback()
def print_file(name: str) -> None:
    from supervisor.shipped import read

    click.echo(read(name), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
