"""The GenICam driver over real GigE Vision on loopback, against Debian's fake camera (aravis-tools:
`arv-fake-gv-camera-0.8`, a GigE Vision device in C that nobody in this project wrote). No mock of the library.

GigE Vision discovery answers on UDP 3956 of the interface: one fake camera per host at a time, so every test
here shares the one fake of this module (restarted by the tests that pull its cable or make it drop packets)
and the module's tests run one after another. `make genicam` installs what they need; without it they skip
locally and fail in CI.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog
from typer.testing import CliRunner

from sorter.config import CameraConfig, CameraMapping, GenICamSource, QueueConfig, load_config
from sorter.core.position import FrameIds
from sorter.drivers.cameras.base import SourceError
from sorter.drivers.cameras.capture import CameraCapture
from tests.conftest import skip_or_fail_in_ci, wait_until

pytestmark = pytest.mark.wire

FAKE = "arv-fake-gv-camera-0.8"
SERIAL = "SORTER14"  # not the fake's default (GV01): the tests find their own camera, not someone's leftover
W, H = 320, 240
EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "line.example.yaml"


def _genicam():  # type: ignore[no-untyped-def]
    try:
        from sorter.drivers.cameras import genicam
    except ImportError as exc:
        skip_or_fail_in_ci(f"no GenICam library: {exc}")
    return genicam


class FakeCamera:
    """Debian's fake GigE Vision camera on 127.0.0.1, started and stopped by the tests."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        genicam = _genicam()
        self.stop()
        self.proc = subprocess.Popen(
            [FAKE, "-i", "127.0.0.1", "-s", SERIAL, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"{FAKE} exited with {self.proc.returncode}: {err} (another fake on this host?)")
            if any(d.serial == SERIAL for d in genicam.discover()):
                return
            time.sleep(0.2)
        pytest.fail(f"{FAKE} -s {SERIAL} never answered discovery on 127.0.0.1")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the cable pulled: the device is gone without a goodbye
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeCamera]:
    if shutil.which(FAKE) is None:
        skip_or_fail_in_ci(f"{FAKE} missing: `make genicam` (apt-get install aravis-tools)")
    _genicam()
    cam = FakeCamera()
    cam.start()
    yield cam
    cam.stop()


@pytest.fixture
def running(fake: FakeCamera) -> FakeCamera:
    """The fake, up with default settings (a test before may have stopped it or made it lossy)."""
    if fake.proc is None or fake.proc.poll() is not None or len(fake.proc.args) > 5:  # type: ignore[arg-type]
        fake.start()
    return fake


def run_cli(*args: str) -> tuple[int, str, str]:
    from sorter.cli import app

    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def camera_cfg(stall_timeout_s: float = 1.5, **source: object) -> CameraConfig:
    src = {"device": SERIAL, "trigger": "software", "position": "timestamp", "pixel_format": "BayerRG8", **source}
    return CameraConfig(
        name="gige0",
        source=GenICamSource.model_validate(src),
        width=W,
        height=H,
        mapping=CameraMapping(centre_mm=(40.0, 0.0)),
        stall_timeout_s=stall_timeout_s,
    )


def test_discover_lists_the_fake_camera(running: FakeCamera) -> None:
    code, out, _ = run_cli("cameras", "discover", "--json")
    assert code == 0
    found = json.loads(out)
    cams = [d for d in found["genicam"] if d["serial"] == SERIAL]
    assert len(cams) == 1
    assert cams[0]["vendor"] == "Aravis" and cams[0]["model"] == "Fake" and cams[0]["address"] == "127.0.0.1"
    assert cams[0]["protocol"] == "GigEVision"


def test_grab_twenty_frames_with_software_trigger(running: FakeCamera) -> None:
    code, out, err = run_cli("cameras", "grab", "--serial", SERIAL, "--frames", "20", "--json")
    assert code == 0, err
    res = json.loads(out)
    frames = res["frames"]
    assert len(frames) == 20
    ids = [f["frame_id"] for f in frames]
    assert ids == list(range(ids[0], ids[0] + 20))  # one trigger, one frame: no gap, no repeat
    stamps = [f["timestamp_ns"] for f in frames]
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert res["lost"] == 0 and res["incomplete"] == 0
    assert res["settings"]["trigger_source"] == "Software" and res["settings"]["frame_id_bits"] == 16
    assert {f["chunks"].__len__() for f in frames} == {0}  # the fake has no chunk data


def test_grab_of_an_absent_camera_exits_2_naming_what_was_found(running: FakeCamera) -> None:
    code, _, err = run_cli("cameras", "grab", "--serial", "NO-SUCH-CAMERA", "--frames", "1")
    assert code == 2
    assert "no GenICam camera 'NO-SUCH-CAMERA' found" in err and SERIAL in err


