"""Running the line in virtual time: an event loop whose clock jumps, and work done in place.

Used wherever the unchanged pipeline must run deterministically and as fast as the CPU allows, without
waiting for real time: the lockstep simulation (sim/lockstep.py, the simulator on the same clock) and
the replay of a recording (sorter/replay.py, the recorded plant on the same clock). The loop's clock is
the line's `Timebase` (`VirtualClock.now`/`wall`), so asyncio's sleeps and timeouts and every timestamp
the pipeline takes agree; the pipeline does not know which clock it runs on (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

REAL_WAIT_S = 10.0  # with no timer set, how long a real thread may take to wake the loop


class VirtualClock:
    """Monotonic seconds that only move when the loop has nothing to do; wall time = wall0 + (t - t0)."""

    def __init__(self, t0: float, wall0: float) -> None:
        self.t = t0
        self._t0 = t0
        self._wall0 = wall0

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self._wall0 + (self.t - self._t0)


class _JumpingSelector:
    """The loop's selector, except that waiting means moving the virtual clock to the next timer.

    I/O already pending (the loop's own self-pipe, written by call_soon_threadsafe) is taken first; the
    run has no other I/O. With nothing pending and nothing scheduled the run is deadlocked: that raises
    rather than blocking for ever.
    """

    def __init__(self, inner: selectors.BaseSelector, clock: VirtualClock) -> None:
        self._inner = inner
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            # no timer: only a real thread can still wake the loop (asyncio's executor shutdown at the end of a
            # run joins its threads on one and reports through the self-pipe): wait for it, in real time
            ready = self._inner.select(REAL_WAIT_S)
            if ready:
                return ready
            raise RuntimeError(
                f"virtual time: every task waits, no timer is set and nothing woke the loop in {REAL_WAIT_S:g} s "
                "(a deadlock in virtual time)"
            )
        self._clock.t += timeout
        return []

    def __getattr__(self, name: str) -> Any:  # register, unregister, modify, get_key, get_map, close
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a VirtualClock; its default executor runs work in place (asyncio.to_thread too)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_JumpingSelector(selectors.DefaultSelector(), clock))  # type: ignore[arg-type]
        self.vclock = clock
        self.set_default_executor(InPlace())

    def time(self) -> float:
        return self.vclock.t


class InPlace(ThreadPoolExecutor):
    """An executor that runs the work at once, on the caller's thread: the worker threads in virtual time.
    (A ThreadPoolExecutor only because asyncio's default executor must be one; it never starts a thread.)"""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the caller sees it where it awaits the future, as with a thread
            fut.set_exception(exc)
        return fut
