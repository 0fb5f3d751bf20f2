"""CPU seconds and peak RSS of a process and all its descendants, from /proc.

A component may fork (the filter runs a process pool), so every figure is summed over
the whole process tree. CPU time of children that already exited and were waited for
is in their parent's cutime/cstime, so nothing is missed when a worker is replaced.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None  # the process has gone
    return raw[raw.rindex(b")") + 2 :].decode().split()


def ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process visible now."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    return parents


def tree(pid: int) -> list[int]:
    """pid and all its living descendants."""
    children: dict[int, list[int]] = {}
    for child, parent in ppid_map().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, plus that of its exited, waited-for children."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def hwm_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of one process, 0 when it has gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size now: shared pages split between the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Usage:
    cpu_s: float  # CPU seconds of the tree since it started
    rss_peak: int  # largest VmHWM of a single process of the tree (bytes)
    rss_peak_tree: int  # sum of every process's VmHWM (bytes): an upper bound for the tree
    pss_peak_tree: int  # largest sampled sum of the tree's PSS (bytes): its real footprint
    processes: int  # processes seen in the tree


class ProcTree:
    """Watches a process tree: a thread samples peak RSS and PSS while the tree runs.

    cpu() reads the CPU seconds now; usage() gives the figures so far. Peaks of
    processes that exit between samples are kept (VmHWM is the lifetime peak); the PSS
    peak is sampled (every interval), so a short spike between samples can be missed.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self._hwm: dict[int, int] = {}
        self._pss_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"proctree-{pid}", daemon=True)

    def __enter__(self) -> ProcTree:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        pids = tree(self.pid)
        pss = sum(pss_bytes(p) for p in pids)
        with self._lock:
            self._pss_peak = max(self._pss_peak, pss)
            for p in pids:
                h = hwm_bytes(p)
                if h:
                    self._hwm[p] = max(self._hwm.get(p, 0), h)

    def cpu(self) -> float:
        """CPU seconds of the living tree (exited children count through their parent)."""
        return sum(cpu_seconds(p) for p in tree(self.pid))

    def usage(self) -> Usage:
        self.sample()
        with self._lock:
            peaks = list(self._hwm.values())
            pss_peak = self._pss_peak
        return Usage(
            cpu_s=self.cpu(),
            rss_peak=max(peaks, default=0),
            rss_peak_tree=sum(peaks),
            pss_peak_tree=pss_peak,
            processes=len(peaks),
        )
