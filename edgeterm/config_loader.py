"""Load and validate the TOML config file into the frozen dataclasses of ``edgeterm.config``.

Validation is all-or-nothing: every problem in the file is collected, then reported at once as one
``ConfigError`` whose lines read ``<file>: <key path>: <what is wrong>``. Nothing here reads the
files the config names (certificates, ticket keys); their loaders check them with better messages.
The one file edgeterm writes, the access log (when ``telemetry.access_log`` is on), is checked
here for being openable, without writing or creating anything, so that ``check-config``, start
and reload report it by its key instead of a worker failing to boot.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import json
import math
import os
import pwd
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Final, Literal, TypeVar

from edgeterm.config import (
    AcceptProxy,
    Address,
    BalanceMode,
    CertificateConfig,
    ClientAuth,
    Config,
    LimitsConfig,
    ListenerConfig,
    ProxyProtocol,
    ProxyTlv,
    RouteConfig,
    ServerConfig,
    TelemetryConfig,
    TicketsConfig,
    TimeoutsConfig,
    TlsConfig,
    TlsVersionName,
    UpstreamConfig,
)
from edgeterm.errors import ConfigError
from edgeterm.health import HealthSettings
from edgeterm.telemetry import parse_otlp_endpoint

__all__ = ["load_config", "parse_address"]

T = TypeVar("T")
D = TypeVar("D")

_MISSING: Final = object()
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_TLS_VERSIONS: Final[dict[str, TlsVersionName]] = {"TLSv1.2": "TLSv1.2", "TLSv1.3": "TLSv1.3"}
_BALANCE_MODES: Final[dict[str, BalanceMode]] = {
    "round_robin": "round_robin",
    "least_conn": "least_conn",
    "two_choices": "two_choices",
    "source_hash": "source_hash",
}
_ACCEPT_PROXY: Final[dict[str, AcceptProxy]] = {
    "none": "none",
    "v1": "v1",
    "v2": "v2",
    "any": "any",
}
_PROXY_PROTOCOL: Final[dict[str, ProxyProtocol]] = {"none": "none", "v1": "v1", "v2": "v2"}
_PROXY_TLVS: Final[dict[str, ProxyTlv]] = {"alpn": "alpn", "authority": "authority", "ssl": "ssl"}
_CLIENT_AUTH: Final[dict[str, ClientAuth]] = {
    "none": "none",
    "optional": "optional",
    "required": "required",
}
_UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes with its NUL


# --- addresses ---------------------------------------------------------------------------------


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` into an ``Address`` with a numeric host.

    A host name is resolved once, here (first ``getaddrinfo`` result). Port 0 ("pick a free port")
    is accepted only with ``allow_port_zero`` (listeners). Raises ``ValueError`` with a message
    suitable for a config error line.
    """
    shown = _quote(text)
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected host:port, got {shown}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {shown}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in [::1]:8443; got {shown}")
    if not host:
        raise ValueError(f"missing host in {shown} (use 0.0.0.0 or [::] for all addresses)")
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"expected host:port with a numeric port, got {shown}")
    port, lowest = int(port_text), 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port {port} out of range {lowest}..65535 in {shown}")
    return _resolve(host, port, bracketed=text.startswith("["), shown=shown)


def _resolve(host: str, port: int, *, bracketed: bool, shown: str) -> Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if bracketed != (ip.version == 6):
            raise ValueError(f"brackets are for IPv6 addresses only, got {shown}")
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return Address(str(ip), port, family)
    if bracketed:
        raise ValueError(f"brackets are for IPv6 addresses only, got {shown}")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"invalid host name {_quote(host)}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot resolve host {_quote(host)}: {reason}") from None
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Address(str(sockaddr[0]), port, socket.AddressFamily(family))
    raise ValueError(f"host {_quote(host)} has no IPv4 or IPv6 address")


