"""Waiting in a test for something the line does on its own: poll a condition, fail naming what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(
    cond: Callable[[], bool], timeout: float = 3.0, what: str = "condition", poll_s: float = 0.02
) -> float:
    """Poll `cond` on the running loop until it holds; the seconds that took. Fails after `timeout` s."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not within {timeout} s")
        await asyncio.sleep(poll_s)
    return time.monotonic() - t0
