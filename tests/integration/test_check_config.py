"""``edgeterm check-config``: ``ok``, exit 0; or every error (file: key path: message), exit 2."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import CertSet
from tests.support.configs import base_config, write_config
from tests.support.launcher import run_cli

pytestmark = pytest.mark.timeout(60)

Mutation = Callable[[dict[str, Any], Path], None]


@pytest.fixture
def config_dir(tmp_path: Path, certs: CertSet) -> Path:
    """A directory with certs/ (copies of the test certificates), configs go next to it."""
    shutil.copytree(certs.directory, tmp_path / "certs")
    return tmp_path


def good_config(certs: CertSet) -> dict[str, Any]:
    return base_config(certs, ["127.0.0.1:9", "[::1]:9"], cert_dir="certs")


def check(path: Path) -> tuple[int, str, str]:
    r = run_cli("check-config", "-c", str(path), cwd=path.parent.parent)
    return r.returncode, r.stdout, r.stderr


def error_line_re(path: Path, key_path: str) -> re.Pattern[str]:
    """``<file>: <key path>: <message>`` where <file> is the config (as given or its name)."""
    return re.compile(rf"^(?:.*[/ ])?{re.escape(path.name)}: {key_path}: \S", re.MULTILINE)


def test_good_config_prints_ok(config_dir, certs):
    path = write_config(config_dir / "edgeterm.toml", good_config(certs))
    code, out, err = check(path)
    assert (code, out.strip()) == (0, "ok"), (out, err)


def _set(keys: str, value: Any) -> Mutation:
    """Mutation: set a (dotted, with [i]) key of the config dict."""

    def mutate(cfg: dict[str, Any], _: Path) -> None:
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", keys)
        node: Any = cfg
        for part in parts[:-1]:
            node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
        last = parts[-1]
        if last.startswith("["):
            node[int(last[1:-1])] = value
        else:
            node[last] = value

    return mutate


def _copy_key_from(other: str) -> Mutation:
    def mutate(cfg: dict[str, Any], d: Path) -> None:
        cfg["tls"]["certificates"][0]["key"] = f"certs/{other}.key"

    return mutate


def _access_log_at(relative: str) -> Mutation:
    """The access log on, written to ``relative`` (to the config directory)."""

    def mutate(cfg: dict[str, Any], d: Path) -> None:
        cfg["telemetry"] = {"access_log": True, "access_log_file": str(d / relative)}

    return mutate


CASES: dict[str, tuple[Mutation, str]] = {
    # name: (mutation, key path regex that the error line must name)
    "missing key file": (
        _set("tls.certificates[0].key", "certs/missing.key"),
        r"tls\.certificates\[0\]\.key",
    ),
    "missing cert file": (
        _set("tls.certificates[0].cert", "certs/missing.pem"),
        r"tls\.certificates\[0\]\.cert",
    ),
    "key does not match the certificate": (
        _copy_key_from("example.com"),
        r"tls\.certificates\[0\](?:\.key|\.cert)?",
    ),
    "bind without port": (_set("listeners[0].bind", "127.0.0.1"), r"listeners\[0\]\.bind"),
    "bind port out of range": (
        _set("listeners[0].bind", "127.0.0.1:70000"),
        r"listeners\[0\]\.bind",
    ),
    "upstream server without port": (
        _set("upstreams.app.servers", ["127.0.0.1:9", "localhost"]),
        r"upstreams\.app\.servers\[1\]",
    ),
    "unknown key": (_set("timeouts.handshak", 1.0), r"timeouts\.handshak"),
    "unknown table": (_set("bogus", {"x": 1}), r"bogus"),
    "wrong type: string for integer": (
        _set("limits.max_connections", "ten"),
        r"limits\.max_connections",
    ),
    "wrong type: string for seconds": (_set("timeouts.connect", "5s"), r"timeouts\.connect"),
    "wrong type: string for list": (_set("tls.alpn", "http/1.1"), r"tls\.alpn"),
    "min_version SSLv3": (_set("tls.min_version", "SSLv3"), r"tls\.min_version"),
    "min_version TLSv1.1": (_set("tls.min_version", "TLSv1.1"), r"tls\.min_version"),
    "upstream name that does not exist": (
        _set("listeners[0].upstream", "nope"),
        r"listeners\[0\]\.upstream",
    ),
    # the access log cannot be opened (even by root): a directory, or under a regular file
    "access log file is a directory": (_access_log_at("certs"), r"telemetry\.access_log_file"),
    "access log file under a regular file": (
        _access_log_at("certs/localhost.pem/access.log"),
        r"telemetry\.access_log_file",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_config_names_key_path_and_exits_2(config_dir, certs, name):
    mutate, key_path = CASES[name]
    cfg = good_config(certs)
    mutate(cfg, config_dir)
    path = write_config(config_dir / "edgeterm.toml", cfg)
    code, out, err = check(path)
    output = out + err
    assert code == 2, f"exit {code}\n{output}"
    assert error_line_re(path, key_path).search(output), (
        f"no line '<file>: {key_path}: <message>' in:\n{output}"
    )
    assert not re.search(r"^ok$", out, re.MULTILINE)
    assert "Traceback" not in output


def assert_all_reported(config_dir: Path, certs: CertSet, names: list[str]) -> None:
    cfg = good_config(certs)
    for name in names:
        CASES[name][0](cfg, config_dir)
    path = write_config(config_dir / "edgeterm.toml", cfg)
    code, out, err = check(path)
    output = out + err
    assert code == 2, output
    missing = [n for n in names if not error_line_re(path, CASES[n][1]).search(output)]
    assert not missing, f"not reported: {missing}\n{output}"


def test_every_error_is_reported(config_dir, certs):
    assert_all_reported(
        config_dir,
        certs,
        [
            "unknown key",
            "min_version SSLv3",
            "bind without port",
            "upstream name that does not exist",
            "wrong type: string for integer",
        ],
    )


def test_file_errors_reported_together_with_other_errors(config_dir, certs):
    """A missing key file is reported even when other keys are wrong too."""
    assert_all_reported(config_dir, certs, ["missing key file", "unknown key", "bind without port"])


def test_toml_syntax_error_exits_2(config_dir):
    path = config_dir / "edgeterm.toml"
    path.write_text('[server]\nworkers = \n[[listeners]\nname = "https"\n')
    code, out, err = check(path)
    assert code == 2, out + err
    assert path.name in out + err
    assert "Traceback" not in out + err


def test_missing_config_file_exits_2(config_dir):
    code, out, err = check(config_dir / "nope.toml")
    assert code == 2, out + err
    assert "nope.toml" in out + err
    assert "Traceback" not in out + err


def test_relative_paths_resolve_against_config_dir(config_dir, certs, tmp_path):
    """check-config run from another directory still finds certs/ next to the config."""
    sub = config_dir / "conf"
    sub.mkdir()
    shutil.move(str(config_dir / "certs"), str(sub / "certs"))
    path = write_config(sub / "edgeterm.toml", good_config(certs))
    r = run_cli("check-config", "-c", str(path), cwd=tmp_path.parent)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stdout + r.stderr


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("certs", "it is a directory"),
        ("certs/localhost.pem/access.log", "Not a directory"),
        ("certs/localhost.pem/logs/access.log", "Not a directory"),
    ],
)
def test_unopenable_access_log_fails_check_config_and_start_with_exit_2(
    config_dir: Path, certs: CertSet, relative: str, reason: str
) -> None:
    """What a worker would otherwise find at boot (the server halting with exit 5 and a
    message without the key): ``FILE: telemetry.access_log_file: cannot open ...: reason``."""
    cfg = good_config(certs)
    _access_log_at(relative)(cfg, config_dir)
    path = write_config(config_dir / "edgeterm.toml", cfg)
    target = re.escape(str(config_dir / relative))
    line = re.compile(
        rf"(?m)^{re.escape(str(path))}: telemetry\.access_log_file: "
        rf'cannot open "{target}" for appending: {reason}$'
    )
    code, out, err = check(path)
    assert code == 2 and line.search(err), (code, out, err)
    assert not (config_dir / "certs" / "localhost.pem").is_dir()  # nothing was created
    for args in (["start"], ["start", "--foreground"]):
        r = run_cli(*args, "-c", str(path), cwd=config_dir, timeout=60)
        try:
            assert r.returncode == 2 and line.search(r.stderr), (args, r.returncode, r.stderr)
        finally:
            if r.returncode == 0:  # started after all: stop it
                run_cli("stop", "-c", str(path), timeout=60)
    assert not (config_dir / "run" / "edgeterm.pid").exists()


def test_access_log_that_can_be_created_is_ok(config_dir: Path, certs: CertSet) -> None:
    """A missing file in missing directories is fine (the access log creates them), and the
    check creates nothing."""
    cfg = good_config(certs)
    _access_log_at("logs/today/access.log")(cfg, config_dir)
    path = write_config(config_dir / "edgeterm.toml", cfg)
    code, out, err = check(path)
    assert (code, out.strip()) == (0, "ok"), err
    assert not (config_dir / "logs").exists()


def test_max_conns_below_the_worker_count_is_a_warning(config_dir: Path, certs: CertSet) -> None:
    """Each worker allows at least one connection (docs/routing.md, "Caps"): with 2 workers,
    max_conns = 1 really means 2. check-config and start say so, and go on."""
    cfg = good_config(certs)
    cfg["server"].update({"workers": 2, "pin_cpus": False})
    cfg["upstreams"]["app"]["servers"] = [
        {"address": "127.0.0.1:9", "max_conns": 1},
        {"address": "[::1]:9", "max_conns": 2},
    ]
    path = write_config(config_dir / "edgeterm.toml", cfg)
    warning = re.compile(
        rf"(?m)^warning: {re.escape(str(path))}: upstreams\.app\.servers\[0\]\.max_conns: 1 is "
        r"fewer than the 2 workers.*up to 2 can be open to 127\.0\.0\.1:9"
    )
    code, out, err = check(path)
    assert (code, out.strip()) == (0, "ok"), err
    assert warning.search(err), err
    assert "servers[1]" not in err  # 2 caps over 2 workers: 1 each, exactly the cap
    r = run_cli("start", "-c", str(path), cwd=config_dir, timeout=60)
    try:
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert warning.search(r.stderr), r.stderr
    finally:
        if r.returncode == 0:
            stopped = run_cli("stop", "-c", str(path), timeout=60)
            assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
