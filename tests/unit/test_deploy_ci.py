""".ci/run installs every system tool the test suite runs, and no more than ``make test`` needs:
a command a test starts that CI does not install would make that test skip (or, with CI=true,
fail) there instead of running."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.ci import unavailable

REPO = Path(__file__).resolve().parents[2]
CI_RUN = REPO / ".ci" / "run"

# The Debian package of each command the tests start. A test that starts a new command fails
# test_every_command_the_tests_run_is_installed_by_ci until it is added here (and its package
# to .ci/run).
PACKAGE_OF = {
    "curl": "curl",
    "haproxy": "haproxy",
    "ip": "iproute2",
    "openssl": "openssl",
    "prlimit": "util-linux",
    "setpriv": "util-linux",
    "ss": "iproute2",
    "sysctl": "procps",
    "systemd-analyze": "systemd",
    "true": "coreutils",
}
# Essential: yes in Debian 12: on every installation, nothing to install.
ESSENTIAL = {"coreutils", "util-linux"}

# shutil.which("x"); subprocess.run(["x", ...]) and friends; the fleet's sh("x", ...); and the
# command after `ip netns exec NAME`.
COMMAND_RE = re.compile(
    r"""which\(\s*"([\w.+-]+)"\s*\)"""
    r"""|(?:subprocess\.(?:run|Popen|check_output|check_call)|\bsh)\(\s*\[?\s*"([\w.+-]+)\""""
    r"""|"exec",\s*\w+,\s*"([\w.+-]+)\""""
)


def ci_packages() -> set[str]:
    m = re.search(r"(?m)^for pkg in ([^;]+); do$", CI_RUN.read_text())
    assert m, "no `for pkg in ...; do` line in .ci/run"
    return set(m[1].split())


def commands_run_by_tests() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path == Path(__file__).resolve():
            continue  # this file's examples
        for m in COMMAND_RE.finditer(path.read_text()):
            command = next(g for g in m.groups() if g)
            found.setdefault(command, set()).add(str(path.relative_to(REPO)))
    return found


def test_the_command_scan_finds_what_the_deploy_tests_run() -> None:
    found = commands_run_by_tests()
    for command in ("ip", "sysctl", "systemd-analyze", "haproxy", "openssl"):
        assert command in found, command


def test_every_command_the_tests_run_is_installed_by_ci() -> None:
    need = ci_packages()
    for command, files in commands_run_by_tests().items():
        assert command in PACKAGE_OF, f"{command} (run by {sorted(files)}): add its package"
        package = PACKAGE_OF[command]
        assert package in need or package in ESSENTIAL, (
            f"{command} (run by {sorted(files)}): .ci/run must install {package}"
        )


def test_ci_installs_the_tools_the_deploy_tests_need() -> None:
    need = ci_packages()
    # systemd-analyze (the unit), ip netns (fleet, sysctl), sysctl inside the namespaces
    assert {"systemd", "iproute2", "procps", "haproxy", "openssl", "curl"} <= need
    # the Makefile's `python3 -m venv` and what runs it
    assert {"make", "python3-venv"} <= need
    # `make system-deps` (part of `make test`) checks for these commands
    makefile = (REPO / "Makefile").read_text()
    m = re.search(r"for t in ([^;]+); do command -v", makefile)
    assert m, "system-deps loop not found in the Makefile"
    for tool in m[1].split():
        assert PACKAGE_OF[tool] in need, tool


def test_make_test_does_not_need_nginx() -> None:
    """nginx is an anchor of `make bench` only; CI must not need it, and no test may run it."""
    assert not {p for p in ci_packages() if "nginx" in p}
    assert "nginx" not in commands_run_by_tests()
    for path in (REPO / "tests").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) loadtest", path.read_text(), re.M), path
    makefile = (REPO / "Makefile").read_text()
    test_target = re.search(r"(?m)^test: (.*)$", makefile)
    assert test_target and "bench" not in test_target[1]


@pytest.mark.parametrize(("ci", "outcome"), [("true", "fail"), ("", "skip"), (None, "skip")])
def test_missing_tools_fail_in_ci_and_skip_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: str
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="no such tool"):
        unavailable("no such tool")