def _overlaps(a: Address, b: Address) -> bool:
    """Whether two listeners would fight over the same port (equal, or one is the wildcard)."""
    if a.port == 0 or a.port != b.port or a.family != b.family:
        return False
    return (
        a.host == b.host
        or ipaddress.ip_address(a.host).is_unspecified
        or (ipaddress.ip_address(b.host).is_unspecified)
    )


# --- describing values -------------------------------------------------------------------------


def _quote(text: str, limit: int = 80) -> str:
    """A double-quoted, single-line rendering of user text (error lines must stay one line)."""
    if len(text) > limit:
        text = text[:limit] + "..."
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else _escape(c) for c in quoted)


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}" if abs(value) < 10**30 else "a very large integer"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__  # TOML dates and times


def _expected(what: str, value: object) -> str:
    return f"expected {what}, got {_describe(value)}"


def _key_path(parent: str, key: str) -> str:
    shown = key if _BARE_KEY_RE.fullmatch(key) else _quote(key, limit=40)
    return f"{parent}.{shown}" if parent else shown


# --- validators: functions from a TOML value to a typed value, raising _Invalid ----------------


class _Invalid(Exception):
    """A value is wrong; ``problems`` holds (key path suffix, message) pairs."""

    def __init__(self, message: str, suffix: str = "") -> None:
        super().__init__(message)
        self.problems = [(suffix, message)]

    @classmethod
    def many(cls, problems: list[tuple[str, str]]) -> _Invalid:
        invalid = cls(problems[0][1], problems[0][0])
        invalid.problems = problems
        return invalid


Validator = Callable[[object], T]


