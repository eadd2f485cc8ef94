"""``edgeterm init DIR``: a commented starter config, laid out like etc/edgeterm.toml, that the
config loader and ``check-config`` accept, next to a self-signed certificate."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from edgeterm.config_loader import load_config
from edgeterm.starter import starter_config
from tests.support.launcher import run_cli

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "edgeterm.toml"
KEY_RE = re.compile(r"^([A-Za-z0-9_-]+) = ")
HEADER_RE = re.compile(r"^\[\[?([^\]]+)\]\]?$")


def init(directory: Path, *names: str) -> Path:
    args = [a for n in names for a in ("--name", n)]
    r = run_cli("init", str(directory), *args, cwd=directory.parent, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    config = directory / "edgeterm.toml"
    assert f"wrote {config}" in r.stdout
    return config


def layout(text: str) -> list[tuple[str, list[str]]]:
    """(table header, its keys in order) of a TOML text, ignoring commented-out keys."""
    tables: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        if m := HEADER_RE.match(line):
            tables.append((line, []))
        elif m := KEY_RE.match(line):
            tables[-1][1].append(m[1])
    return tables


def test_init_writes_a_commented_config_that_loads_and_checks(tmp_path: Path) -> None:
    config = init(tmp_path / "fresh")
    text = config.read_text()
    # the loader takes it, with every path resolved next to the file
    loaded = load_config(config)
    assert loaded.listeners[0].name == "https"
    assert loaded.tls.certificates[0].cert == tmp_path / "fresh" / "certs" / "localhost.pem"
    assert (tmp_path / "fresh" / "certs" / "localhost.pem").is_file()
    # and check-config says ok, run from elsewhere
    r = run_cli("check-config", "-c", str(config), cwd=Path("/"), timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
    # array-of-tables syntax, not inline arrays of tables
    lines = text.splitlines()
    assert "[[listeners]]" in lines and "[[tls.certificates]]" in lines
    assert not re.search(r"(?m)^(listeners|certificates) = ", text)
    # every key has a comment right above it (or above the key before it, for a group)
    for i, line in enumerate(lines):
        if KEY_RE.match(line):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
    comments = [line for line in lines if line.startswith("# ")]
    assert len(comments) > sum(1 for line in lines if KEY_RE.match(line))
    assert sum("Default:" in c for c in comments) >= 30
    # the values are the generator's, written by tomli-w
    assert tomllib.loads(text) == starter_config(("localhost",))


def test_init_has_the_layout_of_the_shipped_config(tmp_path: Path) -> None:
    """Tables in etc/edgeterm.toml's order; each key one the shipped file sets in that table."""
    starter = layout(init(tmp_path / "fresh").read_text())
    shipped = dict(layout(SHIPPED.read_text()))
    headers = [h for h, _ in layout(SHIPPED.read_text())]
    order = [headers.index(h) for h, _ in starter if h]
    assert order == sorted(order), [h for h, _ in starter]
    for header, keys in starter:
        assert (header == "" and not keys) or header in shipped, header
        assert set(keys) <= set(shipped[header]), (header, set(keys) - set(shipped[header]))
        shipped_order = [k for k in shipped[header] if k in keys]
        assert keys == shipped_order, (header, keys, shipped_order)


def test_init_names_and_no_overwrite(tmp_path: Path) -> None:
    config = init(tmp_path / "site", "example.test", "www.example.test")
    cfg = tomllib.loads(config.read_text())
    assert cfg["tls"]["certificates"] == [
        {"cert": "certs/example.test.pem", "key": "certs/example.test.key"}
    ]
    r = run_cli("check-config", "-c", str(config), timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
    before = config.read_bytes()
    r = run_cli("init", str(tmp_path / "site"), timeout=60)
    assert r.returncode == 1 and "not overwriting" in r.stderr, (r.stdout, r.stderr)
    assert config.read_bytes() == before
