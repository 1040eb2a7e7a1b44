"""Where a line's parts read the time: handed to each by the wiring (sorter/app.py), never looked up.

On a plant, and in the real-time demo, `now` is time.monotonic() and `wall` is time.time(). In the
lockstep simulation (sim/lockstep.py) both come from one virtual clock, which is also the event loop's
clock, so asyncio's sleeps and timeouts and every timestamp the pipeline takes agree with each other
while the pipeline itself does not know which clock it runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timebase:
    # scheduling, deadlines, latencies and the encoder clock model: monotonic seconds, the loop's clock
    now: Callable[[], float] = time.monotonic
    # timestamps for people (records, events, alarms); nothing is ever scheduled by it
    wall: Callable[[], float] = time.time


REAL_TIME = Timebase()
