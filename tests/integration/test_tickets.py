"""Session tickets that resume on every worker, across reloads, and across a fleet (issue 4).

Real processes: ``edgeterm start --foreground`` with two workers (the machine has two CPUs), an
echo upstream, stdlib ``ssl`` clients. A client resumes by offering the *original* session
object each time: a resumed connection gets a renewed ticket, which would hide expiry.

Status counters come from the admin socket and are refreshed every second by the workers'
heartbeats, so checks on them poll with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import deep_merge, write_config
from tests.support.launcher import EdgetermFactory, run_cli
from tests.support.supervision import (
    Supervised,
    free_port,
    serving_workers,
    supervised_config,
    wait_pids_gone,
    wait_status,
)
from tests.support.tlsclient import (
    HOST,
    OPENSSL,
    client_context,
    recv_exactly,
    s_client_exchange,
)

pytestmark = pytest.mark.timeout(120)

TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2
VERSIONS = pytest.mark.parametrize("version", [TLS13, TLS12], ids=["TLSv1.3", "TLSv1.2"])
NEW_SESSION_TICKET = 4  # TLS HandshakeType
HANDSHAKE = 22  # TLS ContentType
EXIT_CONFIG = 2  # edgeterm.cli


# --- servers ----------------------------------------------------------------------------------


def start_with_tickets(
    factory: EdgetermFactory,
    upstreams: list[str],
    *,
    run: str = "run",
    workers: int = 2,
    **tickets: Any,
) -> Supervised:
    """``edgeterm start --foreground`` with ``[tls.tickets]`` overrides; pidfile and admin
    socket under ``<test dir>/<run>/`` (one directory per instance)."""
    cfg, _, _ = supervised_config(factory, upstreams, workers=workers)
    rundir = factory.directory / run
    pidfile, admin_socket = rundir / "edgeterm.pid", rundir / "edgeterm.sock"
    cfg = deep_merge(
        cfg,
        {
            "server": {"pidfile": str(pidfile), "admin_socket": str(admin_socket)},
            "tls": {"tickets": tickets},
        },
    )
    server = factory.start(cfg=cfg)
    return Supervised(server, cfg, pidfile, admin_socket)


def sighup_and_wait(sv: Supervised) -> dict[str, Any]:
    """SIGHUP the supervisor (reload + ticket rotation) and wait until the next generation
    serves, the status counts one more rotation, and every old worker has exited."""
    before = sv.status()
    rotations = before["tickets"]["rotations"] + 1
    old = [w["pid"] for w in before["workers"]]
    sv.server.send_signal(signal.SIGHUP)
    gen = before["generation"] + 1

    def done(st: dict[str, Any]) -> bool:
        return (
            st["generation"] == gen
            and len(serving_workers(st)) == 2
            and st["tickets"]["rotations"] == rotations
        )

    wait_status(sv.admin_socket, done, timeout=20, what=f"generation {gen} serving")
    # connections must not land on a worker of the old generation, which holds the old ring
    wait_pids_gone(old, timeout=20, what="the old generation's workers")
    sv.server.remember_pids()
    return sv.status()


def reload_cli(sv: Supervised) -> subprocess.CompletedProcess[str]:
    r = run_cli("reload", "-c", str(sv.config), timeout=60)
    sv.server.remember_pids()
    return r


# --- clients ----------------------------------------------------------------------------------


def client(ca: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    return client_context(ca, max_version=version)


def exchange(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession]:
    """One TLS connection through edgeterm to the echo upstream, offering ``session``; return
    whether it resumed and the session the client holds afterwards. Reading the echo also
    reads the TLS 1.3 tickets, which the server sends before any application data."""
    raw = socket.create_connection((HOST, port), timeout=10)
    # as browsers do: without it, Nagle holds our request behind the client's last handshake
    # flight until the server's delayed ACK (40 ms), on every resumed connection
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(
        raw, server_hostname="localhost", session=session, suppress_ragged_eofs=False
    ) as s:
        s.sendall(b"ping\n")
        assert recv_exactly(s, 5, timeout=10) == b"ping\n"
        expected = "TLSv1.3" if ctx.maximum_version == TLS13 else "TLSv1.2"
        assert s.version() == expected
        after = s.session
        assert after is not None
        reused = bool(s.session_reused)
        # close_notify both ways (edgeterm answers ours once the echo upstream closes): OpenSSL
        # drops a session from its server-side cache when the connection ends without one
        s.unwrap()
        return reused, after


def first_session(port: int, ctx: ssl.SSLContext) -> ssl.SSLSession:
    reused, session = exchange(port, ctx)
    assert not reused
    assert session.has_ticket
    return session


def resumes(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> bool:
    return exchange(port, ctx, session)[0]


def resumed_by_worker(st: dict[str, Any]) -> dict[int, int]:
    return {w["pid"]: w["resumed"] for w in serving_workers(st)}


# --- every worker resumes every ticket ------------------------------------------------------


@VERSIONS
def test_every_connection_resumes_on_both_workers(
    edgeterm: EdgetermFactory, echo: Any, ca: Path, version: ssl.TLSVersion
) -> None:
    sv = start_with_tickets(edgeterm, [echo.addr])
    ctx = client(ca, version)
    session = first_session(sv.port, ctx)
    outcomes = [resumes(sv.port, ctx, session) for _ in range(200)]
    assert outcomes.count(True) == 200, f"{outcomes.count(False)} of 200 did not resume"

    st = wait_status(
        sv.admin_socket,
        lambda st: sum(w["handshakes"] for w in serving_workers(st)) == 201,
        timeout=10,
        what="the workers' counters to show 201 handshakes",
    )
    by_worker = resumed_by_worker(st)
    assert sum(by_worker.values()) == 200, st["workers"]
    assert len(by_worker) == 2 and all(n > 0 for n in by_worker.values()), (
        f"resumed handshakes per worker: {by_worker}"
    )
    tickets = st["tickets"]
    assert tickets["enabled"] is True
    assert tickets["source"] == "generated"
    assert tickets["rotations"] == 0
    assert tickets["locked_memory"] is True


# --- rotation on SIGHUP, and reload -------------------------------------------------------------


def test_a_ticket_survives_one_sighup_but_not_two(
    edgeterm: EdgetermFactory, echo: Any, ca: Path
) -> None:
    sv = start_with_tickets(edgeterm, [echo.addr])
    ctx13, ctx12 = client(ca, TLS13), client(ca, TLS12)
    original = {"1.3": first_session(sv.port, ctx13), "1.2": first_session(sv.port, ctx12)}
    contexts = {"1.3": ctx13, "1.2": ctx12}

    st = sighup_and_wait(sv)
    assert st["tickets"]["rotations"] == 1
    assert st["tickets"]["keys"] == 3  # previous, current, next
    assert st["tickets"]["current_key_age"] < 10
    for v, session in original.items():
        outcomes = [resumes(sv.port, contexts[v], session) for _ in range(10)]
        assert all(outcomes), f"TLS {v}: after one rotation: {outcomes}"
    # a session issued now, under the new current key, outlives the next rotation
    later = {v: first_session(sv.port, contexts[v]) for v in contexts}

    assert sighup_and_wait(sv)["tickets"]["rotations"] == 2
    for v, session in original.items():
        # a full handshake, not an error (exchange() checks the echo)
        outcomes = [resumes(sv.port, contexts[v], session) for _ in range(10)]
        assert not any(outcomes), f"TLS {v}: after two rotations: {outcomes}"
    for v, session in later.items():
        assert resumes(sv.port, contexts[v], session), f"TLS {v}: a ticket from generation 2"


def test_sessions_from_before_a_reload_resume_on_the_new_generation(
    edgeterm: EdgetermFactory, echo: Any, ca: Path
) -> None:
    sv = start_with_tickets(edgeterm, [echo.addr])
    contexts = {"1.3": client(ca, TLS13), "1.2": client(ca, TLS12)}
    sessions = {v: first_session(sv.port, c) for v, c in contexts.items()}
    old_pids = [w["pid"] for w in sv.status()["workers"]]

    r = reload_cli(sv)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    wait_pids_gone(old_pids, timeout=20, what="generation 1's workers")

    for v, session in sessions.items():
        outcomes = [resumes(sv.port, contexts[v], session) for _ in range(20)]
        assert all(outcomes), f"TLS {v}: {outcomes}"
    st = wait_status(
        sv.admin_socket,
        lambda st: sum(resumed_by_worker(st).values()) == 40,
        timeout=10,
        what="40 resumed handshakes on generation 2",
    )
    assert st["generation"] == 2
    assert all(w["generation"] == 2 for w in serving_workers(st))
    assert st["tickets"]["rotations"] == 1


# --- a fleet: key files -------------------------------------------------------------------------


def ticket_key_name(session_pem: Path) -> bytes:
    """The first 16 bytes of the ticket in a session saved by ``s_client -sess_out``: the name
    of the key that encrypted it."""
    text = subprocess.run(
        [OPENSSL, "sess_id", "-in", str(session_pem), "-noout", "-text"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    dump = text.split("TLS session ticket:", 1)[1]
    hex_bytes: list[str] = []
    for line in dump.splitlines():
        m = re.match(r"\s*[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]){1,16})", line)
        if m:
            hex_bytes += re.findall(r"[0-9a-f]{2}", m[1])
        if len(hex_bytes) >= 16:
            break
    return bytes.fromhex("".join(hex_bytes[:16]))


def s_client_session(port: int, ca: Path, out: Path, *, sess_in: Path | None = None) -> bytes:
    """Handshake with ``openssl s_client`` (TLS 1.3), exchange one line through the echo
    upstream (so the tickets have arrived), save the session; return its ticket's key name."""
    extra = ["-tls1_3", "-sess_out", str(out)]
    if sess_in is not None:
        extra += ["-sess_in", str(sess_in)]
    out.unlink(missing_ok=True)
    r = s_client_exchange(port, ca, *extra, send=b"ping\n", expect=b"ping\n")
    assert r.established and b"ping\n" in r.stdout, (r.returncode, r.stdout, r.stderr)
    return ticket_key_name(out)


