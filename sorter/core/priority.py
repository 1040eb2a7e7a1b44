"""The OS scheduling priority of the line's time-critical threads (Linux).

On a computer that does other work, the threads that keep pace with the belt — the event loop (PLC
polling, frame headers, planning), the frame copies and grabs, segmentation and inference, the Hall
bar's reader — must get a core as soon as they need one, or frames are lost and valves fire late.
Niceness cannot promise that (Linux shares the CPU between sessions first: `sched_autogroup`); a
real-time policy (SCHED_RR / SCHED_FIFO) runs before every ordinary process whatever its niceness.
It needs root or CAP_SYS_NICE (systemd: `AmbientCapabilities=CAP_SYS_NICE`, deploy/README.md);
without it the threads stay at normal priority and the service says so once at start.

A Linux thread's policy is its own, so each time-critical thread calls `enter()` when it starts.
SCHED_RESET_ON_FORK keeps the policy from leaking into what those threads start: helper threads for
a blocking call, the OPC UA server's process, a browser or a script a test launches. The kernel
keeps 5 % of each second for ordinary processes (`sched_rt_runtime_us`), so a runaway real-time
thread slows the computer down but cannot lock it up.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Literal

Policy = Literal["rr", "fifo", "normal"]
_POLICIES = {"rr": "SCHED_RR", "fifo": "SCHED_FIFO"}


@dataclass(frozen=True)
class Priority:
    """What time-critical threads ask for; `normal` leaves them at the OS default."""

    policy: Policy = "rr"
    rt_priority: int = 20  # 1-99; the kernel's own threads and IRQ threads sit at 50


_lock = threading.Lock()
_wanted = Priority(policy="normal")
_refused: str | None = None  # why the OS refused, once: every later thread is not asked again


def configure(wanted: Priority) -> None:
    """What `enter()` gives from now on (the service sets it from its config at start)."""
    global _wanted, _refused
    with _lock:
        _wanted, _refused = wanted, None


def enter(*, inherited: bool = False, rt_priority: int | None = None) -> str:
    """Give the calling thread the configured priority; returns what it got, e.g. 'SCHED_RR 20' or
    'normal (SCHED_RR refused: ...)'. Never raises: a thread at normal priority still works.
    `inherited`: the threads this one starts get it too (a process that is time-critical as a whole and
    starts no other program: the simulator, which stands in for the plant's hardware).
    `rt_priority`: another real-time level than the configured one, under the same policy."""
    global _refused
    with _lock:
        wanted, refused = _wanted, _refused
    if wanted.policy == "normal":
        return "normal"
    name = _POLICIES[wanted.policy]
    if refused is not None:
        return f"normal ({name} refused: {refused})"
    policy = getattr(os, name, None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return _refuse(name, "not available on this OS")
    level = wanted.rt_priority if rt_priority is None else rt_priority
    try:
        flags = 0 if inherited else os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy | flags, os.sched_param(level))
    except PermissionError:
        return _refuse(name, "no permission: run as root or with CAP_SYS_NICE (deploy/README.md)")
    except OSError as exc:
        return _refuse(name, str(exc))
    return f"{name} {level}"


def leave() -> None:
    """Back to the OS default for the calling thread (a loop thread that outlives the service: tests)."""
    if hasattr(os, "sched_setscheduler"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _refuse(name: str, why: str) -> str:
    global _refused
    with _lock:
        _refused = why
    return f"normal ({name} refused: {why})"
