"""The certificates of the TLS tests: one CA and three leaves, made with ``edgeterm.selfsigned``.

- ``localhost``: the default (first in the config), names ``localhost``;
- ``example.com``: an exact name;
- ``wildcard``: ``*.example.org``.

This module is the one place that knows the ``edgeterm.selfsigned`` API.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path

    def der(self) -> bytes:
        """The leaf certificate in DER, to compare with ``getpeercert(binary_form=True)``."""
        pem = self.cert.read_text()
        first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
        return ssl.PEM_cert_to_DER_cert(first)


@dataclass(frozen=True)
class CertSet:
    directory: Path
    ca: Path
    leaves: dict[str, CertFiles] = field(default_factory=dict)

    @property
    def default(self) -> CertFiles:
        return self.leaves["localhost"]

    def config_entries(self) -> list[dict[str, str]]:
        """``[[tls.certificates]]`` entries, the default first."""
        order = ["localhost", "example.com", "wildcard"]
        return [{"cert": str(self.leaves[n].cert), "key": str(self.leaves[n].key)} for n in order]


def make_cert_set(directory: Path) -> CertSet:
    from edgeterm import selfsigned

    directory.mkdir(parents=True, exist_ok=True)
    made = {"localhost": selfsigned.generate(directory, ("localhost",), basename="localhost")}
    ca = selfsigned.load_ca(directory)
    made["example.com"] = selfsigned.generate(
        directory, ("example.com",), basename="example.com", ca=ca
    )
    made["wildcard"] = selfsigned.generate(
        directory, ("*.example.org",), basename="wildcard", ca=ca
    )
    leaves = {name: CertFiles(g.cert_path, g.key_path) for name, g in made.items()}
    return CertSet(directory=directory, ca=made["localhost"].ca_cert_path, leaves=leaves)
