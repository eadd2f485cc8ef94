"""Errors shared across edgeterm, each saying whose fault it is."""

from __future__ import annotations


class ConfigError(Exception):
    """The operator's config (or a file it names) is wrong.

    ``errors`` holds one line per problem, each of the form
    ``<config file>: <key path>: <what is wrong>``, so that check-config can print all of them.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class StartupError(Exception):
    """edgeterm cannot run on this machine as configured (not the config's fault)."""
