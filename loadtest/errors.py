"""Errors that stop a benchmark with a message for the operator."""

from __future__ import annotations


class LoadtestError(Exception):
    """A benchmark cannot go on; the message says why."""


class MissingPrerequisite(LoadtestError):
    """A tool or package is missing; the message names the apt package to install."""
