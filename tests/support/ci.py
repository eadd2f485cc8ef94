"""Tests that need something from the machine (a command, root, a kernel feature): on a
developer's machine without it they skip, saying why; in CI (``CI=true``, set by .ci/run's
caller) they fail, because .ci/run installs everything the suite needs and a silent skip there
would hide a test that no longer runs anywhere."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test with ``reason``, or fail it when running in CI."""
    if in_ci():
        pytest.fail(
            f"{reason} (CI=true: the CI machine must provide this; see .ci/run)", pytrace=False
        )
    pytest.skip(reason)
