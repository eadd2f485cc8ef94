"""Routes (issue 7): SNI (exact, wildcard) and ALPN choose the pool, the SNI callback the
certificate; unknown names get the default certificate and pool, or are refused with the
unrecognized_name alert under ``tls.strict_sni``; route and pool changes apply on reload."""

from __future__ import annotations

import copy
import ssl
from pathlib import Path

import pytest

from tests.support.configs import write_config
from tests.support.launcher import run_cli
from tests.support.routing import NamedUpstream, read_name
from tests.support.supervision import wait_status
from tests.support.tlsclient import client_context, connect_tls

pytestmark = pytest.mark.timeout(90)

ALERT_UNRECOGNIZED_NAME = "TLSV1_UNRECOGNIZED_NAME"


@pytest.fixture
def pools(upstream):
    return {name: upstream(NamedUpstream, name=name) for name in ("main", "ex", "wild", "h2")}


def routed_config(edgeterm, pools, **tls):
    cfg = edgeterm.config([pools["main"].addr])
    cfg["tls"]["alpn"] = ["h2", "http/1.1"]
    cfg["tls"].update(tls)
    for name in ("ex", "wild", "h2"):
        cfg["upstreams"][name] = {"servers": [pools[name].addr]}
    cfg["routes"] = [
        {"sni": "example.com", "upstream": "ex"},
        {"sni": "*.example.org", "upstream": "wild"},
        {"sni": "api.example.org", "alpn": "h2", "upstream": "h2"},
    ]
    return cfg


def visit(port, ctx, sni):
    """(pool name, leaf certificate DER, negotiated ALPN) of one connection."""
    with connect_tls(port, ctx, server_hostname=sni) as s:
        return read_name(s), s.getpeercert(binary_form=True), s.selected_alpn_protocol()


def test_sni_routes_choose_pool_and_certificate(edgeterm, pools, certs, ca):
    server = edgeterm.start(cfg=routed_config(edgeterm, pools))
    port = server.port()
    plain = client_context(ca)  # offers no ALPN
    h2 = client_context(ca, alpn=["h2", "http/1.1"])
    http1 = client_context(ca, alpn=["http/1.1"])
    leaf = {name: certs.leaves[name].der() for name in ("localhost", "example.com", "wildcard")}

    assert visit(port, plain, "example.com") == ("ex", leaf["example.com"], None)
    assert visit(port, plain, "EXAMPLE.COM") == ("ex", leaf["example.com"], None)
    assert visit(port, plain, "a.example.org") == ("wild", leaf["wildcard"], None)
    assert visit(port, plain, "localhost") == ("main", leaf["localhost"], None)
    # one host name, two pools by the negotiated protocol; the certificate stays the wildcard
    assert visit(port, h2, "api.example.org") == ("h2", leaf["wildcard"], "h2")
    assert visit(port, http1, "api.example.org") == ("wild", leaf["wildcard"], "http/1.1")
    assert visit(port, plain, "api.example.org") == ("wild", leaf["wildcard"], None)
    # many connections, every one on its route
    for _ in range(20):
        assert visit(port, h2, "x.example.org")[0] == "wild"
        assert visit(port, h2, "example.com")[0] == "ex"
    assert len(pools["h2"].connections()) == 1
    assert len(pools["ex"].connections()) == 22


def test_unknown_sni_gets_the_default_certificate_and_pool(edgeterm, pools, certs, ca):
    server = edgeterm.start(cfg=routed_config(edgeterm, pools))
    lax = client_context(ca, check_hostname=False)
    name, der, _ = visit(server.port(), lax, "unknown.test")
    assert (name, der) == ("main", certs.leaves["localhost"].der())
    # a wildcard covers one label only: b.a.example.org is unknown
    assert visit(server.port(), lax, "b.a.example.org")[:2] == ("main", der)
    assert visit(server.port(), lax, None)[:2] == ("main", der)  # no SNI at all


def test_strict_sni_refuses_unknown_names_with_unrecognized_name(edgeterm, pools, certs, ca):
    cfg = routed_config(edgeterm, pools, strict_sni=True)
    server = edgeterm.start(cfg=cfg)
    port = server.port()
    lax = client_context(ca, check_hostname=False)
    for sni in ("unknown.test", "b.a.example.org", None):
        with pytest.raises(ssl.SSLError) as info:
            connect_tls(port, lax, server_hostname=sni).close()
        assert ALERT_UNRECOGNIZED_NAME in str(info.value), (sni, info.value)
    # known names are served as before, by route and certificate
    assert visit(port, client_context(ca), "a.example.org")[0] == "wild"
    assert visit(port, client_context(ca), "localhost")[0] == "main"
    assert sum(len(p.connections()) for p in pools.values()) == 2
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"
    wait_status(
        admin,
        lambda st: sum(w["closed_by"].get("unknown_sni", 0) for w in st["workers"]) == 3,
        timeout=5,
        what="three unknown_sni closes counted",
    )


def test_reload_changes_routes_and_pools(edgeterm, pools, ca):
    cfg = routed_config(edgeterm, pools)
    server = edgeterm.start(cfg=cfg)
    port = server.port()
    ctx = client_context(ca)
    assert visit(port, ctx, "example.com")[0] == "ex"
    assert visit(port, ctx, "a.example.org")[0] == "wild"

    new = copy.deepcopy(cfg)
    new["routes"] = [{"sni": ["example.com", "*.example.org"], "upstream": "h2"}]
    new["upstreams"]["h2"] = {"servers": [pools["ex"].addr, pools["wild"].addr]}
    new["upstreams"]["h2"]["balance"] = "round_robin"
    del new["upstreams"]["ex"], new["upstreams"]["wild"]
    write_config(server.config, new)
    r = run_cli("reload", "-c", str(server.config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    seen = [visit(port, ctx, sni)[0] for sni in ("example.com", "a.example.org") * 4]
    assert sorted(seen) == ["ex"] * 4 + ["wild"] * 4  # the new pool spans both servers
    assert visit(port, ctx, "localhost")[0] == "main"
    assert pools["h2"].connections() == []


def test_route_names_without_a_certificate(edgeterm, pools):
    """A warning (they get the default certificate); an error with strict_sni (never served)."""
    cfg = routed_config(edgeterm, pools)
    cfg["routes"].append({"sni": ["nocert.test", "*.nocert.test"], "upstream": "ex"})
    path = write_config(edgeterm.directory / "check.toml", cfg)
    r = run_cli("check-config", "-c", str(path), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "routes[3].sni: no certificate covers nocert.test" in r.stderr
    assert "routes[3].sni: no certificate covers *.nocert.test" in r.stderr
    cfg["tls"]["strict_sni"] = True
    write_config(path, cfg)
    r = run_cli("check-config", "-c", str(path), timeout=60)
    assert r.returncode != 0
    assert "routes[3].sni: no certificate covers nocert.test: tls.strict_sni" in r.stderr