def test_grab_of_a_busy_camera_exits_2(running: FakeCamera) -> None:
    genicam = _genicam()
    holder = genicam.GenICamDevice(SERIAL)
    holder.open()  # another controller holds the control channel
    try:
        code, _, err = run_cli("cameras", "grab", "--serial", SERIAL, "--frames", "1")
    finally:
        holder.close()
    assert code == 2 and "is busy" in err


def test_settings_the_camera_refuses_are_named(running: FakeCamera) -> None:
    genicam = _genicam()
    dev = genicam.GenICamDevice("127.0.0.1")  # by address
    dev.open()
    try:
        with pytest.raises(genicam.GenICamError, match="no chunk data"):
            dev.configure(chunks=["EncoderValue"])
        with pytest.raises(genicam.GenICamError, match="no trigger source 'Line7'"):
            dev.configure(trigger="line", trigger_line="Line7")
        with pytest.raises(genicam.GenICamError, match="refused pixel format Mono12"):
            dev.configure(pixel_format="Mono12")
        with pytest.raises(genicam.GenICamError, match="no feature 'NoSuchFeature'"):
            dev.configure(settings=["NoSuchFeature=1"])
        # an integer, a float and an enumeration written by name, in order, before the rest
        settings = ["GainRaw=3", "AcquisitionFrameRate=20.5", "TriggerSelector=FrameStart"]
        dev.configure(settings=settings, width=W, height=H, pixel_format="Mono8", exposure_us=2000.0)
        desc = dev.describe()
        assert desc["frame_rate_hz"] == pytest.approx(20.5, abs=0.01)  # the camera rounds to its period in µs
        assert desc["region"] == [0, 0, W, H] and desc["pixel_format"] == "Mono8"
        assert desc["exposure_us"] == pytest.approx(2000.0)
    finally:
        dev.close()


async def test_source_frames_through_the_capture(running: FakeCamera) -> None:
    cfg = camera_cfg()
    async with CameraCapture(cfg, QueueConfig(frames_per_camera=4), structlog.get_logger()) as cap:
        await wait_until(lambda: cap.captured >= 6, timeout=8, what="6 frames")
        frames = [await cap.get() for _ in range(4)]
    for f in frames:
        assert f.image.shape == (H, W, 3) and f.count is None and f.trigger_index is None
        assert f.t_capture <= f.t_received  # exposure before arrival: the device timestamp mapped to PC time
        assert f.t_received - f.t_capture < 0.5
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert cap.torn == 0


def test_a_size_mismatch_is_a_source_error_never_a_resized_frame() -> None:
    genicam = _genicam()
    src = genicam.GenICamCamera.from_config(camera_cfg())
    src.ids = FrameIds(16)
    image = np.zeros((H, W + 8, 3), np.uint8)  # the camera ignored the region it was given
    raw = genicam.RawFrame(7, 1_000_000, time.monotonic(), W + 8, H, "BayerRG8", image)
    with pytest.raises(SourceError, match=f"delivers {W + 8}x{H} frames but the config says {W}x{H}"):
        src._frame(raw)


async def test_a_chunk_position_on_a_camera_without_chunks_is_refused(running: FakeCamera) -> None:
    genicam = _genicam()
    src = genicam.GenICamCamera.from_config(camera_cfg(position="chunk"))
    with pytest.raises(SourceError, match="no chunk data"):
        async for _ in src.frames():
            pass


