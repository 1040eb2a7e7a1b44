"""The computer's CPU time over a run (Linux `/proc/stat`): how much of the machine the run had.

A virtual machine's host can take CPU time from it ("steal": the hypervisor ran another guest), which no
process inside sees as its own, so a latency measured then was measured on a busier computer than the
processes show. The demo's report gives the shares of the machine's CPU time that were stolen, busy and
idle while it fed, beside its latencies.
"""

from __future__ import annotations

import os
from pathlib import Path

# the first eight columns of /proc/stat's `cpu` line (guest time is counted in `user` already)
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks(stat: Path = Path("/proc/stat")) -> dict[str, int] | None:
    """All cores' CPU time so far, in clock ticks, by kind; None where the OS does not say."""
    try:
        first = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 1 + len(FIELDS):
        return None
    return dict(zip(FIELDS, (int(v) for v in first[1 : 1 + len(FIELDS)]), strict=True))


def cpu_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float] | None:
    """The machine's CPU time between two `cpu_ticks`: shares stolen, busy (this and every other process)
    and idle, and the seconds stolen (summed over cores)."""
    if before is None or after is None:
        return None
    spent = {k: after[k] - before[k] for k in FIELDS}
    total = sum(spent.values())
    if total <= 0:
        return None
    idle = spent["idle"] + spent["iowait"]
    return {
        "cores": float(os.cpu_count() or 0),
        "steal_share": round(spent["steal"] / total, 4),
        "busy_share": round((total - idle - spent["steal"]) / total, 4),
        "idle_share": round(idle / total, 4),
        "steal_s": round(spent["steal"] / os.sysconf("SC_CLK_TCK"), 1),
    }
