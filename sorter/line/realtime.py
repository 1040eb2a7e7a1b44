"""The line's time-critical threads at a real-time OS priority for as long as the line runs (sorter/core/priority.py).

A side service of the line like the HMI: started first on the service's loop thread, which it raises
itself; the workers, frame grabs and the Hall bar's reader raise themselves as they start.
"""

from __future__ import annotations

from typing import Any

from sorter.config import PriorityConfig
from sorter.core import priority
from sorter.core.alarms import Condition


class ThreadPriority:
    name = "thread_priority"

    def __init__(self, cfg: PriorityConfig, *, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.got = "not started"

    async def start(self) -> None:
        priority.configure(priority.Priority(self.cfg.policy, self.cfg.rt_priority))
        self.got = priority.enter()
        if self.cfg.policy != "normal" and self.got.startswith("normal"):
            self.log.warning(
                "time-critical threads at normal priority: other work on this computer can cost frames",
                got=self.got,
            )
        else:
            self.log.info("time-critical threads", priority=self.got)

    async def stop(self) -> None:
        priority.configure(priority.Priority("normal"))
        priority.leave()

    def condition(self) -> Condition | None:
        return None  # said once at start; what a missing priority costs shows as dropped frames and late ejects

    def stats(self) -> str:
        return self.got
