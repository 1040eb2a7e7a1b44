"""The event loop's watchdog: a loop held up is counted and where it was stuck is logged."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sorter.line.loopwatch import LoopWatch

pytestmark = pytest.mark.fast


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.warnings.append((event, kw))


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocking call on the loop: what a slow callback does


async def test_a_held_loop_is_counted_with_its_stack() -> None:
    log = _Log()
    watch = LoopWatch(log=log, stall_s=0.2)
    await watch.start()
    try:
        await asyncio.sleep(0.2)
        _hold_the_loop(0.8)
        await asyncio.sleep(0.3)  # the loop beats again: the stall is logged
    finally:
        await watch.stop()
    assert watch.stalls == 1 and watch.longest_s >= 0.7
    assert watch.starved == 0  # the watcher itself ran all along (time.sleep releases the GIL)
    event, kw = log.warnings[0]
    assert event == "event loop stalled" and not kw["process_held"]
    assert any("_hold_the_loop" in s for s in kw["loop_stack"])


async def test_a_free_loop_is_not_a_stall() -> None:
    log = _Log()
    watch = LoopWatch(log=log, stall_s=0.2)
    await watch.start()
    for _ in range(10):
        await asyncio.sleep(0.03)
    await watch.stop()
    assert watch.stats() == {"stalls": 0, "starved": 0, "longest_s": 0.0} and not log.warnings
