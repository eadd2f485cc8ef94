"""Process logging: one line per event, to stderr or ``server.log_file`` (reopened on SIGUSR1).

Never called on the data path: workers log lifecycle events only.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s edgeterm[%(process)d] %(levelname)s %(name)s: %(message)s"


def setup(log_file: Path | None, level: int = logging.INFO) -> None:
    """Send edgeterm's log records to ``log_file`` (None: stderr), replacing earlier handlers."""
    root = logging.getLogger("edgeterm")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(log_file.parent, exist_ok=True)
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def reopen(log_file: Path | None) -> None:
    """Reopen the log file after logrotate moved it (SIGUSR1)."""
    if log_file is not None:
        setup(log_file, logging.getLogger("edgeterm").level)
