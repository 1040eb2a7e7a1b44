"""Belt position of camera frames (issue 14): frame-ID unwrapping, the trigger grid, the device-timestamp map,
pixel conversion, and the config's refusal of a camera too imprecise for the eject margins. Pure logic."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sorter.config import CameraConfig, CameraMapping, ConfigError, GenICamSource, OpenCVSource, load_config
from sorter.config.precision import error_mm, method_of, position_errors, position_report
from sorter.core.clock import ClockModel
from sorter.core.messages import Frame
from sorter.core.position import COUNT_MODULUS, FrameIds, FramePlacer, TimestampMap, TriggerGrid, wrap32
from sorter.drivers.cameras.pixels import to_bgr

pytestmark = pytest.mark.fast

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "line.example.yaml"


# --- frame IDs ---


def test_gige_v1_block_ids_wrap_past_65535_to_1_without_a_gap() -> None:
    ids = FrameIds(16)
    got = [ids.add(raw) for raw in (65533, 65534, 65535, 1, 2)]
    assert got == [65533, 65534, 65535, 65536, 65537]
    assert ids.lost == 0


def test_a_gap_across_the_wrap_counts_the_frames_lost() -> None:
    ids = FrameIds(16)
    ids.add(65534)
    assert ids.add(2) == 65534 + 3  # 65535 and 1 never arrived
    assert ids.lost == 2


def test_duplicate_and_old_ids_are_stale_not_progress() -> None:
    ids = FrameIds(16)
    ids.add(100)
    ids.add(101)
    assert ids.add(101) is None
    assert ids.add(90) is None
    assert ids.stale == 2 and ids.lost == 0 and ids.last == 101


def test_a_frame_arriving_after_a_later_one_is_late_not_lost() -> None:
    ids = FrameIds(16)
    ids.add(65534)
    ids.add(2)  # 65535 and 1 not (yet) here
    assert ids.lost == 2
    assert ids.add(65535) is None  # turns up after all: not passed on (out of order), no longer lost
    assert (ids.lost, ids.late, ids.stale) == (1, 1, 0)
    assert ids.add(65535) is None
    assert (ids.lost, ids.late, ids.stale) == (1, 1, 1)


def test_block_id_zero_is_refused_in_gige_v1() -> None:
    with pytest.raises(ValueError, match="reserved"):
        FrameIds(16).add(0)


@given(
    bits=st.sampled_from([16, 64]),
    start=st.integers(min_value=1, max_value=65535),
    steps=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=200),
)
def test_unwrapped_ids_follow_the_frames_sent_and_count_every_gap(bits: int, start: int, steps: list[int]) -> None:
    period = 65535 if bits == 16 else 1 << 64
    ids = FrameIds(bits)
    assert ids.add(start) == start
    sent = start
    for step in steps:
        sent += step
        raw = (sent - 1) % period + 1 if bits == 16 else sent % period
        assert ids.add(raw) == sent
    assert ids.lost == sum(s - 1 for s in steps)


# --- the trigger grid ---


def test_trigger_counted_count_is_first_count_plus_ids_times_step_and_wraps_at_32_bits() -> None:
    grid = TriggerGrid(step=2400, phase=100)
    first = COUNT_MODULUS - 5000 + 100 - (COUNT_MODULUS - 5000) % 2400  # a grid point just below the wrap
    assert grid.place(7, first + 30.0) == first  # anchored on the grid point nearest the estimate
    later = grid.place(12, None)
    assert later == first + 5 * 2400
    assert later is not None and later >= COUNT_MODULUS  # past the 32-bit wrap: unwrapped, never folded back
    assert wrap32(later) == (first + 12000) - COUNT_MODULUS


def test_a_frame_id_gap_keeps_later_frames_on_their_counts() -> None:
    grid = TriggerGrid(step=1000)
    grid.place(1, 50_000.0)
    # frames 2 and 3 lost on the wire: their IDs are skipped, so frame 4 is still 3 steps on
    assert grid.place(4, 53_000.0 + 400) == 53_000
    assert grid.slips == 0


def test_a_missed_trigger_is_detected_and_does_not_shift_every_later_frame() -> None:
    grid = TriggerGrid(step=1000)
    grid.place(10, 10_000.0)
    assert grid.place(11, 11_000.0) == 11_000
    # the camera ignored the trigger at 12 000 (still exposing): no frame ID for it, the next frame (ID 12)
    # was exposed at 13 000; counting IDs alone would say 12 000. One frame cannot tell a missed trigger
    # from a bad estimate: it is not placed
    assert grid.place(12, 13_000.0 + 300) is None
    assert grid.doubtful == 1 and grid.slips == 0
    # the next one says the same: the grid follows
    assert grid.place(13, 14_000.0 - 250) == 14_000
    assert grid.slips == 1
    assert grid.place(14, None) == 15_000
    assert grid.place(15, 16_000.0 + 100) == 16_000


def test_one_outlying_estimate_leaves_the_grid_alone() -> None:
    grid = TriggerGrid(step=1000)
    grid.place(0, 0.0)
    assert grid.place(1, 1000.0 + 2200) is None  # a PC hiccup: the estimate is 2.2 steps off
    assert grid.place(2, 2000.0 + 100) == 2000
    assert grid.place(3, 3000.0) == 3000
    assert (grid.slips, grid.doubtful) == (0, 1)


def test_a_wrong_first_anchor_is_corrected_after_two_frames() -> None:
    grid = TriggerGrid(step=1000)
    assert grid.place(0, 1000.0 + 520) == 2000  # an outlier at anchoring time snaps to the wrong point
    assert grid.place(1, 2000.0) is None
    assert grid.place(2, 3000.0) == 3000
    assert grid.slips == 1


def test_frame_ids_that_restart_re_anchor_the_grid() -> None:
    grid = TriggerGrid(step=1000)
    grid.place(500, 9_000.0)
    assert grid.place(1, 42_100.0) == 42_000  # a reconnect: IDs start over
    assert grid.slips == 0


def test_no_anchor_without_an_estimate() -> None:
    assert TriggerGrid(step=1000).place(3, None) is None


@settings(max_examples=200)
@given(
    step=st.integers(min_value=2, max_value=100_000),
    phase=st.integers(min_value=0, max_value=10**6),
    first_k=st.integers(min_value=-(10**6), max_value=10**6),
    gaps=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=50),
    noise=st.lists(st.floats(min_value=-0.49, max_value=0.49), min_size=51, max_size=51),
)
def test_estimates_within_half_a_step_never_slip_and_give_exact_counts(
    step: int, phase: int, first_k: int, gaps: list[int], noise: list[float]
) -> None:
    grid = TriggerGrid(step=step, phase=phase)
    index, k = 0, first_k
    truth = phase % step + k * step
    assert grid.place(index, truth + noise[0] * step) == truth
    for gap, n in zip(gaps, noise[1:], strict=False):
        index += gap
        truth += gap * step
        assert grid.place(index, truth + n * step) == truth
    assert grid.slips == 0


# --- device timestamps ---


def test_timestamp_map_sits_on_the_fastest_delivery() -> None:
    tmap = TimestampMap(window_s=10.0)
    offset = 1000.0  # PC monotonic = device + 1000 s, plus each frame's delivery delay
    delays = [0.012, 0.004, 0.030, 0.004, 0.020]
    for i, d in enumerate(delays):
        tmap.add(i * 0.1, i * 0.1 + offset + d)
    assert tmap.to_pc(1.0) == pytest.approx(1.0 + offset + 0.004)


def test_timestamp_map_forgets_old_deliveries_so_drift_is_followed() -> None:
    tmap = TimestampMap(window_s=1.0)
    tmap.add(0.0, 100.001)  # a fast early one
    for i in range(1, 40):
        tmap.add(i * 0.1, 100.0 + i * 0.1 + 0.003)
    assert tmap.to_pc(4.0) == pytest.approx(104.003)


# --- pixels ---


def test_bayer_rg_red_scene_debayers_to_red() -> None:
    h, w = 8, 8
    mosaic = np.zeros((h, w), np.uint8)
    mosaic[0::2, 0::2] = 200  # R sites of an RGGB (GenICam BayerRG8) mosaic of a red scene
    img = to_bgr(mosaic.tobytes(), w, h, "BayerRG8")
    assert img.shape == (h, w, 3)
    b, g, r = img[2:6, 2:6].reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 30 and b < 30


def test_bayer_bg_blue_scene_debayers_to_blue() -> None:
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[0::2, 0::2] = 200  # B sites of a BGGR mosaic
    b, g, r = to_bgr(mosaic.tobytes(), 8, 8, "BayerBG8")[2:6, 2:6].reshape(-1, 3).mean(axis=0)
    assert b > 150 and g < 30 and r < 30


def test_rgb8_becomes_bgr_and_mono_grey() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 255
    assert to_bgr(rgb.tobytes(), 3, 2, "RGB8")[0, 0].tolist() == [0, 0, 255]
    assert to_bgr(bytes([7] * 6), 3, 2, "Mono8")[1, 2].tolist() == [7, 7, 7]


def test_a_short_payload_is_an_error_not_a_torn_image() -> None:
    with pytest.raises(ValueError, match="needs 48 bytes"):
        to_bgr(bytes(40), 4, 4, "RGB8")
    with pytest.raises(ValueError, match="not supported"):
        to_bgr(bytes(16), 4, 4, "Mono12")


# --- the precision check ---


@pytest.mark.parametrize(
    ("method", "speed", "expected"),
    [
        ("chunk", 2500, 0.075),
        ("trigger", 3500, 0.085),
        ("timestamp", 2500, 5.05),
        ("timestamp", 3500, 7.05),
        ("arrival", 2500, 62.55),
        ("arrival", 3500, 87.55),
    ],
)
def test_expected_error_of_each_method(method: str, speed: float, expected: float) -> None:
    assert error_mm(method, speed, counts_per_mm=20) == pytest.approx(expected)


def test_the_plant_example_passes_with_trigger_counted_cameras() -> None:
    cfg = load_config(EXAMPLE)
    assert [method_of(c) for c in cfg.cameras] == ["trigger", "trigger"]
    assert all(r["ok"] for r in position_report(cfg))
    assert position_errors(cfg) is None


def _example_with(tmp_path: Path, source: str, speed: int = 2500) -> Path:
    text = EXAMPLE.read_text()
    text = re.sub(r"    source:\n(      .*\n)+", f"    source: {source}\n", text)
    text = text.replace("nominal_speed_mm_s: 2500", f"nominal_speed_mm_s: {speed}")
    text = text.replace("../models/", f"{EXAMPLE.parents[1]}/models/")
    path = tmp_path / "line.yaml"
    path.write_text(text)
    return path


def test_an_rtsp_camera_at_2_5_m_s_is_refused_naming_camera_method_and_numbers(tmp_path: Path) -> None:
    path = _example_with(tmp_path, '{type: opencv, uri: "rtsp://192.168.10.31/stream1"}')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    first = msg.splitlines()[0]
    assert first.startswith(f"{path}: cameras[0].source (line ")
    assert "camera `cam0`" in first and "`arrival`" in first
    assert "±62.5 mm" in first and "2500 mm/s" in first and "eject margin of 3 mm" in first
    assert "camera `cam1`" in msg.splitlines()[1]


def test_a_measured_jitter_lets_a_good_timestamp_camera_through(tmp_path: Path) -> None:
    src = "{type: genicam, device: X, trigger: line, position: timestamp}"
    with pytest.raises(ConfigError, match=r"`timestamp`.*±5\.0 mm"):
        load_config(_example_with(tmp_path, src))
    text = (
        _example_with(tmp_path, src)
        .read_text()
        .replace("    width: 1280\n", "    width: 1280\n    timing_jitter_ms: 0.5\n")
    )
    (tmp_path / "line.yaml").write_text(text)
    assert load_config(tmp_path / "line.yaml").cameras[0].timing_jitter_ms == 0.5


def test_a_trigger_step_too_fine_to_anchor_is_refused(tmp_path: Path) -> None:
    src = "{type: genicam, device: X, position: trigger, counts_per_trigger: 150}"
    with pytest.raises(ConfigError, match=r"counts_per_trigger.*too fine to anchor"):
        load_config(_example_with(tmp_path, src))


def test_genicam_source_rules() -> None:
    with pytest.raises(ValueError, match="needs counts_per_trigger"):
        GenICamSource(device="X", position="trigger")
    with pytest.raises(ValueError, match="needs trigger `line`"):
        GenICamSource(device="X", position="trigger", counts_per_trigger=100, trigger="free")
    with pytest.raises(ValueError, match="not `Name=Value`"):
        GenICamSource(device="X", position="chunk", settings=["CounterSelector"])
    cam = CameraConfig(
        name="c",
        source=GenICamSource(device="X", position="chunk", chunk="CounterValue"),
        mapping=CameraMapping(centre_mm=(0, 0)),
    )
    assert method_of(cam) == "chunk"
    assert method_of(cam.model_copy(update={"source": OpenCVSource(uri=0)})) == "arrival"


def test_a_misspelt_genicam_key_names_its_path_and_line(tmp_path: Path) -> None:
    path = _example_with(tmp_path, "{type: genicam, device: X, positon: chunk}")
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.source\.positon \(line \d+\)"):
        load_config(path)


# --- the service's placement of frames (FramePlacer, with a real clock model fed by hand) ---

RATE = 50_000.0  # counts/s: 2.5 m/s at 20 counts/mm


def belt_clock(c0: int = COUNT_MODULUS - 30_000) -> ClockModel:
    """A clock model locked on a belt at RATE, its count starting just below the 32-bit wrap."""
    clock = ClockModel()
    for i in range(60):
        t = i * 0.02
        clock.add(t - 0.0005, t + 0.0005, round(c0 + RATE * t) % COUNT_MODULUS)
    assert clock.ready
    return clock


def frame(camera: str, t: float, count: int | None = None, index: int | None = None) -> Frame:
    return Frame(camera, index or 0, np.zeros((1, 1, 3), np.uint8), t, count, t + 0.01, index)


def test_trigger_counted_frames_land_exactly_on_the_grid_across_the_32_bit_wrap() -> None:
    c0 = COUNT_MODULUS - 30_000
    clock = belt_clock(c0)
    step = 2400
    placer = FramePlacer({"cam0": TriggerGrid(step, phase=0)}, set(), 1400.0)
    # the camera fired at every grid count the belt passed; frame k at count g0 + k*step
    g0 = (c0 // step + 10) * step
    for k in range(20):
        true = g0 + k * step
        t = (true - c0) / RATE + 0.002  # the frame's time is 2 ms off (its timestamp's error)
        count, event = placer.place(frame("cam0", t, index=65530 + k), clock, None)
        assert count == true and event is None
    assert g0 + 19 * step > COUNT_MODULUS  # the run crossed the 32-bit wrap, counts stayed unwrapped


def test_a_missed_trigger_costs_one_unplaced_frame_and_is_logged_as_a_slip() -> None:
    c0 = 0
    clock = belt_clock(c0)
    placer = FramePlacer({"cam0": TriggerGrid(1000)}, set(), 1400.0)
    exposures = [10_000, 11_000, 13_000, 14_000, 15_000]  # the trigger at 12 000 was ignored
    got = [placer.place(frame("cam0", (c - c0) / RATE, index=i + 1), clock, None) for i, c in enumerate(exposures)]
    assert got == [(10_000, None), (11_000, None), (None, "doubtful"), (14_000, "slipped"), (15_000, None)]


def test_a_chunk_count_out_of_step_with_the_plc_is_not_placed() -> None:
    clock = belt_clock(0)
    placer = FramePlacer({}, {"cam0"}, tolerance=70 * 20)
    t = 0.5
    assert placer.place(frame("cam0", t, count=25_000 + 30), clock, None) == (25_030, None)
    # a camera counter that started at power-up, 1.2 m of belt away from the PLC's count
    assert placer.place(frame("cam0", t, count=25_000 - 24_000), clock, None) == (None, "chunk_mismatch")
    assert placer.mismatches == {"cam0": 1}
    # the simulator's latched counts (not chunk cameras) are taken as they are
    assert placer.place(frame("sim0", t, count=1000), clock, None) == (1000, None)


def test_frames_without_a_count_go_through_the_clock_model() -> None:
    placer = FramePlacer({}, set(), 1.0)
    assert placer.place(frame("cam0", 0.5), ClockModel(), None) == (None, None)  # no clock yet: unplaced
    assert placer.place(frame("cam0", 0.5), belt_clock(0), None) == (25_000, None)


def test_the_service_refuses_to_start_with_a_camera_too_imprecise() -> None:
    from sorter.app import build_line

    cfg = load_config(EXAMPLE)
    cams = [c.model_copy(update={"source": OpenCVSource(uri="rtsp://192.168.10.31/stream1")}) for c in cfg.cameras]
    with pytest.raises(ConfigError) as err:
        build_line(cfg.model_copy(update={"cameras": cams}))  # refused before anything is opened
    text = str(err.value)
    assert text.startswith("cameras too imprecise for the eject margins")
    assert "cameras[0].source: camera `cam0`: position method `arrival`" in text and "±62.5 mm" in text
