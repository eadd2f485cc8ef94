"""Compile the C client and upstream with the system ``cc`` at run time, once per source version.

Binaries go to ``loadtest/results/bin/`` (git-ignored), named by a hash of the source and the
flags, so an edited source is rebuilt and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from loadtest.errors import MissingPrerequisite

HERE = Path(__file__).resolve().parent
BIN_DIR = HERE.parent / "results" / "bin"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")

# program name -> (source file, libraries)
PROGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tlsload": ("tlsload.c", ("-lssl", "-lcrypto")),
    "upstream": ("upstream.c", ()),
}


def compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MissingPrerequisite("no C compiler (cc) found: apt-get install gcc libc6-dev")
    return cc


def check_openssl_headers(cc: str) -> None:
    """Fail with the apt package to install when the OpenSSL headers or libraries are missing."""
    probe = "#include <openssl/ssl.h>\nint main(void){return SSL_CTX_new(TLS_method())==0;}\n"
    result = subprocess.run(
        [cc, "-x", "c", "-", "-o", "/dev/null", "-lssl", "-lcrypto"],
        input=probe,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise MissingPrerequisite(
            "cannot build against OpenSSL (openssl/ssl.h or libssl missing): "
            "apt-get install libssl-dev\n" + result.stderr.strip()
        )


def build(name: str) -> Path:
    """The path of the compiled ``name`` (``tlsload`` or ``upstream``), building it if needed."""
    source_name, libs = PROGRAMS[name]
    source = HERE / source_name
    cc = compiler()
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS + libs).encode()).hexdigest()
    target = BIN_DIR / f"{name}-{digest[:12]}"
    if target.exists():
        return target
    if libs:
        check_openssl_headers(cc)
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    result = subprocess.run(
        [cc, *CFLAGS, "-o", str(tmp), str(source), *libs],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise MissingPrerequisite(f"building {source} failed:\n{result.stderr.strip()}")
    tmp.rename(target)
    return target


def build_all() -> dict[str, Path]:
    return {name: build(name) for name in PROGRAMS}
