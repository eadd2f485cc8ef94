"""The ``edgeterm`` command: a thin layer over the supervisor, the admin socket and the loader.

Exit codes (a contract; docs/cli.md):
  0  success
  1  failure (the message says what)
  2  the config is invalid (every error printed, one per line: file: key path: problem)
  3  edgeterm is not running (status, stop, reload)
  4  edgeterm cannot start here (port in use, unreadable file, OpenSSL layout check failed)
  5  a worker could not boot: the server stopped instead of crash-looping
  6  edgeterm is already running (start)
  7  edgeterm runs but is not ready (status --ready): a worker is starting, stopped or gone
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from edgeterm.config import Config
from edgeterm.errors import ConfigError, StartupError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3
EXIT_STARTUP = 4
EXIT_BOOT = 5
EXIT_ALREADY_RUNNING = 6
EXIT_NOT_READY = 7

DEFAULT_CONFIG = "etc/edgeterm.toml"

config_option = click.option(
    "-c",
    "--config",
    "config_file",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The TOML config file.",
)


def _fail(errors: list[str], code: int) -> NoReturn:
    for line in errors:
        click.echo(line, err=True)
    sys.exit(code)


def _load(config_file: str) -> Config:
    from edgeterm.config_loader import load_config

    try:
        return load_config(config_file)
    except ConfigError as exc:
        _fail(exc.errors, EXIT_CONFIG)


def _running_pid(config: Config) -> int:
    from edgeterm.supervisor import pidfile

    pid = pidfile.read_pid(config.server.pidfile)
    if pid is None:
        _fail(
            [f"edgeterm is not running (no live pid in {config.server.pidfile})"], EXIT_NOT_RUNNING
        )
    return pid


def _status(config: Config) -> dict[str, Any]:
    from edgeterm import admin

    try:
        return admin.request(config.server.admin_socket, "status")
    except (OSError, ValueError) as exc:
        _fail(
            [f"edgeterm is not running (admin socket {config.server.admin_socket}: {exc})"],
            EXIT_NOT_RUNNING,
        )


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@click.group()
@click.version_option(package_name="edgeterm")
def main() -> None:
    """edgeterm: TLS termination at the edge, forwarding to TCP upstreams."""


def _certificate_errors(config_file: str) -> list[str]:
    """Check the certificate files a config names even when the rest of it is invalid, so
    that check-config prints every problem at once."""
    import tomllib

    from edgeterm.certs import load_certificate
    from edgeterm.config import CertificateConfig

    try:
        with open(config_file, "rb") as f:
            raw = tomllib.load(f)
        entries = raw["tls"]["certificates"]
    except Exception:
        return []  # already reported by the loader
    base = Path(config_file).resolve().parent
    errors: list[str] = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("cert"), str):
            continue
        key = entry.get("key")
        cfg = CertificateConfig(
            cert=base / entry["cert"], key=base / key if isinstance(key, str) and key else None
        )
        try:
            load_certificate(cfg, f"tls.certificates[{i}]", config_file)
        except ConfigError as exc:
            errors.extend(exc.errors)
    return errors


@main.command("check-config")
@config_option
def check_config(config_file: str) -> None:
    """Validate the config and its certificates; print `ok` or every error (exit 2)."""
    from edgeterm import openssl
    from edgeterm.config_loader import load_config
    from edgeterm.tls import build_contexts
    from edgeterm.workers.route import check_routes
    from edgeterm.workers.upstream import max_conns_warnings

    try:
        config = load_config(config_file)
    except ConfigError as exc:
        _fail(exc.errors + _certificate_errors(config_file), EXIT_CONFIG)
    try:
        openssl.self_check()
        contexts = build_contexts(config.tls, config_file)
        route_warnings = check_routes(config, contexts, config_file)  # docs/routing.md
    except ConfigError as exc:
        _fail(exc.errors, EXIT_CONFIG)
    except StartupError as exc:
        _fail([f"edgeterm: {exc}"], EXIT_STARTUP)
    share_warnings = max_conns_warnings(config, config.server.worker_count(), config_file)
    for warning in (*contexts.warnings, *route_warnings, *share_warnings):
        click.echo(f"warning: {warning}", err=True)
    click.echo("ok")


@main.command()
@config_option
@click.option(
    "--foreground", is_flag=True, help="Stay attached, log to stderr (systemd, containers)."
)
def start(config_file: str, foreground: bool) -> None:
    """Start edgeterm; without --foreground, return once every worker accepts connections."""
    from edgeterm.supervisor import launch
    from edgeterm.workers.upstream import max_conns_warnings

    config_file = os.path.abspath(config_file)
    config = _load(config_file)
    for warning in max_conns_warnings(config, config.server.worker_count(), config_file):
        click.echo(f"warning: {warning}", err=True)  # docs/routing.md, "Caps"
    try:
        if foreground:
            sys.exit(launch.run_foreground(config, config_file))
        code, message = launch.run_daemon(config, config_file)
    except launch.AlreadyRunning as exc:
        _fail([str(exc)], EXIT_ALREADY_RUNNING)
    except ConfigError as exc:
        _fail(exc.errors, EXIT_CONFIG)
    except StartupError as exc:
        _fail([f"edgeterm cannot start: {exc}"], EXIT_STARTUP)
    if code != EXIT_OK:
        _fail([message], code)
    click.echo(message)


@main.command()
@config_option
@click.option(
    "--timeout", type=float, default=None, help="Seconds to wait (default: graceful_timeout + 10)."
)
@click.option("--now", "immediate", is_flag=True, help="SIGQUIT: close connections at once.")
def stop(config_file: str, timeout: float | None, immediate: bool) -> None:
    """Stop edgeterm: stop accepting, let connections finish, then exit; wait for it."""
    config = _load(config_file)
    pid = _running_pid(config)
    wait = timeout if timeout is not None else config.server.graceful_timeout + 10.0
    os.kill(pid, signal.SIGQUIT if immediate else signal.SIGTERM)
    started = time.monotonic()
    deadline = started + wait
    while time.monotonic() < deadline:
        if _gone(pid):
            click.echo(f"edgeterm stopped (pid {pid}) in {time.monotonic() - started:.1f}s")
            return
        time.sleep(0.05)
    _fail([f"edgeterm (pid {pid}) is still running after {wait:.1f}s"], EXIT_FAILURE)


def reload_outcome(before: dict[str, Any], reloads: dict[str, Any]) -> dict[str, Any] | None:
    """The finished reload that answers a SIGHUP sent after ``before`` was read, or None yet.

    ``reloads.requested`` counts the supervisor's reload requests and ``reloads.last.seq`` is
    the request number the last finished reload began at. A reload that began at a number
    above ``before.requested`` began after ``before`` was read, so after the files were
    written: its outcome is ours (a later one, if it already ended, read them too). Requests
    during a reload are queued, never dropped, so one such reload always comes.
    """
    last = reloads.get("last") or {}
    requested = before.get("requested")
    if isinstance(requested, int):
        seq = last.get("seq")
        return last if isinstance(seq, int) and seq > requested else None
    # a supervisor that does not number reloads (started before an upgrade)
    if reloads["ok"] + reloads["failed"] > before["ok"] + before["failed"]:
        return None if reloads["in_progress"] else last
    return None


@main.command()
@config_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait.")
def reload(config_file: str, timeout: float) -> None:
    """Reload config, certificates and keys (SIGHUP); wait until the new generation serves."""
    config = _load(config_file)
    pid = _running_pid(config)
    before = _status(config)["reloads"]
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)  # polling the admin socket; bounded by the deadline
        status = _status(config)
        last = reload_outcome(before, status["reloads"])
        if last is None:
            continue
        if last.get("ok"):
            generation = last.get("generation", status["generation"])
            click.echo(f"reloaded: generation {generation} serving")
            return
        _fail(
            [f"reload failed: {last.get('error')}", "still serving the previous config"],
            EXIT_FAILURE,
        )
    _fail([f"reload did not finish within {timeout:.0f}s"], EXIT_FAILURE)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.option(
    "--ready",
    is_flag=True,
    help="Exit 0 only if every worker of the serving generation is ready, else 7 with the reason.",
)
def status(config_file: str, as_json: bool, ready: bool) -> None:
    """Show the supervisor and its workers (exit 3 when not running; with --ready, 7 when not
    ready)."""
    from edgeterm import status as view

    config = _load(config_file)
    st = _status(config)
    if as_json:
        click.echo(json.dumps(st, indent=2))
    if ready:
        reasons = view.not_ready(
            st,
            expected_workers=st.get("slots"),
            process_problem=_process_checker(st),
        )
        if reasons:
            _fail([f"not ready: {reason}" for reason in reasons], EXIT_NOT_READY)
        if not as_json:
            serving = [w for w in st["workers"] if w["generation"] == st["generation"]]
            click.echo(f"ready: generation {st['generation']}, {len(serving)} workers")
        return
    if not as_json:
        for line in view.render_text(st):
            click.echo(line)


def _process_checker(st: dict[str, Any]) -> Callable[[int], str | None] | None:
    """``pid -> problem or None`` for the workers, from the process table; None when this CLI
    does not see the supervisor's processes (another pid namespace)."""
    import psutil

    try:
        children = {c.pid: c for c in psutil.Process(int(st["pid"])).children()}
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    if not any(w["pid"] in children for w in st["workers"]):
        return None  # not the supervisor's pid namespace: its pid here is another process

    def problem(pid: int) -> str | None:
        proc = children.get(pid)
        if proc is None:
            return "has exited"
        try:
            state = proc.status()
        except psutil.NoSuchProcess:
            return "has exited"
        except psutil.Error:
            return None
        if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return "is stopped (SIGSTOP or a debugger): it accepts nothing"
        if state in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return "has exited"
        return None

    return problem


@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", "names", multiple=True, default=("localhost",), show_default=True)
def init(directory: Path, names: tuple[str, ...]) -> None:
    """Write a starter config and a self-signed certificate into DIRECTORY."""
    from edgeterm.starter import write_starter

    try:
        written = write_starter(directory, names)
    except FileExistsError as exc:
        _fail([f"edgeterm init: {exc} exists; not overwriting"], EXIT_FAILURE)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"check it with: edgeterm check-config -c {directory / 'edgeterm.toml'}")
