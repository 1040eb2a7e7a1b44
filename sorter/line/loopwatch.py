"""A watchdog for the service's event loop: stalls are measured, and where the loop was stuck is logged.

The loop polls the PLC, reads the cameras' frame headers and plans ejections; held up for half a
second, frames are lost and valves fire late. A stall is measured from a heartbeat the loop itself
schedules; a thread of its own (which keeps running while the loop is stuck in Python code, since the
interpreter switches threads every few ms) notes the loop thread's stack while the stall lasts, and
logs it once the loop beats again. When the watcher itself wakes late, the whole process was held:
a C extension holding the GIL, or no CPU for it (a busy machine) — the log says which it saw.

Real time only: a virtual clock (lockstep) has no stalls to see, and a heartbeat timer would keep its
loop from waiting for real threads (sorter/line/virtualtime.py).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from typing import Any

from sorter.core.alarms import Condition

BEAT_S = 0.05  # the loop's heartbeat; also how often the watcher looks
STALL_S = 0.3  # a loop that has not beaten for this long is stalled
STACK_FRAMES = 8  # innermost frames of the loop thread's stack kept in the log


class LoopWatch:
    name = "loop_watch"

    def __init__(self, *, log: Any, stall_s: float = STALL_S) -> None:
        self.log = log
        self.stall_s = stall_s
        self.stalls = 0  # the loop held up longer than stall_s
        self.starved = 0  # ... and the watcher with it: the whole process was held
        self.longest_s = 0.0
        self._beat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._beat = time.monotonic()
        self._timer = self._loop.call_later(BEAT_S, self._tick)
        self._stop.clear()
        loop_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, args=(loop_thread,), name="loop-watch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)

    def condition(self) -> Condition | None:
        return None  # a stall is logged and counted; its effects (late ejects, dropped frames) raise the alarms

    def stats(self) -> dict[str, Any]:
        return {"stalls": self.stalls, "starved": self.starved, "longest_s": round(self.longest_s, 3)}

    def _tick(self) -> None:
        self._beat = time.monotonic()
        assert self._loop is not None
        self._timer = self._loop.call_later(BEAT_S, self._tick)

    def _watch(self, loop_thread: int) -> None:
        stall_from: float | None = None
        stacks: list[str] = []
        watcher_late = 0.0
        last = time.monotonic()
        while not self._stop.wait(BEAT_S):
            now = time.monotonic()
            overslept = now - last - BEAT_S
            last = now
            beat = self._beat
            if now - beat > self.stall_s:
                if stall_from is None:
                    stall_from, stacks, watcher_late = beat, [], 0.0
                watcher_late = max(watcher_late, overslept)
                frame = sys._current_frames().get(loop_thread)
                if frame is not None:
                    where = "".join(traceback.format_stack(frame)[-STACK_FRAMES:])
                    if where not in stacks and len(stacks) < 3:
                        stacks.append(where)
            elif stall_from is not None:
                self._stall_ended(beat - stall_from, watcher_late, stacks)
                stall_from = None

    def _stall_ended(self, seconds: float, watcher_late: float, stacks: list[str]) -> None:
        self.stalls += 1
        self.longest_s = max(self.longest_s, seconds)
        held = watcher_late > self.stall_s / 2
        if held:
            self.starved += 1
        self.log.warning(
            "event loop stalled",
            seconds=round(seconds, 3),
            # the watcher could not run either: the GIL was held in C code, or the machine gave the process no CPU
            process_held=held,
            watcher_late_s=round(watcher_late, 3),
            loop_stack=stacks or None,
        )
