"""Which edgeterm is measured: the live work tree, or a frozen snapshot of a git ref.

Other people edit the work tree while a benchmark runs; a snapshot (``--edgeterm-src HEAD``)
makes a run measure one commit from start to end. The snapshot is exported with the read-only
``git archive`` and laid out as the installed package (``workers/`` and ``supervisor/`` become
``edgeterm.workers`` and ``edgeterm.supervisor``, the pyproject ``package-dir`` mapping), then
put first on edgeterm's ``PYTHONPATH``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from loadtest.errors import LoadtestError

REPO = Path(__file__).resolve().parent.parent
WORKTREE = "worktree"


@dataclass(frozen=True, slots=True)
class Source:
    label: str  # "worktree" or the commit measured
    pythonpath: Path | None  # None: the installed (editable) package, i.e. the work tree


def snapshot(ref: str, directory: Path) -> Source:
    """Export ``ref`` into ``directory`` laid out as the installed package."""
    if ref == WORKTREE:
        return Source(label=WORKTREE, pythonpath=None)
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--short", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if rev.returncode != 0:
        raise LoadtestError(f"--edgeterm-src {ref}: not a commit ({rev.stderr.strip()})")
    commit = rev.stdout.strip()
    archive = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "archive",
            "--format=tar",
            commit,
            "edgeterm",
            "workers",
            "supervisor",
        ],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise LoadtestError(f"git archive {commit} failed: {archive.stderr.decode().strip()}")
    raw = directory / "raw"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(raw, filter="data")
    pkg = directory / "pkg"
    shutil.copytree(raw / "edgeterm", pkg / "edgeterm")
    shutil.copytree(raw / "workers", pkg / "edgeterm" / "workers")
    shutil.copytree(raw / "supervisor", pkg / "edgeterm" / "supervisor")
    return Source(label=commit, pythonpath=pkg)