def _integer(lo: int, hi: int | None = None) -> Validator[int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(_expected("an integer", value))
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise _Invalid(f"must be {bounds}, got {_describe(value)}")
        return value

    return check


def _number(
    *, positive: bool = False, lo: float | None = None, hi: float | None = None
) -> Validator[float]:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(_expected("a number", value))
        try:
            number = float(value)
        except OverflowError:
            raise _Invalid(f"number out of range, got {_describe(value)}") from None
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number, got {_describe(value)}")
        if positive and number <= 0:
            raise _Invalid(f"must be > 0, got {_describe(value)}")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            if hi is None:
                raise _Invalid(f"must be at least {lo:g}, got {_describe(value)}")
            raise _Invalid(f"must be between {lo} and {hi}, got {_describe(value)}")
        return number

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(_expected("a boolean (true or false)", value))
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(_expected("a string", value))
    return value


def _non_empty_string(value: object) -> str:
    text = _string(value)
    if not text:
        raise _Invalid("must not be empty")
    return text


def _optional_string(value: object) -> str | None:
    return _string(value) or None


def _system_user(value: object) -> str | None:
    name = _optional_string(value)
    if name is not None:
        try:
            pwd.getpwnam(name)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise _Invalid(f"no such user {_quote(name)} on this system") from None
    return name


def _system_group(value: object) -> str | None:
    name = _optional_string(value)
    if name is not None:
        try:
            grp.getgrnam(name)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise _Invalid(f"no such group {_quote(name)} on this system") from None
    return name


def _name(value: object) -> str:
    text = _string(value)
    if not _NAME_RE.fullmatch(text):
        raise _Invalid(_bad_name(text))
    return text


def _bad_name(name: str) -> str:
    return f'invalid name {_quote(name)}: use only letters, digits, "_", "." and "-"'


def _choice(choices: Mapping[str, T]) -> Validator[T]:
    def check(value: object) -> T:
        text = _string(value)
        if text not in choices:
            allowed = ", ".join(_quote(c) for c in choices)
            raise _Invalid(f"expected one of {allowed}, got {_quote(text)}")
        return choices[text]

    return check


def _path(base: Path) -> Validator[Path]:
    """A file path; relative paths resolve against ``base`` (the config file's directory)."""

    def check(value: object) -> Path:
        text = _string(value)
        if not text:
            raise _Invalid("must not be empty")
        if "\0" in text:
            raise _Invalid("a path cannot contain a NUL character")
        return base / text

    return check


def _optional_path(base: Path) -> Validator[Path | None]:
    """A path, or "" for none."""
    as_path = _path(base)
    return lambda value: None if value == "" else as_path(value)


def _address(*, allow_port_zero: bool) -> Validator[Address]:
    def check(value: object) -> Address:
        try:
            return parse_address(_string(value), allow_port_zero=allow_port_zero)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None

    return check


def _workers(value: object) -> int | Literal["auto"]:
    if value == "auto" and isinstance(value, str):
        return "auto"
    if isinstance(value, str):
        raise _Invalid(f'expected an integer >= 1 or "auto", got {_describe(value)}')
    return _integer(1)(value)


def _alpn_protocol(value: object) -> str:
    text = _non_empty_string(value)
    if not text.isascii():
        raise _Invalid(f"must be ASCII, got {_describe(text)}")
    if len(text) > 255:
        raise _Invalid(f"must be at most 255 bytes, got {len(text)}")
    return text


def _list_of(item: Validator[T], *, non_empty: bool = False) -> Validator[tuple[T, ...]]:
    """An array whose every element passes ``item``; reports all bad elements, by index."""

    def check(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _Invalid(_expected("an array", value))
        if non_empty and not value:
            raise _Invalid("must not be empty")
        items: list[T] = []
        problems: list[tuple[str, str]] = []
        for index, element in enumerate(value):
            try:
                items.append(item(element))
            except _Invalid as exc:
                problems += [(f"[{index}]{suffix}", msg) for suffix, msg in exc.problems]
        if problems:
            raise _Invalid.many(problems)
        return tuple(items)

    return check


def _cidr(value: object) -> str:
    """An IP network (``10.0.0.0/8``, ``2001:db8::/32``) or a single address, normalised."""
    text = _non_empty_string(value)
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _Invalid(f"expected an IP network such as 10.0.0.0/8, got {_quote(text)}") from None


# --- the reader: one TOML table, its key path, and the shared error list -----------------------


class _Table:
    """Typed access to one TOML table. Bad values are recorded as errors (not raised) and replaced
    by the default, so that reading goes on and every problem is reported. ``close()`` reports the
    keys that were never asked for as unknown."""

    def __init__(self, errors: list[str], file: str, data: Mapping[str, object], path: str) -> None:
        self.errors, self.file, self.data, self.path = errors, file, data, path
        self.known: list[str] = []

    def error(self, key: str | None, message: str, suffix: str = "") -> None:
        path = _key_path(self.path, key) if key is not None else self.path
        self.errors.append(f"{self.file}: {path}{suffix}: {message}")

    def _take(self, key: str) -> object:
        self.known.append(key)
        return self.data.get(key, _MISSING)

    def _report(self, key: str, invalid: _Invalid) -> None:
        for suffix, message in invalid.problems:
            self.error(key, message, suffix)

    def get(self, key: str, check: Validator[T], default: D) -> T | D:
        value = self._take(key)
        if value is _MISSING:
            return default
        try:
            return check(value)
        except _Invalid as invalid:
            self._report(key, invalid)
            return default

    def require(self, key: str, check: Validator[T]) -> T | None:
        value = self._take(key)
        if value is _MISSING:
            self.error(key, "missing required key")
            return None
        try:
            return check(value)
        except _Invalid as invalid:
            self._report(key, invalid)
            return None

    def table(self, key: str) -> _Table:
        value = self._take(key)
        if value is not _MISSING and not isinstance(value, dict):
            self.error(key, _expected("a table", value))
        data = value if isinstance(value, dict) else {}
        return _Table(self.errors, self.file, data, _key_path(self.path, key))

    def tables(self, key: str, *, required: bool = False) -> list[_Table]:
        """An array of tables (``[[key]]``); ``required`` means at least one."""
        value, path = self._take(key), _key_path(self.path, key)
        if value is _MISSING or value == []:
            if required:
                self.error(key, f"at least one [[{path}]] table is required")
            return []
        if not isinstance(value, list):
            self.error(key, _expected("an array of tables", value))
            return []
        result = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                result.append(_Table(self.errors, self.file, item, f"{path}[{index}]"))
            else:
                self.error(key, _expected("a table", item), f"[{index}]")
        return result

    def named_tables(self) -> Iterator[tuple[str, _Table]]:
        """Every key of this table as a named sub-table (``[upstreams.<name>]``)."""
        for name, value in self.data.items():
            self.known.append(name)
            if not isinstance(value, dict):
                self.error(name, _expected("a table", value))
            elif not _NAME_RE.fullmatch(name):
                self._report(name, _Invalid(_bad_name(name)))
            else:
                yield name, _Table(self.errors, self.file, value, _key_path(self.path, name))

    def close(self) -> None:
        for key in self.data:
            if key not in self.known:
                hint = difflib.get_close_matches(key, self.known, n=1)
                self.error(
                    key, f"unknown key (did you mean {_quote(hint[0])}?)" if hint else "unknown key"
                )


# --- sections ----------------------------------------------------------------------------------


def _read_server(t: _Table, base: Path) -> ServerConfig:
    d = ServerConfig()
    server = ServerConfig(
        workers=t.get("workers", _workers, d.workers),
        pin_cpus=t.get("pin_cpus", _boolean, d.pin_cpus),
        pidfile=t.get("pidfile", _path(base), base / d.pidfile),
        admin_socket=t.get("admin_socket", _path(base), base / d.admin_socket),
        graceful_timeout=t.get("graceful_timeout", _number(positive=True), d.graceful_timeout),
        log_file=t.get("log_file", _optional_path(base), d.log_file),
        user=t.get("user", _system_user, d.user),
        group=t.get("group", _system_group, d.group),
        heartbeat_timeout=t.get(
            # heartbeats go every second both ways: a shorter timeout would fire falsely
            "heartbeat_timeout",
            _number(lo=2.0),
            d.heartbeat_timeout,
        ),
    )
    t.close()
    return server


def _read_listeners(root: _Table) -> tuple[list[ListenerConfig], list[tuple[_Table, str]]]:
    """The listeners, and each one's upstream reference (checked once the pools are known)."""
    listeners: list[ListenerConfig] = []
    references: list[tuple[_Table, str]] = []
    names: dict[str, str] = {}
    binds: list[tuple[Address, _Table, str | None]] = []
    for t in root.tables("listeners", required=True):
        name = t.require("name", _name)
        bind = t.require("bind", _address(allow_port_zero=True))
        upstream = t.require("upstream", _non_empty_string)
        backlog = t.get("backlog", _integer(1, 65535), 1024)
        tcp_fastopen = t.get("tcp_fastopen", _integer(0, 65535), 0)
        defer_accept = t.get("defer_accept", _defer_accept, 0)
        accept_proxy: AcceptProxy = t.get("accept_proxy", _choice(_ACCEPT_PROXY), "none")
        proxy_timeout = t.get("proxy_timeout", _number(positive=True), 5.0)
        proxy_from = t.get("proxy_from", _list_of(_cidr), ())
        t.close()
        if name is not None:
            if name in names:
                t.error("name", f"duplicate listener name {_quote(name)} (also {names[name]})")
            names.setdefault(name, t.path)
        if bind is not None:
            for other, other_table, other_name in binds:
                if _overlaps(bind, other):
                    label = f" ({_quote(other_name)})" if other_name else ""
                    t.error("bind", f"{bind} conflicts with {other_table.path}{label} on {other}")
            binds.append((bind, t, name))
        if upstream is not None:
            references.append((t, upstream))
        if name is not None and bind is not None and upstream is not None:
            listeners.append(
                ListenerConfig(
                    name,
                    bind,
                    upstream,
                    backlog,
                    tcp_fastopen=tcp_fastopen,
                    defer_accept=defer_accept,
                    accept_proxy=accept_proxy,
                    proxy_timeout=proxy_timeout,
                    proxy_from=proxy_from,
                )
            )
    return listeners, references


def _defer_accept(value: object) -> int:
    """``listeners.defer_accept``: true (1 s), false (0), or whole seconds 0..3600."""
    if isinstance(value, bool):
        return 1 if value else 0
    if not isinstance(value, int):
        raise _Invalid(_expected("a boolean or a number of seconds", value))
    return _integer(0, 3600)(value)


def _read_tls(t: _Table, base: Path) -> TlsConfig | None:
    certificates = []
    for c in t.tables("certificates", required=True):
        cert = c.require("cert", _path(base))
        key = c.get("key", _path(base), None)
        c.close()
        if cert is not None:
            certificates.append(CertificateConfig(cert, key))
    d = TicketsConfig()
    k = t.table("tickets")
    tickets = TicketsConfig(
        enabled=k.get("enabled", _boolean, d.enabled),
        rotate_every=k.get("rotate_every", _number(positive=True), d.rotate_every),
        key_files=k.get("key_files", _list_of(_path(base)), d.key_files),
        count=k.get("count", _integer(0, 16), d.count),
    )
    k.close()
    tls = TlsConfig(
        certificates=tuple(certificates),
        min_version=t.get("min_version", _choice(_TLS_VERSIONS), "TLSv1.2"),
        ciphers=t.get("ciphers", _non_empty_string, "intermediate"),
        alpn=t.get("alpn", _list_of(_alpn_protocol), ("http/1.1",)),
        tickets=tickets,
        strict_sni=t.get("strict_sni", _boolean, False),
        client_auth=t.get("client_auth", _choice(_CLIENT_AUTH), "none"),
        client_ca=t.get("client_ca", _optional_path(base), None),
        client_crl=t.get("client_crl", _optional_path(base), None),
    )
    if tls.client_auth != "none" and tls.client_ca is None:
        t.error("client_ca", f'required with client_auth = "{tls.client_auth}"')
    t.close()
    return tls if certificates else None


def _server_address(base: Path) -> Validator[Address]:
    """An upstream server: ``host:port``, ``[v6]:port`` or ``unix:/path`` (a relative path
    resolves against the config file's directory)."""
    tcp = _address(allow_port_zero=False)

    def check(value: object) -> Address:
        text = _string(value)
        if not text.startswith("unix:"):
            return tcp(text)
        raw = text[5:]
        if not raw:
            raise _Invalid(f"expected unix:/path/to/socket, got {_quote(text)}")
        if "\0" in raw:
            raise _Invalid("a path cannot contain a NUL character")
        path = os.path.normpath(base / raw)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise _Invalid(f"socket path {_quote(path)} is over {_UNIX_PATH_MAX} bytes")
        return Address(path, 0, socket.AF_UNIX)

    return check


_SERVER_KEYS: Final = ("address", "weight", "max_conns")


def _server_entry(base: Path) -> Validator[tuple[Address, int, int]]:
    """A server as a string (weight 1, no cap) or ``{address, weight, max_conns}``."""
    as_address = _server_address(base)
    fields: dict[str, Validator[int]] = {"weight": _integer(1, 256), "max_conns": _integer(0)}

    def check(value: object) -> tuple[Address, int, int]:
        if isinstance(value, str):
            return as_address(value), 1, 0
        if not isinstance(value, dict):
            raise _Invalid(_expected("an address string or a table {address, weight, ...}", value))
        problems: list[tuple[str, str]] = []
        for key in value:
            if key not in _SERVER_KEYS:
                hint = difflib.get_close_matches(key, _SERVER_KEYS, n=1)
                more = f" (did you mean {_quote(hint[0])}?)" if hint else ""
                problems.append((f".{_key_path('', key)}", f"unknown key{more}"))
        address: Address | None = None
        if "address" not in value:
            problems.append((".address", "missing required key"))
        else:
            try:
                address = as_address(value["address"])
            except _Invalid as exc:
                problems += [(".address" + s, m) for s, m in exc.problems]
        numbers = {"weight": 1, "max_conns": 0}
        for key, validate in fields.items():
            if key in value:
                try:
                    numbers[key] = validate(value[key])
                except _Invalid as exc:
                    problems += [(f".{key}" + s, m) for s, m in exc.problems]
        if problems or address is None:
            raise _Invalid.many(problems)
        return address, numbers["weight"], numbers["max_conns"]

    return check


def _read_upstreams(root: _Table, base: Path) -> tuple[dict[str, UpstreamConfig], list[str]]:
    """The pools, and the names of all pools in the file (valid or not, for listener errors)."""
    value = root.data.get("upstreams")
    t = root.table("upstreams")
    if value is None or value == {}:
        root.error("upstreams", "at least one [upstreams.<name>] table is required")
    pools = {}
    for name, p in t.named_tables():
        d = UpstreamConfig(name, ())
        entries = p.require("servers", _list_of(_server_entry(base), non_empty=True))
        balance: BalanceMode = p.get("balance", _choice(_BALANCE_MODES), d.balance)
        proxy: ProxyProtocol = p.get("proxy_protocol", _choice(_PROXY_PROTOCOL), d.proxy_protocol)
        tlvs_given = "proxy_tlvs" in p.data
        tlvs = p.get("proxy_tlvs", _list_of(_choice(_PROXY_TLVS)), d.proxy_tlvs)
        if tlvs_given and proxy != "v2":
            p.error("proxy_tlvs", 'TLVs exist only in PROXY v2: set proxy_protocol = "v2"')
        max_attempts = p.get("max_attempts", _integer(0, 1000), d.max_attempts)
        passive = p.table("passive")
        fail_threshold = passive.get("fail_threshold", _integer(0, 1000), d.fail_threshold)
        down_for = passive.get("down_for", _number(positive=True), d.down_for)
        passive.close()
        health = None
        if "health" in p.data:
            h = p.table("health")
            hd = HealthSettings()
            positive = _number(positive=True)
            health = HealthSettings(
                interval=h.get("interval", positive, hd.interval),
                timeout=h.get("timeout", positive, hd.timeout),
                rise=h.get("rise", _integer(1, 100), hd.rise),
                fall=h.get("fall", _integer(1, 100), hd.fall),
            )
            h.close()
        p.close()
        if entries is None:
            continue
        seen: dict[str, int] = {}
        for index, (address, _w, _c) in enumerate(entries):
            first = seen.setdefault(str(address), index)
            if first != index:
                p.error(
                    "servers", f"{address} is listed twice (also servers[{first}])", f"[{index}]"
                )
        pools[name] = UpstreamConfig(
            name,
            tuple(e[0] for e in entries),
            balance,
            weights=tuple(e[1] for e in entries),
            max_conns=tuple(e[2] for e in entries),
            proxy_protocol=proxy,
            proxy_tlvs=tlvs,
            max_attempts=max_attempts,
            fail_threshold=fail_threshold,
            down_for=down_for,
            health=health,
        )
    return pools, sorted(t.data)


def _route_name(value: object) -> str:
    """A route's SNI: a host name or ``*.`` + a host name, lowercased, without trailing dot."""
    text = _non_empty_string(value).lower()
    if text.endswith(".") and len(text) > 1:
        text = text[:-1]
    host = text[2:] if text.startswith("*.") else text
    if "*" in host:
        raise _Invalid(
            f"invalid name {_quote(text)}: a wildcard is a whole first label only, as in "
            '"*.example.com"'
        )
    if not _HOSTNAME_RE.fullmatch(host) or host.endswith("."):
        raise _Invalid(f"invalid host name {_quote(text)}")
    return text


def _route_names(value: object) -> tuple[str, ...]:
    if isinstance(value, list):
        return _list_of(_route_name, non_empty=True)(value)
    return (_route_name(value),)


def _read_routes(
    root: _Table, tls: TlsConfig | None, pool_names: list[str], listener_names: set[str]
) -> list[RouteConfig]:
    """``[[routes]]``: checked against the pools, the listeners and ``tls.alpn``."""
    routes: list[RouteConfig] = []
    seen: dict[tuple[str, str, str | None], str] = {}
    for t in root.tables("routes"):
        names = t.require("sni", _route_names)
        upstream = t.require("upstream", _non_empty_string)
        alpn = t.get("alpn", _alpn_protocol, None)
        only = t.get("listeners", _list_of(_name, non_empty=True), ())
        t.close()
        if upstream is not None and upstream not in pool_names:
            known = ", ".join(pool_names) or "none"
            t.error("upstream", f"no pool named {_quote(upstream)} in [upstreams] (known: {known})")
        if alpn is not None and tls is not None and alpn not in tls.alpn:
            t.error(
                "alpn",
                f"{_quote(alpn)} is not in tls.alpn, so no connection can negotiate it "
                "(the route would never match)",
            )
        for index, lname in enumerate(only):
            if lname not in listener_names:
                known = ", ".join(sorted(listener_names)) or "none"
                t.error(
                    "listeners", f"no listener named {_quote(lname)} (known: {known})", f"[{index}]"
                )
        for name in names or ():
            for scope in only or ("*",):
                first = seen.setdefault((scope, name, alpn), t.path)
                if first != t.path:
                    where = "every listener" if scope == "*" else f"listener {_quote(scope)}"
                    with_alpn = f" with alpn {_quote(alpn)}" if alpn is not None else ""
                    t.error("sni", f"{name}{with_alpn} on {where} is already routed by {first}")
        if names is not None and upstream is not None:
            routes.append(RouteConfig(names, upstream, alpn, only))
    return routes


def _read_timeouts(t: _Table) -> TimeoutsConfig:
    d, positive = TimeoutsConfig(), _number(positive=True)
    timeouts = TimeoutsConfig(
        handshake=t.get("handshake", positive, d.handshake),
        connect=t.get("connect", positive, d.connect),
        idle=t.get("idle", positive, d.idle),
    )
    t.close()
    return timeouts


def _read_limits(t: _Table) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        max_connections=t.get("max_connections", _integer(1), d.max_connections),
        buffer_size=t.get("buffer_size", _integer(4096, 16 * 1024 * 1024), d.buffer_size),
        max_handshakes_per_second=t.get(
            "max_handshakes_per_second", _integer(0), d.max_handshakes_per_second
        ),
        max_handshakes_per_client=t.get(
            "max_handshakes_per_client", _integer(0), d.max_handshakes_per_client
        ),
    )
    t.close()
    return limits


def _otlp_endpoint(value: object) -> str:
    text = _string(value)
    if text:
        try:
            parse_otlp_endpoint(text)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    return text


_HEADER_NAME_RE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_HEADER_VALUE_RE: Final = re.compile(r"[\x20-\x7e\t]*")


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    """A table of header name -> string value (names lowercased: gRPC metadata requires it)."""
    if not isinstance(value, dict):
        raise _Invalid(_expected("a table of strings", value))
    items: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    for name, raw in value.items():
        suffix = "." + (name if _BARE_KEY_RE.fullmatch(name) else _quote(name, limit=40))
        if not _HEADER_NAME_RE.fullmatch(name):
            problems.append((suffix, f"invalid header name {_quote(name)}"))
        elif not isinstance(raw, str):
            problems.append((suffix, _expected("a string", raw)))
        elif not _HEADER_VALUE_RE.fullmatch(raw):
            problems.append((suffix, "a header value must be printable ASCII on one line"))
        else:
            items.append((name.lower(), raw))
    if problems:
        raise _Invalid.many(problems)
    return tuple(items)


def _optional_address(value: object) -> Address | None:
    """ "host:port", or "" for none (port 0 picks a free port)."""
    if value == "":
        return None
    return _address(allow_port_zero=True)(value)


def _read_telemetry(t: _Table, base: Path) -> TelemetryConfig:
    d = TelemetryConfig()
    telemetry = TelemetryConfig(
        otlp_endpoint=t.get("otlp_endpoint", _otlp_endpoint, d.otlp_endpoint),
        sample_ratio=t.get("sample_ratio", _number(lo=0.0, hi=1.0), d.sample_ratio),
        service_name=t.get("service_name", _non_empty_string, d.service_name),
        headers=t.get("headers", _headers, d.headers),
        export_interval=t.get("export_interval", _number(lo=0.05, hi=3600.0), d.export_interval),
        prometheus_bind=t.get("prometheus_bind", _optional_address, d.prometheus_bind),
        access_log=t.get("access_log", _boolean, d.access_log),
        access_log_file=t.get("access_log_file", _optional_path(base), d.access_log_file),
    )
    if telemetry.access_log and telemetry.access_log_file is not None:
        # every worker opens it at boot: a failure there would halt the server (exit 5)
        path = telemetry.access_log_file
        reason = _cannot_append(path)
        if reason is not None:
            t.error(
                "access_log_file",
                f"cannot open {_quote(str(path), limit=4096)} for appending: {reason}",
            )
    t.close()
    return telemetry


def _cannot_append(path: Path) -> str | None:
    """Why ``path`` could not be opened for appending the way the access log opens it
    (created, with any missing parent directories, if it does not exist); None if it could.
    Writes and creates nothing: an existing regular file is opened for writing and closed at
    once, a missing one needs its nearest existing ancestor to be a writable directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a parent that is a file (ENOTDIR), a loop, no search permission
        return exc.strerror or str(exc)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return "it is a directory"
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device: opening could block
            return None if os.access(path, os.W_OK) else "Permission denied"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            return exc.strerror or str(exc)
        os.close(fd)
        return None
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{_quote(str(ancestor), limit=4096)} is not a directory"
    if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
        return f"cannot create it in {_quote(str(ancestor), limit=4096)}: Read-only file system"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create it in {_quote(str(ancestor), limit=4096)}: Permission denied"
    return None


# --- the file ----------------------------------------------------------------------------------


def _read_toml(path: str | os.PathLike[str], file: str) -> dict[str, object]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        message = f"invalid UTF-8 at byte {exc.start}"
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
    message = "".join(c if c.isprintable() else " " for c in message)
    raise ConfigError([f"{file}: TOML syntax error: {message}"])


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and build the config; raise one ``ConfigError`` listing every problem."""
    file = str(path)
    absolute = Path(os.path.abspath(path))
    base = absolute.parent
    errors: list[str] = []
    root = _Table(errors, file, _read_toml(path, file), "")

    server = _read_server(root.table("server"), base)
    listeners, references = _read_listeners(root)
    tls = _read_tls(root.table("tls"), base)
    upstreams, pool_names = _read_upstreams(root, base)
    timeouts = _read_timeouts(root.table("timeouts"))
    limits = _read_limits(root.table("limits"))
    telemetry = _read_telemetry(root.table("telemetry"), base)
    routes = _read_routes(root, tls, pool_names, {lst.name for lst in listeners})
    root.close()
    for listener, upstream in references:
        if upstream not in pool_names:
            known = ", ".join(pool_names) or "none"
            listener.error(
                "upstream", f"no pool named {_quote(upstream)} in [upstreams] (known: {known})"
            )

    if errors:
        raise ConfigError(errors)
    assert tls is not None  # every None above has recorded an error
    return Config(
        path=absolute,
        listeners=tuple(listeners),
        tls=tls,
        upstreams=upstreams,
        server=server,
        timeouts=timeouts,
        limits=limits,
        telemetry=telemetry,
        routes=tuple(routes),
    )
