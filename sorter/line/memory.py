"""The service's resident memory (RSS), as the kernel counts it: sampled for the periodic log and reports.

Read from /proc/self/status (Linux; elsewhere there is nothing to read and the figures are None), split
as the kernel splits it: anonymous memory (the Python heap, numpy arrays, the model's weights and
onnxruntime's arenas), file-backed pages (the code of Python and the libraries, memory-mapped files) and
shared memory (segments mapped from another process, such as the simulated cameras' ring). Reading it
costs a few tens of microseconds; the service samples it once a second on its loop. What takes the
memory, and the budget: docs/memory.md.

Freed camera frames (2.7 MB each) go back to the C allocator's heaps, not to the kernel: glibc keeps them
for the next frames, so after a moment when many frames were alive at once (a busy computer filling the
capture queues) the RSS would stay at that high-water mark for good (measured: +90 MB after one such
moment). Where the heap has grown by `TRIM_SLACK_MB` since it was last trimmed, the service asks glibc to
return its free pages (`malloc_trim`, 1-12 ms off the loop, measured); elsewhere (musl, macOS) nothing is
trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
TRIM_SLACK_MB = 48.0  # anonymous memory grown by this since the last trim (about 18 frames): trim the heap
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


def glibc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0): give the heaps' free pages back to the kernel. None without glibc."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


class RssWatch:
    """The RSS at the first sample, the highest and the latest one; when to trim the C heap."""

    def __init__(
        self,
        read: Callable[[], Rss | None] = read_rss,
        trim: Callable[[], object] | None = None,
        slack_mb: float = TRIM_SLACK_MB,
    ) -> None:
        self._read = read
        self._trim = trim
        self.slack_mb = slack_mb
        self.first: Rss | None = None
        self.peak: Rss | None = None
        self.last: Rss | None = None
        self._floor: float | None = None  # anonymous MB after the last trim (the lowest seen since)
        self.trims = 0
        self.trimmed_mb = 0.0  # RSS given back by the trims, in all

    def sample(self) -> Rss | None:
        rss = self._read()
        if rss is not None:
            if self.first is None:
                self.first = rss
            if self.peak is None or rss.total > self.peak.total:
                self.peak = rss
            self.last = rss
            if self._floor is None or rss.anon < self._floor:
                self._floor = rss.anon
        return rss

    @property
    def trim_due(self) -> bool:
        """The heap has grown by `slack_mb` since it was last trimmed (and there is a trim to call)."""
        return (
            self._trim is not None
            and self.last is not None
            and self._floor is not None
            and self.last.anon - self._floor > self.slack_mb
        )

    def trim(self) -> None:
        """Trim the C heap and take the RSS after it as the new floor (off the service's loop: 1-12 ms)."""
        if self._trim is None:
            return
        before = self.last
        self._trim()
        self.trims += 1
        self._floor = None
        after = self.sample()
        if before is not None and after is not None:
            self.trimmed_mb += max(0.0, before.total - after.total)

    def summary(self) -> dict[str, Any] | None:
        """{start, peak, end} of the total in MB, the parts of the peak, the heap trims and the MB they gave
        back; None without a sample."""
        if self.first is None or self.peak is None or self.last is None:
            return None
        return {
            "start": round(self.first.total, 1),
            "peak": round(self.peak.total, 1),
            "end": round(self.last.total, 1),
            "peak_anon": round(self.peak.anon, 1),
            "peak_file": round(self.peak.file, 1),
            "peak_shmem": round(self.peak.shmem, 1),
            "trims": self.trims,
            "trimmed": round(self.trimmed_mb, 1),
        }
