"""The service's resident memory (RSS), as the kernel counts it: sampled for the periodic log and reports.

Read from /proc/self/status (Linux; elsewhere there is nothing to read and the figures are None), split
as the kernel splits it: anonymous memory (the Python heap, numpy arrays, the model's weights and
onnxruntime's arenas), file-backed pages (the code of Python and the libraries, memory-mapped files) and
shared memory (segments mapped from another process, such as the simulated cameras' ring). Reading it
costs a few tens of microseconds; the service samples it once a second on its loop. What takes the
memory, and the budget: docs/memory.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
_FIELDS = {"VmRSS": "total", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


@dataclass(frozen=True, slots=True)
class Rss:
    """Resident memory in MB (2**20 bytes): the total and the kernel's three parts of it."""

    total: float
    anon: float
    file: float
    shmem: float


def parse_status(text: str) -> Rss | None:
    """The RSS figures of a /proc/<pid>/status text; None if it has no VmRSS line."""
    got: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _FIELDS:
            got[_FIELDS[key]] = int(value.split()[0]) / 1024  # kB
    if "total" not in got:
        return None
    return Rss(got["total"], got.get("anon", 0.0), got.get("file", 0.0), got.get("shmem", 0.0))


def read_rss(path: Path = STATUS) -> Rss | None:
    """This process's RSS now; None where /proc is not there to tell."""
    try:
        return parse_status(path.read_text())
    except OSError:
        return None


class RssWatch:
    """The RSS at the first sample, the highest and the latest one."""

    def __init__(self, read: Callable[[], Rss | None] = read_rss) -> None:
        self._read = read
        self.first: Rss | None = None
        self.peak: Rss | None = None
        self.last: Rss | None = None

    def sample(self) -> Rss | None:
        rss = self._read()
        if rss is not None:
            if self.first is None:
                self.first = rss
            if self.peak is None or rss.total > self.peak.total:
                self.peak = rss
            self.last = rss
        return rss

    def summary(self) -> dict[str, Any] | None:
        """{start, peak, end} of the total in MB, and the parts of the peak; None without a sample."""
        if self.first is None or self.peak is None or self.last is None:
            return None
        return {
            "start": round(self.first.total, 1),
            "peak": round(self.peak.total, 1),
            "end": round(self.last.total, 1),
            "peak_anon": round(self.peak.anon, 1),
            "peak_file": round(self.peak.file, 1),
            "peak_shmem": round(self.peak.shmem, 1),
        }
