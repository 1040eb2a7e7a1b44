"""Camera capture, isolated from detection (the Frigate idiom).

One `CameraCapture` per camera runs its frame source in its own task and keeps
only the newest `frames_per_camera` frames for the vision stage, so a slow
consumer costs frames (counted) and never memory or latency. A watchdog takes
a camera that delivers nothing for `stall_timeout_s` offline, says why, and
reopens its source with exponential backoff; a `SourceError` does the same.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from structlog.typing import FilteringBoundLogger

from sorter.config import CameraConfig, QueueConfig
from sorter.core.messages import Frame
from sorter.drivers.cameras.base import FrameSource, SourceError
from sorter.drivers.cameras.registry import make_source

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
_CLOSE_TIMEOUT_S = 3.0  # a source that cannot close in this time is abandoned, never waited on forever

State = Literal["offline", "online", "ended", "stopped"]


class CaptureClosed(Exception):
    """get() on a capture that was stopped, or whose finite source (a file) ended, once drained."""


class CameraCapture:
    def __init__(
        self,
        cfg: CameraConfig,
        queues: QueueConfig,
        log: FilteringBoundLogger,
        *,
        source_factory: Callable[[CameraConfig], FrameSource] = make_source,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.maxsize = queues.frames_per_camera
        self.drop_policy = queues.drop_policy
        self.log = log.bind(camera=cfg.name)
        self._factory = source_factory
        self._now = now
        self._buf: deque[Frame] = deque()  # bounded by hand: every drop must be counted
        self._wake = asyncio.Event()
        self.state: State = "offline"
        self.offline_reason: str | None = "not started"
        self.last_frame_at: float | None = None  # monotonic t_received of the newest frame
        self.captured = 0
        self.dropped = 0  # frames discarded by the drop policy
        self.stalls = 0
        self.reconnects = 0
        self._torn_done = 0  # counters of sources already closed
        self._src_dropped_done = 0
        self._missing_done = 0
        self._source: FrameSource | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stopping = False

    # --- consumer side ---
    @property
    def online(self) -> bool:
        return self.state == "online"

    @property
    def torn(self) -> int:
        return self._torn_done + (self._source.torn if self._source is not None else 0)

    @property
    def source_dropped(self) -> int:
        return self._src_dropped_done + (self._source.dropped if self._source is not None else 0)

    @property
    def missing(self) -> int:
        """Frames the camera sent that never arrived (gaps in its frame IDs), from sources that know (GenICam:
        an optional `lost` member of the source)."""
        return self._missing_done + (getattr(self._source, "lost", 0) if self._source is not None else 0)

    async def get(self) -> Frame:
        """The oldest queued frame; waits for one. Raises CaptureClosed once stopped/ended and drained."""
        while True:
            if self._buf:
                return self._buf.popleft()
            if self.state in ("ended", "stopped"):
                raise CaptureClosed(f"camera {self.name}: capture {self.state}")
            self._wake.clear()
            await self._wake.wait()

    @property
    def queued(self) -> int:
        """Frames waiting for the vision thread."""
        return len(self._buf)

    def stats(self) -> dict[str, Any]:
        age = None if self.last_frame_at is None else round(self._now() - self.last_frame_at, 3)
        return {
            "camera": self.name,
            "state": self.state,
            "online": self.online,
            "offline_reason": None if self.online else self.offline_reason,
            "captured": self.captured,
            "dropped": self.dropped,
            "torn": self.torn,
            "source_dropped": self.source_dropped,
            "missing": self.missing,
            "queued": self.queued,
            "stalls": self.stalls,
            "reconnects": self.reconnects,
            "last_frame_age_s": age,
        }

    # --- lifecycle ---
    async def run(self) -> None:
        """Capture until stop() (or until a finite source ends). Run it as a task."""
        if self._stopping:
            return
        self._task = asyncio.current_task()
        backoff = BACKOFF_MIN_S
        try:
            while not self._stopping:
                reason, delivered = await self._session()
                if reason is None:
                    self._set_state("ended", "the source has no more frames")
                    return
                if delivered:
                    backoff = BACKOFF_MIN_S  # it worked until now: retry promptly
                self._set_state("offline", reason, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                self.reconnects += 1
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            if self.state != "ended":
                self._set_state("stopped", "stopped")
            self._wake.set()  # release consumers waiting in get()

    async def stop(self) -> None:
        """Stop capturing and release the source; returns once run() has finished. Idempotent."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})
        if self.state != "ended":
            self._set_state("stopped", "stopped")
        self._wake.set()

    # --- internals ---
    async def _session(self) -> tuple[str | None, bool]:
        """Open the source and pump its frames until it fails, stalls or ends.

        Returns (why it stopped, or None if it ended; whether it delivered any frame).
        """
        delivered = False
        try:
            source = self._factory(self.cfg)
        except SourceError as exc:
            return str(exc), False
        self._source = source
        frames: AsyncIterator[Frame] | None = None
        try:
            frames = source.frames().__aiter__()
            timeout = self.cfg.stall_timeout_s
            # stop() cancels us, but on Python 3.11 wait_for() loses a cancellation that lands as a
            # frame arrives (gh-86296): the flag ends the loop all the same
            while not self._stopping:
                try:
                    frame = await asyncio.wait_for(anext(frames), timeout)
                except StopAsyncIteration:
                    return None, delivered
                except TimeoutError:
                    self.stalls += 1
                    what = "no frame" if delivered else "no first frame"
                    return f"stalled: {what} for {timeout:g} s (belt stopped, or source hung)", delivered
                delivered = True
                self._put(frame)
            return "stopped", delivered
        except SourceError as exc:
            return str(exc), delivered
        except Exception as exc:  # a driver bug must not end capture for good: report and reconnect
            self.log.exception("frame source failed")
            return f"source failed: {exc!r}", delivered
        finally:
            await self._close_source(source, frames)

    async def _close_source(self, source: FrameSource, frames: AsyncIterator[Frame] | None) -> None:
        cancelled = False
        aclose = getattr(frames, "aclose", None)
        for closing in (aclose, source.close):
            if closing is None:
                continue
            try:
                await asyncio.wait_for(closing(), _CLOSE_TIMEOUT_S)
            except asyncio.CancelledError:
                cancelled = True  # finish releasing the source first; each step is time-bounded
            except Exception as exc:
                self.log.warning("closing the frame source failed", error=repr(exc))
        self._torn_done += source.torn
        self._src_dropped_done += source.dropped
        self._missing_done += getattr(source, "lost", 0)
        self._source = None
        if cancelled:
            raise asyncio.CancelledError

    def _put(self, frame: Frame) -> None:
        self.captured += 1
        self.last_frame_at = frame.t_received
        if self.state != "online":
            self._set_state("online", None)
        if len(self._buf) >= self.maxsize:
            self.dropped += 1
            if self.drop_policy == "drop_newest":
                return
            self._buf.popleft()
        self._buf.append(frame)
        self._wake.set()

    def _set_state(self, state: State, reason: str | None, **extra: Any) -> None:
        old, self.state = self.state, state
        if state == "online":
            if old != "online":
                self.log.info("camera online", after=self.offline_reason)
            self.offline_reason = None
            return
        first = old == "online" or reason != self.offline_reason
        self.offline_reason = reason
        if state == "offline":
            # the first loss is a warning; the same failure repeating on every retry is not news
            (self.log.warning if first else self.log.info)("camera offline", reason=reason, **extra)
        elif old != state:
            self.log.info(f"camera {state}", reason=reason)

    # async context-manager sugar for scripts and tests
    async def __aenter__(self) -> CameraCapture:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"capture-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
