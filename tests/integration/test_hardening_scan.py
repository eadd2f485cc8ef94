"""A TLS scanner finds edgeterm's policy clean (sslyze, with Mozilla's TLS profiles).

- default config (``ciphers = "intermediate"``), ECDSA and RSA certificates: compliant with
  Mozilla "intermediate"; no Heartbleed, ROBOT, CCS injection, insecure or client-initiated
  renegotiation, compression; TLS_FALLBACK_SCSV honoured; extended master secret; session
  tickets resume (TLS 1.2 tickets through sslyze's resumption scan);
- ``ciphers = "modern"``: TLS 1.3 only, compliant with Mozilla "modern" (given a certificate
  of at most 90 days, which that profile asks for).

sslyze (PyPI) is a test dependency; without it the module is skipped and says why.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

sslyze = pytest.importorskip(
    "sslyze", reason="sslyze is not installed (pip install sslyze): the TLS scan cannot run"
)
from sslyze.mozilla_tls_profile.tls_config_checker import (  # noqa: E402
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

from edgeterm import selfsigned  # noqa: E402
from tests.support.certs import CertSet  # noqa: E402

pytestmark = pytest.mark.timeout(90)

VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3")


@pytest.fixture(scope="module")
def scan_certs(tmp_path_factory: pytest.TempPathFactory, certs: CertSet) -> dict[str, Any]:
    """Leaves from the session CA: RSA-2048 (intermediate) and a 90-day ECDSA one (modern)."""
    directory = tmp_path_factory.mktemp("scan-certs")
    ca = selfsigned.load_ca(certs.directory)
    rsa = selfsigned.generate(directory, ("localhost",), basename="rsa", key_type="rsa-2048", ca=ca)
    short = selfsigned.generate(directory, ("localhost",), basename="short", days=89, ca=ca)
    return {
        "rsa": [{"cert": str(rsa.cert_path), "key": str(rsa.key_path)}],
        "short": [{"cert": str(short.cert_path), "key": str(short.key_path)}],
    }


def scan(port: int, ca: Path) -> Any:
    """One sslyze scan of 127.0.0.1:port (SNI localhost) with every command the Mozilla
    checker needs, plus session resumption."""
    location = sslyze.ServerNetworkLocation("localhost", port, ip_address="127.0.0.1")
    request = sslyze.ServerScanRequest(
        server_location=location,
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER
        | {sslyze.ScanCommand.SESSION_RESUMPTION},
        scan_commands_extra_arguments=sslyze.ScanCommandsExtraArguments(
            certificate_info=sslyze.CertificateInfoExtraArgument(custom_ca_file=ca)
        ),
    )
    scanner = sslyze.Scanner()
    with warnings.catch_warnings():
        # sslyze's bundled trust stores hold roots that newer cryptography warns about
        warnings.simplefilter("ignore")
        scanner.queue_scans([request])
        (result,) = list(scanner.get_results())
    assert result.scan_status == sslyze.ServerScanStatusEnum.COMPLETED, (
        result.connectivity_error_trace
    )
    return result


def completed(result: Any, name: str) -> Any:
    attempt = getattr(result.scan_result, name)
    assert attempt.status == sslyze.ScanCommandAttemptStatusEnum.COMPLETED, (
        name,
        attempt.error_reason,
        attempt.error_trace and "".join(attempt.error_trace.format()),
    )
    return attempt.result


def accepted_versions(result: Any) -> set[str]:
    return {v for v in VERSIONS if completed(result, f"{v}_cipher_suites").accepted_cipher_suites}


def assert_compliant(result: Any, profile: TlsConfigurationEnum) -> None:
    try:
        check_server_against_tls_configuration(result, MozillaTlsConfiguration.get(profile))
    except ServerNotCompliantWithTlsConfiguration as exc:
        pytest.fail(f"not Mozilla {profile.value}: {exc.issues}")


def assert_no_vulnerability(result: Any) -> None:
    assert not completed(result, "heartbleed").is_vulnerable_to_heartbleed
    assert not completed(result, "openssl_ccs_injection").is_vulnerable_to_ccs_injection
    robot = completed(result, "robot").robot_result
    assert robot in (
        sslyze.RobotScanResultEnum.NOT_VULNERABLE_NO_ORACLE,
        sslyze.RobotScanResultEnum.NOT_VULNERABLE_RSA_NOT_SUPPORTED,
    ), robot
    assert not completed(result, "tls_compression").supports_compression
    reneg = completed(result, "session_renegotiation")
    assert reneg.supports_secure_renegotiation
    assert not reneg.is_vulnerable_to_client_renegotiation_dos
    assert reneg.client_renegotiations_success_count == 0
    assert completed(result, "tls_extended_master_secret").supports_ems_extension


@pytest.mark.parametrize("cert", ["ecdsa", "rsa"])
def test_default_policy_is_mozilla_intermediate_and_scanner_clean(
    edgeterm, echo, ca, scan_certs, cert
):
    overrides: dict[str, Any] = {}
    if cert == "rsa":
        overrides["tls"] = {"certificates": scan_certs["rsa"]}
    server = edgeterm.start([echo.addr], **overrides)
    result = scan(server.port(), ca)

    assert_compliant(result, TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    assert_no_vulnerability(result)
    assert accepted_versions(result) == {"tls_1_2", "tls_1_3"}
    assert completed(result, "tls_fallback_scsv").supports_fallback_scsv
    resumption = completed(result, "session_resumption")
    assert (
        resumption.tls_ticket_resumption_result == sslyze.TlsResumptionSupportEnum.FULLY_SUPPORTED
    )
    assert (
        resumption.tls_ticket_successful_resumptions_count
        == resumption.tls_ticket_attempted_resumptions_count
        > 0
    )
    # the server is unharmed by the scan (its renegotiation, ROBOT, Heartbleed probes...)
    assert server.running()
    echo_round_trip(server.port(), ca)


def test_modern_is_tls13_only_and_mozilla_modern(edgeterm, echo, ca, scan_certs):
    server = edgeterm.start(
        [echo.addr], tls={"ciphers": "modern", "certificates": scan_certs["short"]}
    )
    result = scan(server.port(), ca)

    assert accepted_versions(result) == {"tls_1_3"}
    assert_compliant(result, TlsConfigurationEnum.MOZILLA_MODERN)
    assert_no_vulnerability(result)
    assert server.running()
    echo_round_trip(server.port(), ca)


def echo_round_trip(port: int, ca: Path) -> None:
    from tests.support.supervision import echo_once
    from tests.support.tlsclient import client_context

    echo_once(port, client_context(ca), b"after the scan")
