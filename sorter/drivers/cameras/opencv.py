"""OpenCV VideoCapture as a frame source: a device index, a video file, or an
RTSP/HTTP URL.

`VideoCapture.read()` blocks (for seconds on a dead RTSP stream), so grabbing
runs on its own thread and hands frames to asyncio through a small bounded
buffer. Live sources drop the oldest frame when the consumer is behind (a
stale frame is worth less than a fresh one); an unpaced file blocks instead,
so a batch replay sees every frame.

These frames carry no encoder count (`count=None`): the service places them
on the belt through its clock model from `t_capture`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np

from sorter.config import CameraConfig, OpenCVSource
from sorter.core import priority
from sorter.core.messages import Frame
from sorter.drivers.cameras.base import SourceError

_JOIN_TIMEOUT_S = 2.0
_FALLBACK_FPS = 30.0


class _End:
    """End of a finite source (a file)."""


_Item = Frame | _End | SourceError
Kind = Literal["device", "stream", "file"]


def uri_kind(uri: int | str) -> Kind:
    if isinstance(uri, int) or uri.isdigit():
        return "device"
    if "://" in uri:
        return "stream"
    return "file"


class OpenCVCaptureSource:
    source_type: ClassVar[str] = "opencv"
    """FrameSource over cv2.VideoCapture; resizes nothing."""

    @classmethod
    def from_config(cls, cfg: CameraConfig) -> OpenCVCaptureSource:
        src = cfg.source
        assert isinstance(src, OpenCVSource)
        return cls(
            cfg.name,
            src.uri,
            realtime=src.realtime,
            fps=src.fps,
            width=cfg.width,
            height=cfg.height,
            latency_ms=cfg.latency_ms,
        )

    def __init__(
        self,
        name: str,
        uri: int | str,
        *,
        realtime: bool = True,
        fps: float | None = None,
        width: int | None = None,
        height: int | None = None,
        handoff: int = 2,
        latency_ms: float = 0.0,
    ) -> None:
        self._name = name
        # exposure -> grab, calibrated (hw.calibrate_camera): the grab time minus it is the exposure's time
        self.latency_s = latency_ms / 1000.0
        self.uri = uri
        self.kind = uri_kind(uri)
        self.realtime = realtime
        self.fps = fps
        self.expected = (width, height)
        # only an unpaced file may hold the grab thread back: it is a replay, not a live view
        self.lossless = self.kind == "file" and not realtime
        self._cap = max(1, handoff)
        self._buf: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self.grabbed = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def torn(self) -> int:
        return 0

    @property
    def dropped(self) -> int:
        return self._dropped

    # --- asyncio side ---
    async def frames(self) -> AsyncIterator[Frame]:
        if self._thread is not None:
            raise RuntimeError(f"camera {self._name}: frames() of an OpenCV source can run only once")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._grab_loop, name=f"opencv-{self._name}", daemon=True)
        self._thread.start()
        try:
            while True:
                item = await self._next()
                if isinstance(item, _End):
                    return
                if isinstance(item, SourceError):
                    raise item
                yield item
        finally:
            await self.close()

    async def _next(self) -> _Item:
        assert self._ready is not None
        while True:
            # clear before looking: a push after the look schedules set() after this clear
            self._ready.clear()
            with self._cond:
                if self._buf:
                    item = self._buf.popleft()
                    self._cond.notify()
                    return item
            await self._ready.wait()

    async def close(self) -> None:
        first = not self._stop.is_set()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        t = self._thread
        if first and t is not None and t.is_alive():
            # a blocked read() (dead RTSP stream) may outlive this wait, once; the thread is a
            # daemon and releases the capture itself when read() returns
            await asyncio.to_thread(t.join, _JOIN_TIMEOUT_S)

    # --- grab thread ---
    def _push(self, item: _Item, *, terminal: bool = False) -> bool:
        with self._cond:
            if not terminal:
                if self.lossless:
                    while len(self._buf) >= self._cap and not self._stop.is_set():
                        self._cond.wait()
                    if self._stop.is_set():
                        return False
                elif len(self._buf) >= self._cap:
                    self._buf.popleft()
                    self._dropped += 1
            self._buf.append(item)
        assert self._loop is not None and self._ready is not None
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()
            return False
        return True

    def _error(self, problem: str, check: str) -> SourceError:
        return SourceError(self._name, problem, check)

    def _open(self) -> cv2.VideoCapture:
        uri = self.uri
        if self.kind == "file" and "%" not in str(uri) and not Path(str(uri)).is_file():
            # image sequences ("img_%04d.png") are not files; everything else can be checked up front
            raise self._error(f"video file {uri!r} not found", "check cameras[].source.uri and the working directory")
        if self.kind == "device":
            cap = cv2.VideoCapture(int(uri))
            if self.fps is not None:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        else:
            cap = cv2.VideoCapture(str(uri))
        if not cap.isOpened():
            cap.release()
            check = {
                "device": "is the camera plugged in, the index right, and the device free?",
                "stream": "is the URL reachable from this PC and the credentials right?",
                "file": "is it a video OpenCV can decode (FFmpeg backend)?",
            }[self.kind]
            raise self._error(f"cannot open video source {uri!r}", check)
        return cap

    def _grab_loop(self) -> None:
        priority.enter()  # time-critical: keeps pace with the belt (sorter/core/priority.py)
        cap: cv2.VideoCapture | None = None
        try:
            cap = self._open()
            file_fps = cap.get(cv2.CAP_PROP_FPS)
            if not (math.isfinite(file_fps) and file_fps > 0):
                file_fps = self.fps or _FALLBACK_FPS
            paced = self.kind == "file" and self.realtime
            t0: float | None = None
            seq = 0
            while not self._stop.is_set():
                if not cap.grab():
                    self._finish_stream()
                    return
                t_grab = time.monotonic()
                ok, image = cap.retrieve()
                if not ok or image is None:
                    self._finish_stream()
                    return
                self.grabbed += 1
                t_capture = t_grab - self.latency_s
                if paced:
                    pos_s = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    if not (math.isfinite(pos_s) and pos_s >= 0) or (seq > 0 and pos_s == 0):
                        pos_s = seq / file_fps  # the container has no usable timestamps
                    if t0 is None:
                        t0 = t_grab - pos_s
                    t_capture = t0 + pos_s
                    if self._stop.wait(max(0.0, t_capture - time.monotonic())):
                        return
                image = self._check_image(image)
                if not self._push(Frame(self._name, seq, image, t_capture, None, time.monotonic())):
                    return
                seq += 1
        except SourceError as exc:
            self._push(exc, terminal=True)
        except Exception as exc:  # cv2.error and friends: report through the seam, never die silently
            self._push(self._error(f"capture from {self.uri!r} failed: {exc}", "see the log"), terminal=True)
        finally:
            if cap is not None:
                cap.release()

    def _finish_stream(self) -> None:
        if self.kind == "file":
            self._push(_End(), terminal=True)
        else:
            self._push(
                self._error(
                    f"lost the video stream from {self.uri!r}", "check the cable / network and the camera's power"
                ),
                terminal=True,
            )

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        h, w = image.shape[:2]
        ew, eh = self.expected
        if (ew is not None and ew != w) or (eh is not None and eh != h):
            raise self._error(
                f"source {self.uri!r} delivers {w}x{h} frames but the config says {ew}x{eh}",
                "fix cameras[].width/height; frames are never resized",
            )
        return image


def opencv_devices() -> list[dict[str, Any]]:
    """The PC's video devices OpenCV can open by index (V4L2 nodes, named from sysfs without opening them:
    a device the line is using stays undisturbed)."""
    out = []
    for node in sorted(Path("/sys/class/video4linux").glob("video*"), key=lambda p: int(p.name[5:] or 0)):
        name_file = node / "name"
        name = name_file.read_text().strip() if name_file.is_file() else ""
        out.append({"index": int(node.name[5:]), "device": f"/dev/{node.name}", "name": name})
    return out