def write_key(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_two_instances_sharing_key_files(
    edgeterm: EdgetermFactory, echo: Any, ca: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    first, second = keys / "ticket-first.key", keys / "ticket-second.key"
    key_a, key_b, key_n = os.urandom(80), os.urandom(80), os.urandom(80)
    write_key(first, key_a)
    write_key(second, key_b)
    files = [str(first), str(second)]
    x = start_with_tickets(edgeterm, [echo.addr], run="run-x", key_files=files)
    y = start_with_tickets(edgeterm, [echo.addr], run="run-y", key_files=files)
    for sv in (x, y):
        t = sv.status()["tickets"]
        assert (t["source"], t["keys"], t["rotate_every"]) == ("files", 2, None), t
    contexts = {"1.3": client(ca, TLS13), "1.2": client(ca, TLS12)}

    # a ticket from one resumes on the other, both ways, under the first file's key
    from_x = {v: first_session(x.port, c) for v, c in contexts.items()}
    from_y = {v: first_session(y.port, c) for v, c in contexts.items()}
    for v, c in contexts.items():
        assert all(resumes(y.port, c, from_x[v]) for _ in range(5)), f"TLS {v}: x -> y"
        assert all(resumes(x.port, c, from_y[v]) for _ in range(5)), f"TLS {v}: y -> x"
    assert s_client_session(x.port, ca, tmp_path / "x-a.pem") == key_a[:16]

    # a fleet-wide rotation: a new first key, the old first key second; SIGHUP on every host
    write_key(first, key_n)
    write_key(second, key_a)
    for sv in (x, y):
        st = sighup_and_wait(sv)
        assert st["tickets"]["source"] == "files"
    for v, c in contexts.items():
        for sv in (x, y):  # tickets under the old first key still resume everywhere
            assert resumes(sv.port, c, from_x[v]), f"TLS {v} on {sv.port}: key A (now second)"
    # the new key encrypts: a new ticket, and the ticket a resumed client gets
    assert s_client_session(x.port, ca, tmp_path / "x-n.pem") == key_n[:16]
    renewed = tmp_path / "x-renewed.pem"
    assert s_client_session(x.port, ca, renewed, sess_in=tmp_path / "x-a.pem") == key_n[:16]
    assert s_client_session(y.port, ca, tmp_path / "y-n.pem") == key_n[:16]
    after = {v: first_session(x.port, c) for v, c in contexts.items()}
    for v, c in contexts.items():
        assert resumes(y.port, c, after[v]), f"TLS {v}: a ticket under key N, x -> y"

    # a malformed key file: the reload is refused, nothing changes, the old keys keep working
    write_key(first, os.urandom(79))
    before = x.status()
    r = reload_cli(x)
    assert r.returncode != 0, (r.stdout, r.stderr)
    message = r.stdout + r.stderr
    assert str(first) in message, message
    assert "tls.tickets.key_files" in message, message
    assert "79 bytes" in message, message
    st = x.status()
    assert st["generation"] == before["generation"]
    assert st["tickets"]["rotations"] == before["tickets"]["rotations"]
    assert st["reloads"]["failed"] == 1
    for v, c in contexts.items():
        assert resumes(x.port, c, after[v]), f"TLS {v}: key N after the failed reload"
        assert resumes(x.port, c, from_x[v]), f"TLS {v}: key A after the failed reload"
        assert resumes(y.port, c, first_session(x.port, c)), f"TLS {v}: x still encrypts with N"


def test_start_refuses_a_malformed_key_file(
    edgeterm: EdgetermFactory, echo: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "short.key"
    bad.write_bytes(os.urandom(79))
    cfg, pidfile, _ = supervised_config(edgeterm, [echo.addr])
    cfg["listeners"][0]["bind"] = f"{HOST}:{free_port()}"
    cfg["tls"]["tickets"]["key_files"] = [str(bad)]
    config = write_config(edgeterm.directory / "bad-key.toml", cfg)
    r = run_cli("start", "--foreground", "-c", str(config), timeout=30)
    assert r.returncode == EXIT_CONFIG, (r.returncode, r.stdout, r.stderr)
    assert "tls.tickets.key_files" in r.stderr and str(bad) in r.stderr, r.stderr
    assert not pidfile.exists()


def test_turning_tickets_on_with_a_malformed_key_file_is_refused(
    edgeterm: EdgetermFactory, echo: Any, ca: Path, tmp_path: Path
) -> None:
    sv = start_with_tickets(edgeterm, [echo.addr], enabled=False)
    key_file = tmp_path / "fleet.key"
    key_file.write_bytes(os.urandom(79))
    cfg = deep_merge(sv.cfg, {"tls": {"tickets": {"enabled": True, "key_files": [str(key_file)]}}})
    write_config(sv.config, cfg)
    r = reload_cli(sv)
    assert r.returncode != 0, (r.stdout, r.stderr)
    refused = r.stdout + r.stderr
    st = sv.status()
    assert st["generation"] == 1 and st["tickets"] == {"enabled": False}

    write_key(key_file, os.urandom(80))
    r = reload_cli(sv)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    t = sv.status()["tickets"]
    assert (t["enabled"], t["source"], t["keys"]) == (True, "files", 1), t
    ctx = client(ca, TLS13)
    assert resumes(sv.port, ctx, first_session(sv.port, ctx))
    # the refusal names the file and the setting, as it does when tickets were already on
    assert str(key_file) in refused and "tls.tickets.key_files" in refused, refused


# --- settings -----------------------------------------------------------------------------------


def test_tickets_disabled_means_no_resumption_by_ticket(
    edgeterm: EdgetermFactory, echo: Any, ca: Path
) -> None:
    sv = start_with_tickets(edgeterm, [echo.addr], workers=1, enabled=False)
    assert sv.status()["tickets"] == {"enabled": False}
    ctx13 = client(ca, TLS13)
    reused, session = exchange(sv.port, ctx13)
    assert not reused and not session.has_ticket
    assert not any(resumes(sv.port, ctx13, session) for _ in range(5))
    # TLS 1.2: no ticket either (a Session-ID may still resume on the same worker)
    _, session12 = exchange(sv.port, client(ca, TLS12))
    assert not session12.has_ticket


def count_new_session_tickets(port: int, ctx: ssl.SSLContext) -> tuple[int, ssl.SSLSession]:
    seen: list[int] = []

    def on_message(
        _conn: Any, direction: str, _version: Any, content_type: Any, msg_type: Any, _data: Any
    ) -> None:
        if direction == "read" and content_type == HANDSHAKE and msg_type == NEW_SESSION_TICKET:
            seen.append(1)

    ctx._msg_callback = on_message  # type: ignore[attr-defined]
    try:
        reused, session = exchange(port, ctx)
    finally:
        ctx._msg_callback = None  # type: ignore[attr-defined]
    assert not reused
    return len(seen), session


@pytest.mark.parametrize("count", [0, 1, None], ids=["count=0", "count=1", "default"])
def test_count_sets_the_tls13_tickets_per_full_handshake(
    edgeterm: EdgetermFactory, echo: Any, ca: Path, count: int | None
) -> None:
    settings: dict[str, Any] = {} if count is None else {"count": count}
    sv = start_with_tickets(edgeterm, [echo.addr], workers=1, **settings)
    ctx = client(ca, TLS13)
    got, session = count_new_session_tickets(sv.port, ctx)
    expected = 2 if count is None else count
    assert got == expected
    assert resumes(sv.port, ctx, session) is (expected > 0)


def test_tls12_session_id_resumes_only_on_the_issuing_worker(
    edgeterm: EdgetermFactory, echo: Any, ca: Path
) -> None:
    # A TLS 1.2 client without ticket support: OpenSSL's session cache is per process.
    sv = start_with_tickets(edgeterm, [echo.addr])
    ctx = client(ca, TLS12)
    ctx.options |= ssl.OP_NO_TICKET
    reused, session = exchange(sv.port, ctx)
    assert not reused and not session.has_ticket
    outcomes = [resumes(sv.port, ctx, session) for _ in range(40)]  # none fails
    st = wait_status(
        sv.admin_socket,
        lambda st: sum(w["handshakes"] for w in serving_workers(st)) == 41,
        timeout=10,
        what="41 handshakes in the counters",
    )
    by_worker = resumed_by_worker(st)
    handshakes = [w["handshakes"] for w in serving_workers(st)]
    assert all(handshakes), f"both workers should take connections: {handshakes}"
    assert 0 < outcomes.count(True) < 40, outcomes
    assert sorted(by_worker.values())[0] == 0, f"only the issuing worker resumes: {by_worker}"


# --- the rotation timer -------------------------------------------------------------------------


def test_the_timer_rotates_the_keys(edgeterm: EdgetermFactory, echo: Any) -> None:
    sv = start_with_tickets(edgeterm, [echo.addr], rotate_every=2.0)
    start = sv.status()["tickets"]
    assert start["rotate_every"] == 2.0
    rotated = wait_status(
        sv.admin_socket,
        lambda st: st["tickets"]["rotations"] > start["rotations"],
        timeout=6,
        what="a timer rotation",
    )["tickets"]
    assert rotated["current_key_age"] < 1.0, rotated  # observed within a poll of the rotation
    assert rotated["keys"] == 3
    again = wait_status(
        sv.admin_socket,
        lambda st: st["tickets"]["rotations"] > rotated["rotations"],
        timeout=6,
        what="another timer rotation",
    )["tickets"]
    assert again["current_key_age"] < 1.0, again
    assert sv.status()["generation"] == 1  # a rotation is not a reload