async def test_packets_dropped_on_the_wire_never_reach_the_pipeline_torn(fake: FakeCamera) -> None:
    fake.start("-r", "20")  # the fake loses 2 % of its stream packets; Aravis asks for resends
    genicam = _genicam()
    src = genicam.GenICamCamera.from_config(camera_cfg(trigger="free", position="arrival"))
    got = []
    async for frame in src.frames():
        got.append(frame)
        if len(got) >= 25:
            break
    stats = src.device.stream_stats() if src.device is not None else {}
    await src.close()  # the acquisition thread has stopped: its counters are final
    assert all(f.image.shape == (H, W, 3) for f in got)
    seqs = [f.seq for f in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # the drops happened and were handled: packets asked for again, or frames given up as torn
    assert stats["resend_requests"] > 0 or src.incomplete > 0
    # every frame the camera sent is accounted for: handed over, torn (arrived incomplete) or lost (ID gap)
    assert src.ids is not None and src.ids.first is not None and src.ids.last is not None
    ids = src.ids
    assert ids.last - ids.first + 1 == src.delivered + src.incomplete + ids.late + ids.lost
    # torn: arrived incomplete, arrived after a later frame, a duplicate, or a buffer without an ID
    assert src.torn == src.incomplete + ids.late + ids.stale + src.unidentified
    fake.start()


async def test_cable_pulled_and_back(fake: FakeCamera) -> None:
    fake.start()
    cfg = camera_cfg(stall_timeout_s=1.0, device="127.0.0.1")  # by address: no discovery round when reopening
    async with CameraCapture(cfg, QueueConfig(), structlog.get_logger()) as cap:
        await wait_until(lambda: cap.online and cap.captured >= 3, timeout=8, what="camera online")
        fake.stop()  # the cable pulled
        await wait_until(lambda: not cap.online, timeout=5, what="camera offline")
        reason = str(cap.stats()["offline_reason"])
        assert "stalled" in reason or "control channel" in reason
        await wait_until(lambda: cap.reconnects >= 1, timeout=8, what="a reconnect attempt while it is gone")
        assert not cap.online
        before = cap.captured
        fake.start()  # plugged back in
        await wait_until(lambda: cap.online and cap.captured >= before + 3, timeout=20, what="camera back online")


def test_latency_by_software_trigger(running: FakeCamera) -> None:
    genicam = _genicam()
    m = genicam.measure_latency(SERIAL, 8)
    assert m["triggers"] == 8
    assert 0 < m["arrival"]["median_ms"] < 500
    # the device timestamp, mapped on the fastest arrivals, is never later than the arrival
    assert m["timestamp"]["median_ms"] <= m["arrival"]["median_ms"] + 1e-6
    assert 0 < m["trigger_command_ms"] < 100


def test_commissioning_sees_the_camera_as_the_line_sets_it_up(running: FakeCamera, tmp_path: Path) -> None:
    from hw.cameras import free_run, genicam_facts

    text = EXAMPLE.read_text().replace("CAM0-SERIAL", SERIAL).replace("CAM1-SERIAL", "127.0.0.1")
    text = text.replace("../models/", f"{EXAMPLE.parents[1]}/models/")
    (tmp_path / "line.yaml").write_text(text)
    cfg = load_config(tmp_path / "line.yaml")
    found, facts = genicam_facts(cfg)
    assert any(d["serial"] == SERIAL for d in found)
    assert facts["cam0"]["trigger_mode"] == "On" and facts["cam0"]["trigger_source"] == "Line0"
    assert facts["cam0"]["position"] == "trigger" and facts["cam0"]["chunks_available"] is False
    assert facts["cam1"]["region"] == [0, 0, 1280, 720] and facts["cam1"]["pixel_format"] == "BayerRG8"
    assert [c.source.trigger for c in free_run(cfg).cameras] == ["free", "free"]  # type: ignore[union-attr]


def _raw(genicam, frame_id: int, chunks: dict[str, int] | None = None, ts_ns: int = 5_000_000_000):  # type: ignore[no-untyped-def]
    image = np.zeros((H, W, 3), np.uint8)
    return genicam.RawFrame(frame_id, ts_ns, time.monotonic(), W, H, "BayerRG8", image, chunks or {})


def test_chunk_counts_are_taken_to_32_bits_and_a_frame_without_one_is_torn() -> None:
    genicam = _genicam()
    src = genicam.GenICamCamera.from_config(camera_cfg(position="chunk", chunk="EncoderValue"))
    src.ids = FrameIds(64)
    frame = src._frame(_raw(genicam, 10, {"ChunkEncoderValue": (1 << 32) + 1234}))
    assert frame is not None and frame.count == 1234 and frame.seq == 10 and frame.trigger_index is None
    assert src._frame(_raw(genicam, 11, {})) is None  # no count: never placed by a guess
    assert src.torn == 1 and src.incomplete == 1


def test_trigger_counted_frames_carry_their_unwrapped_frame_id() -> None:
    genicam = _genicam()
    cfg = camera_cfg(trigger="line", position="trigger", counts_per_trigger=2400)
    src = genicam.GenICamCamera.from_config(cfg.model_copy(update={"timing_jitter_ms": None}))
    src.ids = FrameIds(16)
    got = [src._frame(_raw(genicam, fid, ts_ns=5_000_000_000 + k * 48_000_000)) for k, fid in enumerate((65535, 1, 3))]
    assert [f.trigger_index for f in got if f is not None] == [65535, 65536, 65538]
    assert [f.count for f in got if f is not None] == [None, None, None]  # the service places them on its grid
    assert src.lost == 1
    # device time mapped to PC time on the fastest arrival: never after the frame's own arrival
    assert all(f is not None and f.t_capture <= f.t_received for f in got)
