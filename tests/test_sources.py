"""Frame sources end to end on loopback: the simulated line camera and its client,
the OpenCV source on a video the simulator recorded, and CameraCapture's drop
policy and stall watchdog.

Frames are small and the belt fast so the file runs in seconds. The test render
function writes the belt position it was asked for into the frame, so each
frame's pixels can be checked against its header's latched count.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import structlog

from sim.belt import Belt
from sim.camera import SimCameraServer
from sorter.config import CameraConfig, CameraMapping, OpenCVSource, QueueConfig, SimCameraSource
from sorter.core.geometry import diff32, unwrap
from sorter.core.messages import Frame
from sorter.drivers.cameras.base import FrameSource, SourceError
from sorter.drivers.cameras.capture import CameraCapture, CaptureClosed
from sorter.drivers.cameras.opencv import OpenCVCaptureSource
from sorter.drivers.cameras.registry import make_source
from sorter.drivers.cameras.simcam import SimCameraClient
from tests.conftest import wait_until

pytestmark = pytest.mark.wire

CPM = 20.0  # counts per mm
SPEED = 2500.0  # mm/s
TRIG = 400  # counts per frame: 20 mm, 125 frames/s at SPEED
START = 2**32 - 3000  # the 32-bit count wraps a few frames into every test
W, H = 96, 64
DELAY_MS = (10.0, 60.0)


def level(pos_mm: float) -> int:
    """The grey level a frame shows at belt position pos_mm (distinct for neighbouring frames)."""
    return 30 + (round(pos_mm) * 7) % 200


def render(buf: np.ndarray, pos_mm: float) -> None:
    buf[...] = level(pos_mm)
    buf[0, :8, 0] = np.frombuffer(struct.pack("<d", pos_mm), np.uint8)  # exact position, for the header check


def decoded_pos(image: np.ndarray) -> float:
    return struct.unpack("<d", image[0, :8, 0].tobytes())[0]


def assert_intact(frame: Frame, belt: Belt) -> None:
    """The pixels show the belt exactly at the frame's latched count, and nothing else."""
    assert frame.count is not None
    count = unwrap(frame.count, START)
    assert count % TRIG == 0
    pos = belt.position_at_count(count)
    assert decoded_pos(frame.image) == pos
    body = frame.image.copy()
    body[0, :8, 0] = level(pos)
    assert (body == level(pos)).all(), f"frame {frame.seq} is torn or shows the wrong position"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def camera_cfg(source: SimCameraSource | OpenCVSource, stall_timeout_s: float = 2.0) -> CameraConfig:
    return CameraConfig(
        name="cam0",
        source=source,
        width=W,
        height=H,
        mapping=CameraMapping(centre_mm=(48.0, 0.0)),
        stall_timeout_s=stall_timeout_s,
    )


@pytest.fixture
def belt() -> Belt:
    b = Belt(CPM, SPEED, encoder_start=START)
    b.start()
    return b


ServerFactory = Callable[..., Awaitable[SimCameraServer]]


@pytest.fixture
async def serve(belt: Belt) -> AsyncIterator[ServerFactory]:
    servers: list[SimCameraServer] = []

    async def start(**kw: object) -> SimCameraServer:
        args: dict[str, object] = {"delay_ms": DELAY_MS, "seed": 1, "host": "127.0.0.1", "port": 0}
        args.update(kw)
        server = SimCameraServer("cam0", W, H, TRIG, belt, render, **args)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.stop()


async def take(source: FrameSource, n: int, timeout: float = 5.0) -> list[Frame]:
    async def collect() -> list[Frame]:
        out: list[Frame] = []
        async with contextlib.aclosing(source.frames()) as frames:  # type: ignore[type-var]
            async for f in frames:
                out.append(f)
                if len(out) == n:
                    break
        return out

    return await asyncio.wait_for(collect(), timeout)


# --- the simulated camera and its client ---


