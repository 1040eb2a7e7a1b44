"""Frames from the line's cameras for commissioning, through the service's own capture.

Each configured camera is opened exactly as the line service opens it (`sorter.drivers.cameras.capture.CameraCapture`
over `sorter.drivers.cameras`), so what a script sees is what the line will see. A camera that delivers
nothing becomes one `HwError` naming every silent camera, its address and what to check.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from hw.common import HwError, console
from sorter.config import CameraConfig, GenICamSource, LineConfig, SimCameraSource
from sorter.core.messages import Frame
from sorter.drivers.cameras.capture import CameraCapture, CaptureClosed

_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Stamp:
    seq: int
    t_capture: float
    t_received: float
    count: int | None  # the encoder count latched at exposure, where the camera has one


@dataclass
class Grabbed:
    """What one camera delivered: every frame's stamps, and a sample of the frames themselves."""

    camera: CameraConfig
    index: int
    stamps: list[Stamp] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    dropped: int = 0  # frames the camera or its source produced that never reached us
    torn: int = 0


def describe_source(cam: CameraConfig) -> str:
    src = cam.source
    if isinstance(src, SimCameraSource):
        return f"{src.type} camera at {src.address}"
    if isinstance(src, GenICamSource):
        trig = {"line": f"triggered on {src.trigger_line}", "software": "software-triggered", "free": "free-running"}
        return f"GenICam camera {src.device!r} ({trig[src.trigger]}, position from {src.position})"
    where = getattr(src, "uri", None)  # a source type of its own names itself by its settings
    shown = (
        repr(where)
        if where is not None
        else ", ".join(f"{k}={v!r}" for k, v in src.model_dump(exclude={"type"}).items())
    )
    return f"{src.type} source {shown}"


def free_run(cfg: LineConfig) -> LineConfig:
    """The config with its GenICam cameras free-running: for scripts that look at the stopped belt (an
    encoder-triggered camera sends nothing while the belt stands). Frame positions do not matter there."""
    cams = [
        c.model_copy(update={"source": c.source.model_copy(update={"trigger": "free", "position": "arrival"})})
        if isinstance(c.source, GenICamSource)
        else c
        for c in cfg.cameras
    ]
    return cfg.model_copy(update={"cameras": cams})


def genicam_cameras(cfg: LineConfig) -> list[tuple[int, CameraConfig, GenICamSource]]:
    return [(i, c, c.source) for i, c in enumerate(cfg.cameras) if isinstance(c.source, GenICamSource)]


def genicam_facts(cfg: LineConfig) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The GenICam cameras that answer discovery, and each configured one opened and set up exactly as the line
    does it (hw.camera_check): its trigger mode and source, pixel format, region, exposure, whether it has
    chunk data, how wide its frame IDs are. A camera that cannot be opened gets its error instead."""
    cams = genicam_cameras(cfg)
    try:
        from sorter.drivers.cameras.genicam import GenICamCamera, GenICamError, discover
    except ImportError as exc:
        if cams:
            raise HwError(f"the config has GenICam cameras but: {exc}", "`make genicam`") from None
        return [], {}
    found = [d.__dict__ for d in discover()]
    facts: dict[str, dict[str, Any]] = {}
    for _, cam, src in cams:
        source = GenICamCamera.from_config(cam)
        try:
            dev = source.open_device()
        except GenICamError as exc:
            facts[cam.name] = {"error": str(exc)}
            continue
        try:
            facts[cam.name] = dev.describe() | {
                "position": src.position,
                "device": dev.info.__dict__ if dev.info else None,
            }
        finally:
            dev.close()
    return found, facts


def _silent(cam: CameraConfig, index: int, reason: str | None) -> str:
    if isinstance(cam.source, GenICamSource) and not (reason and reason.startswith("stalled")):
        check = (
            f"is it powered, connected and on this PC's subnet? `sorter cameras discover` lists what answers; "
            f"`sorter cameras grab --serial {cam.source.device}` tries it alone (docs/cameras.md)"
        )
        what = reason or "nothing received"
        return f"camera {cam.name} ({describe_source(cam)}) delivers no frames: {what}\n    {check}"
    if reason and reason.startswith("stalled"):
        check = (
            "it answers but sends no frames: the cameras are encoder-triggered, so run the belt, "
            "or switch the camera to free-run (trigger mode off) in its configuration tool"
        )
    else:
        check = f"is it powered and connected, and is cameras[{index}].source in the config right?"
    return f"camera {cam.name} ({describe_source(cam)}) delivers no frames: {reason or 'nothing received'}\n    {check}"


async def grab(
    cfg: LineConfig, seconds: float, keep: int, *, first_frame_s: float | None = None, what: str = "capturing"
) -> list[Grabbed]:
    """Capture from every camera at once for `seconds`, keeping about `keep` frames of each, evenly spread.

    Raises HwError if a camera has delivered no frame within `first_frame_s` (default: a little longer
    than its stall timeout, so the capture's own watchdog has said why).
    """
    log = structlog.get_logger("hw.cameras")
    out = [Grabbed(cam, i) for i, cam in enumerate(cfg.cameras)]
    captures = [CameraCapture(cam, cfg.queues, log) for cam in cfg.cameras]
    every = seconds / max(keep, 1)

    async def pump(cap: CameraCapture, g: Grabbed) -> None:
        last_kept = -1e9
        while True:
            try:
                frame = await cap.get()
            except CaptureClosed:
                return
            g.stamps.append(Stamp(frame.seq, frame.t_capture, frame.t_received, frame.count))
            if frame.t_received - last_kept >= every and len(g.frames) < keep:
                g.frames.append(frame)
                last_kept = frame.t_received

    pumps: list[asyncio.Task[None]] = []
    try:
        for cap, g in zip(captures, out, strict=True):
            await cap.__aenter__()
            pumps.append(asyncio.create_task(pump(cap, g)))
        wait_first = first_frame_s or max(c.stall_timeout_s for c in cfg.cameras) + 1.5
        deadline = time.monotonic() + wait_first
        while any(not g.stamps for g in out) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        silent = [
            _silent(g.camera, g.index, c.offline_reason) for c, g in zip(captures, out, strict=True) if not g.stamps
        ]
        if silent:
            raise HwError("\n".join(silent))
        # the measurement starts now that every camera delivers: connection set-up is not the camera's rate
        for g in out:
            g.stamps.clear()
            g.frames.clear()
        with Progress(TextColumn(what), BarColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task(what, total=seconds)
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < seconds:
                bar.update(task, completed=elapsed)
                await asyncio.sleep(_POLL_S)
    finally:
        for cap in captures:
            await cap.stop()  # ends every pump's get() with CaptureClosed
        await asyncio.gather(*pumps, return_exceptions=True)
    for cap, g in zip(captures, out, strict=True):
        gaps = sum(max(0, b.seq - a.seq - 1) for a, b in itertools.pairwise(g.stamps))
        g.dropped = gaps + cap.source_dropped
        g.torn = cap.torn
    return out
