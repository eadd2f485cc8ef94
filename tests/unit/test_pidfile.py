import os
import subprocess
import sys

from edgeterm.supervisor import pidfile


def test_write_read_remove(tmp_path):
    path = tmp_path / "run" / "x.pid"
    pidfile.write(path, os.getpid())
    assert pidfile.read_pid(path) == os.getpid()
    assert not list(path.parent.glob(".*tmp"))  # atomic: no temp file left behind
    pidfile.remove(path, os.getpid() + 1)  # someone else's pid: left alone
    assert path.exists()
    pidfile.remove(path, os.getpid())
    assert not path.exists()


def test_stale_and_garbage_pidfiles_read_as_not_running(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = tmp_path / "x.pid"
    path.write_text(f"{proc.pid}\n")
    assert pidfile.read_pid(path) is None
    path.write_text("not a pid")
    assert pidfile.read_pid(path) is None
    assert pidfile.read_pid(tmp_path / "missing.pid") is None