async def test_frames_arrive_in_order_with_latched_counts(belt: Belt, serve: ServerFactory) -> None:
    server = await serve()
    client = SimCameraClient("cam0", server.address, width=W, height=H)
    frames: list[Frame] = []
    async with contextlib.aclosing(client.frames()) as stream:  # type: ignore[type-var]
        async for f in stream:
            frames.append(f)
            if len(frames) == 20:
                belt.set_speed(1.6 * SPEED)  # the trigger prediction must follow a speed change
            if len(frames) == 45:
                break

    for f in frames:
        assert f.camera == "cam0" and f.image.shape == (H, W, 3) and f.image.dtype == np.uint8
        assert_intact(f, belt)
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)), "frames out of order"
    for a, b in itertools.pairwise(frames):
        assert a.count is not None and b.count is not None
        assert diff32(b.count, a.count) == TRIG * (b.seq - a.seq)
        assert b.t_capture > a.t_capture
        assert b.t_received >= a.t_received  # FIFO: a later frame never overtakes
    assert frames[0].count is not None and frames[-1].count is not None
    assert frames[-1].count < frames[0].count, "the test should cross the 32-bit wrap"
    delays = np.array([f.t_received - f.t_capture for f in frames])
    assert delays.min() >= DELAY_MS[0] / 1000
    # upper bound: the configured maximum plus scheduling slack on a busy 2-core machine
    assert np.median(delays) <= DELAY_MS[1] / 1000 and delays.max() <= DELAY_MS[1] / 1000 + 0.05
    assert client.torn == 0
    assert server.frames_triggered >= server.frames_sent >= len(frames)


async def test_slow_consumer_overwritten_slots_are_dropped_and_counted(belt: Belt, serve: ServerFactory) -> None:
    server = await serve(slots=4, delay_ms=(1.0, 2.0))
    client = SimCameraClient("cam0", server.address)
    frames = client.frames()
    first = await asyncio.wait_for(anext(frames), 5)
    # stall the consumer while the server sends 12 more headers through a 4-slot ring
    await wait_until(lambda: server.frames_sent >= first.seq + 12, timeout=5, what="12 more frames sent")
    later = [await asyncio.wait_for(anext(frames), 5) for _ in range(5)]
    await frames.aclose()  # type: ignore[attr-defined]
    assert client.torn >= 12 - 4
    assert later[0].seq > first.seq + client.torn  # the overwritten frames were skipped, not returned
    for f in [first, *later]:
        assert_intact(f, belt)


async def test_unreachable_sim_camera_raises_source_error() -> None:
    port = free_port()
    source = make_source(camera_cfg(SimCameraSource(address=f"127.0.0.1:{port}")))
    with pytest.raises(SourceError, match=rf"camera cam0: .*127\.0\.0\.1:{port}.*cannot connect"):
        await take(source, 1)


# --- CameraCapture ---


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_capture_drop_policy_when_consumer_stalls(belt: Belt, serve: ServerFactory, policy: str) -> None:
    server = await serve(delay_ms=(1.0, 2.0))
    cfg = camera_cfg(SimCameraSource(address=server.address), stall_timeout_s=5.0)
    queues = QueueConfig(frames_per_camera=3, drop_policy=policy)  # type: ignore[arg-type]
    async with CameraCapture(cfg, queues, structlog.get_logger()) as cap:
        await wait_until(lambda: cap.captured >= 12, timeout=5, what="12 frames captured")
        belt.stop()  # freeze the stream so the queue's content can be predicted
        await wait_until(
            lambda: server.frames_sent + server.frames_skipped == server.frames_triggered, timeout=5, what="sends"
        )
        await wait_until(
            lambda: cap.captured + cap.torn == server.frames_sent, timeout=5, what="capture to drain the socket"
        )
        stats = cap.stats()
        assert stats["online"] and stats["queued"] == 3 and stats["torn"] == 0
        assert stats["dropped"] == stats["captured"] - 3
        seqs = [(await cap.get()).seq for _ in range(3)]
    last = server.frames_triggered  # seq == trigger number, and the last trigger was sent
    if policy == "drop_oldest":
        assert seqs == [last - 2, last - 1, last]
    else:
        assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2] and seqs[2] < last - 5
    assert cap.state == "stopped"
    with pytest.raises(CaptureClosed):
        await cap.get()


