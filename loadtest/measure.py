"""What a terminator costs, read from /proc: CPU seconds and PSS of a whole process tree.

CPU: for every live process in the tree, utime + stime + cutime + cstime. A child that was
reaped is in its parent's cutime/cstime and a live child is not, so the sum counts every
process once, including workers that died (reload, kill) between two readings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    ticks: int  # utime + stime + cutime + cstime
    starttime: int  # clock ticks after boot: with pid, identifies the process


def _read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    head, _, tail = data.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    # fields[0] is state (field 3); utime is field 14, i.e. fields[11]
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ProcStat(pid=pid, ppid=ppid, comm=comm, ticks=ticks, starttime=int(fields[19]))


def _all_stats() -> dict[int, ProcStat]:
    out: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                out[st.pid] = st
    return out


def tree(root: int) -> list[ProcStat]:
    """The live processes of the tree rooted at ``root`` (the root first)."""
    stats = _all_stats()
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    found: list[ProcStat] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        found.append(stats[pid])
        todo.extend(children.get(pid, ()))
    return found


def same_process(st: ProcStat) -> bool:
    """True while the process ``st`` describes is still alive (its PID not reused)."""
    now = _read_stat(st.pid)
    return now is not None and now.starttime == st.starttime


def tree_pids(root: int) -> list[int]:
    return [st.pid for st in tree(root)]


def cpu_seconds(root: int) -> float:
    """CPU seconds used so far by the tree rooted at ``root``, reaped children included."""
    return sum(st.ticks for st in tree(root)) / CLK_TCK


def pss_kib(pids: list[int]) -> int:
    """The summed proportional set size (KiB) of ``pids``, from /proc/PID/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def tree_pss_kib(root: int) -> int:
    return pss_kib(tree_pids(root))
