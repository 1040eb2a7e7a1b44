"""The frame-source seam: every camera, real or simulated, is one of these.

A source yields `Frame`s from an async iterator. It ends the iterator only when
it can never produce another frame (the end of a video file); losing a live
stream is a `SourceError`, so the capture can tell "done" from "reconnect".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from sorter.core.messages import Frame


class SourceError(Exception):
    """A camera source cannot deliver frames; the message names the camera and what to check."""

    def __init__(self, camera: str, problem: str, check: str = "") -> None:
        self.camera = camera
        self.problem = problem
        self.check = check
        super().__init__(f"camera {camera}: {problem}" + (f" ({check})" if check else ""))


@runtime_checkable
class FrameSource(Protocol):
    @property
    def name(self) -> str:
        """The camera's name, as in the config."""
        ...

    @property
    def torn(self) -> int:
        """Frames the source received but discarded as corrupt (e.g. an overwritten shm slot)."""
        ...

    @property
    def dropped(self) -> int:
        """Frames the source discarded because its consumer was behind."""
        ...

    # optional: `lost`, frames the camera sent that never arrived (its frame IDs show the gap); the capture
    # adds it to its `missing` count where a source has it (genicam.py)

    def frames(self) -> AsyncIterator[Frame]:
        """Open the source (on first iteration) and yield its frames; raises SourceError."""
        ...

    async def close(self) -> None:
        """Release the device, connection and threads; safe to call more than once."""
        ...
