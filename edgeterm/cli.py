"""The ``edgeterm`` command: a thin layer over the supervisor and the config loader.

Exit codes (a contract, see docs/cli.md):
  0  success
  1  runtime failure (see the message)
  2  the config is invalid (every error is printed, one per line)
  4  edgeterm cannot start here (port in use, OpenSSL layout check failed, ...)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeterm.config import Config
from edgeterm.errors import ConfigError, StartupError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3
EXIT_STARTUP = 4

DEFAULT_CONFIG = "etc/edgeterm.toml"

config_option = click.option(
    "-c",
    "--config",
    "config_file",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The TOML config file.",
)


def _load(config_file: str) -> Config:
    from edgeterm.config_loader import load_config

    return load_config(config_file)


def _fail(errors: list[str], code: int) -> None:
    for line in errors:
        click.echo(line, err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="edgeterm")
def main() -> None:
    """edgeterm: TLS termination at the edge, forwarding to TCP upstreams."""


@main.command("check-config")
@config_option
def check_config(config_file: str) -> None:
    """Validate the config and its certificates; print `ok` or every error (exit 2)."""
    from edgeterm.tls import build_contexts

    try:
        config = _load(config_file)
        contexts = build_contexts(config.tls, config_file)
    except ConfigError as exc:
        _fail(exc.errors, EXIT_CONFIG)
    except StartupError as exc:
        _fail([f"edgeterm: {exc}"], EXIT_STARTUP)
    for warning in contexts.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("ok")


@main.command()
@config_option
@click.option("--foreground", is_flag=True, help="Stay attached and log to stderr.")
def start(config_file: str, foreground: bool) -> None:
    """Start edgeterm."""
    from edgeterm.supervisor import foreground as fg

    if not Path(config_file).exists():
        _fail([f"{config_file}: cannot read: no such file"], EXIT_CONFIG)
    try:
        config = _load(config_file)
    except ConfigError as exc:
        _fail(exc.errors, EXIT_CONFIG)
    if not foreground:
        _fail(["edgeterm: only --foreground is available in this version"], EXIT_FAILURE)
    try:
        sys.exit(fg.run(config, config_file))
    except ConfigError as exc:
        _fail(exc.errors, EXIT_CONFIG)
    except StartupError as exc:
        _fail([f"edgeterm: {exc}"], EXIT_STARTUP)