async def test_stall_watchdog_reconnects_after_server_restart(belt: Belt, serve: ServerFactory) -> None:
    server = await serve(delay_ms=(1.0, 2.0))
    port = server.port
    cfg = camera_cfg(SimCameraSource(address=server.address), stall_timeout_s=0.3)
    with structlog.testing.capture_logs() as logs:
        async with CameraCapture(cfg, QueueConfig(), structlog.get_logger()) as cap:
            await wait_until(lambda: cap.online and cap.captured >= 3, timeout=5, what="camera online")
            belt.stop()
            await wait_until(lambda: not cap.online, timeout=5, what="stall detected")
            assert cap.stalls >= 1 and "stalled" in str(cap.stats()["offline_reason"])

            await server.stop()
            before = cap.captured
            belt.start()
            await wait_until(lambda: cap.reconnects >= 2, timeout=5, what="a failed reconnect while the server is down")
            assert not cap.online
            await serve(port=port, seed=2)  # the camera comes back on the same address
            await wait_until(lambda: cap.online and cap.captured >= before + 3, timeout=5, what="camera back online")
            frame = await cap.get()
            assert_intact(frame, belt)
    events = [(e["event"], e.get("reason", "")) for e in logs]
    assert any(ev == "camera offline" and "stalled" in reason for ev, reason in events)
    assert any(ev == "camera offline" and "cannot connect" in reason for ev, reason in events)
    assert sum(ev == "camera online" for ev, _ in events) >= 2


# --- OpenCV source on a recording of the simulated camera ---


@pytest.fixture
async def recording(belt: Belt, serve: ServerFactory, tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    path = tmp_path / "cam0.avi"
    server = await serve(record=path)  # no client: frames are rendered for the recording only
    await wait_until(lambda: server.frames_triggered >= 15, timeout=5, what="15 frames recorded")
    await server.stop()
    with path.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == server.frames_triggered and server.frames_sent == 0
    return path, rows


async def test_opencv_reads_recorded_video(belt: Belt, recording: tuple[Path, list[dict[str, str]]]) -> None:
    path, rows = recording
    source = OpenCVCaptureSource("cam0", str(path), realtime=False, width=W, height=H)
    frames = await take(source, len(rows) + 1)  # +1: the iterator must end by itself at end of file
    assert len(frames) == len(rows)
    for i, (f, row) in enumerate(zip(frames, rows, strict=True)):
        assert f.count is None and f.seq == i and f.image.shape == (H, W, 3)
        pos = belt.position_at_count(unwrap(int(row["count"]), START))
        assert abs(float(np.median(f.image)) - level(pos)) <= 3  # MJPG is lossy
    assert all(b.t_capture >= a.t_capture for a, b in itertools.pairwise(frames))


async def test_opencv_paces_a_realtime_file(recording: tuple[Path, list[dict[str, str]]]) -> None:
    path, rows = recording
    source = make_source(camera_cfg(OpenCVSource(uri=str(path), realtime=True)))
    t0 = time.monotonic()
    frames = await take(source, len(rows) + 1)
    fps = SPEED * CPM / TRIG  # the recording's nominal frame rate
    assert len(frames) == len(rows)
    assert time.monotonic() - t0 >= (len(frames) - 1) / fps * 0.9
    steps = np.diff([f.t_capture for f in frames])
    assert np.allclose(steps, 1 / fps, atol=1e-3)  # from the file's timestamps, not from grab jitter


async def test_capture_of_a_file_ends(recording: tuple[Path, list[dict[str, str]]]) -> None:
    path, rows = recording
    cfg = camera_cfg(OpenCVSource(uri=str(path), realtime=False))
    async with CameraCapture(cfg, QueueConfig(frames_per_camera=64), structlog.get_logger()) as cap:
        await wait_until(lambda: cap.state == "ended", timeout=5, what="end of file")
        got = [await cap.get() for _ in range(len(rows))]
        with pytest.raises(CaptureClosed):
            await cap.get()
    assert [f.seq for f in got] == list(range(len(rows))) and cap.reconnects == 0


async def test_missing_file_raises_source_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.avi"
    source = make_source(camera_cfg(OpenCVSource(uri=str(missing), realtime=False)))
    with pytest.raises(SourceError, match=r"camera cam0: video file .*nope\.avi.* not found"):
        await take(source, 1)
