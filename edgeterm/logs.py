"""Process logging: one line per event, to stderr or a log file (reopened on SIGUSR1).

Never called on the data path: workers log lifecycle events only. The file in use is
remembered here (workers inherit it across fork), so ``reopen()`` needs no argument and also
re-points a daemon's stdout/stderr at the new file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s edgeterm[%(process)d] %(levelname)s %(name)s: %(message)s"

_current: Path | None = None
_stdio_to_file = False


def setup(log_file: Path | None, level: int = logging.INFO, *, stdio: bool = False) -> None:
    """Send edgeterm's log records to ``log_file`` (None: stderr), replacing earlier handlers.

    ``stdio=True`` (daemons): stdout and stderr point at the file too, and follow it on reopen.
    """
    global _current, _stdio_to_file
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
        if stdio:
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _current = log_file
    _stdio_to_file = stdio and log_file is not None


def reopen() -> None:
    """Reopen the log file after logrotate moved it (SIGUSR1)."""
    if _current is not None:
        setup(_current, logging.getLogger("edgeterm").level, stdio=_stdio_to_file)
