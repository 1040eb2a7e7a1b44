"""The hw/ scripts' own computations, in-process: the camera fit on a rendered target, the encoder's mark
grouping and fits, the eject scan and its plan, the chute counter's history, the magnetometer's offset fit.
The scripts against the simulated line are tests/test_hw_{camera,encoder,eject,magnetometer,plc_probe}.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hw.calibrate_camera import belt_xy, find_corners, fit_mapping
from hw.calibrate_eject import Chute, Point, Scan, ScanPlanner, calibration_config, find_edges
from hw.calibrate_encoder import Sighting, along_distance, combine, fit_camera, group_marks
from hw.calibrate_magnetometer import fit_offsets
from hw.cameras import Grabbed
from hw.common import HwError
from hw.target import ChArUcoTarget
from sim.belt import Belt
from sim.config import load_sim_config
from sim.hallbar import SimHallBar
from sim.render import FrameRenderer
from sim.target import SimTarget
from sorter.config import CameraConfig, CameraMapping, SimCameraSource
from sorter.core.geometry import CameraGeometry
from sorter.core.messages import Decision, Frame, Piece

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


# --- hw.calibrate_camera ---


def test_the_fit_finds_a_camera_from_the_target_it_renders() -> None:
    """In-process, no simulator: the target drawn through a true geometry, found and fitted back."""
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    cam, spec = cfg.cameras[1], ChArUcoTarget()
    truth = CameraGeometry(cam.width, cam.height, (441.8, -1.1), 0.2521, -0.45)
    renderer = FrameRenderer(truth, noise_sigma=3.0, seed=1)
    renderer.underlay = SimTarget(spec, x_mm=15.0, y_mm=0.0, angle_deg=0.0, laid_at_mm=0.0).for_camera(truth)
    frames = []
    for seq in range(3):
        image = np.empty((cam.height, cam.width, 3), np.uint8)
        renderer.render([], 0.0, image)
        frames.append(Frame(cam.name, seq, image, 0.0, None, 0.0))
    corners = find_corners(Grabbed(cam, 1, frames=frames), spec)
    ids = list(corners)
    fit = fit_mapping(cam, 1, np.array([corners[i] for i in ids]), belt_xy(spec, ids, 15.0, 0.0))
    g = fit.geometry
    assert abs(g.mm_per_px / truth.mm_per_px - 1) < 1e-4 and abs(g.rotation_deg - truth.rotation_deg) < 0.01
    assert (
        math.dist(g.centre_mm, truth.centre_mm) < 0.02
        and fit.rms_mm < 0.03
        and fit.aspect == pytest.approx(1, abs=1e-3)
    )
    assert fit.sigma_mm_per_px < 1e-5  # the fit's own uncertainty is tiny: placement dominates on a plant


# --- hw.calibrate_encoder ---


def _cam(rotation_deg: float = 0.0) -> CameraConfig:
    return CameraConfig(
        name="c",
        source=SimCameraSource(address="127.0.0.1:1"),
        mapping=CameraMapping(centre_mm=(0.0, 0.0), mm_per_px=0.25, rotation_deg=rotation_deg),
    )


def test_two_dots_give_counts_between_them_from_rows_and_counts() -> None:
    cpm, mpp, d = 20.5, 0.25, 300.0
    b = 1 / (mpp * cpm)  # rows per count of the true belt
    pts = []
    for k, s0 in enumerate((0.0, d)):  # the second dot crosses d mm of travel later
        for c in range(0, 4 * 850, 850):
            count = int(1000 + s0 * cpm + c)
            pts.append(Sighting(count, 640.0 + 0.01 * k, 100 + b * (count - 1000 - s0 * cpm) + 0.02 * (-1) ** c))
    groups = group_marks(pts, 1 / (mpp * 20.0), d * 20.0)  # sorted with the config's (wrong) 20 counts/mm
    assert sorted(groups) == [0, 1] and all(len(g) == 4 for g in groups.values())
    r = fit_camera("c", _cam(), groups)
    assert r is not None and r.steps == 1
    assert r.counts / d == pytest.approx(cpm, rel=1e-4)
    assert 0 < r.sigma < 5


def test_marks_at_the_wrong_spacing_are_refused() -> None:
    pts = [Sighting(c, 640, 100) for c in (0, 10, 20)] + [Sighting(c, 640, 100) for c in (9000, 9010)]
    with pytest.raises(HwError, match="spacings apart"):
        group_marks(pts, 0.2, 6000.0)  # 1.5 spacings: not the target described


def test_askew_strip_and_rotated_camera_correction() -> None:
    assert along_distance(300, 1, 0.0, 0.0, True) == 300
    assert along_distance(300, 1, 30.0, 0.0, True) == pytest.approx(math.sqrt(300**2 - 30**2))
    assert along_distance(300, 1, 30.0, 1.0, True) > along_distance(300, 1, 30.0, 0.0, True)
    assert along_distance(3000, 2, 5.0, 1.0, False) == 6000


def test_cameras_that_disagree_widen_the_uncertainty() -> None:
    mean, sigma = combine([20.0, 20.0], [0.01, 0.01])
    assert mean == 20.0 and sigma == pytest.approx(0.01 / math.sqrt(2))
    _, wide = combine([20.0, 20.1], [0.01, 0.01])
    assert wide > 0.05


# --- hw.calibrate_eject ---


def _hits(offset: float, centre: float = 9.0, half: float = 5.6) -> float:
    return 1.0 if abs(offset - centre) <= half else 0.0


def test_the_scan_goes_coarse_then_fine_and_centres_on_the_plateau() -> None:
    scan = Scan(centre_ms=4.0, range_ms=15.0)
    assert scan.queue[0] == -11.0 and scan.queue[-1] == 19.0  # below 0 too: the offset only plans
    while not scan.done:
        offset = scan.next_offset()
        assert offset is not None
        scan.result(offset, round(6 * _hits(offset)), 6)
    assert scan.stage == "fine" and len(scan.points) > 10
    edges = find_edges(scan.points)
    assert edges.centre == pytest.approx(9.0, abs=0.3)
    assert edges.half_width == pytest.approx(5.6, abs=0.3)
    assert 0 < edges.sigma < 0.3


def test_a_plateau_at_the_end_of_the_range_asks_for_a_wider_scan() -> None:
    points = [Point(x, 6 if x >= 10 else 0, 6) for x in (6.0, 8.0, 10.0, 12.0)]
    with pytest.raises(HwError, match="outside the scan"):
        find_edges(points)
    with pytest.raises(HwError, match="hit more than"):
        find_edges([Point(x, 1, 6) for x in (6.0, 8.0, 10.0)])


def test_an_offset_where_nothing_was_ejected_is_tried_again() -> None:
    scan = Scan(centre_ms=4.0, range_ms=4.0)
    first = scan.next_offset()
    assert first is not None
    scan.result(first, 0, 0)
    assert scan.next_offset() == first


def _decision(pid: int, u_mm: float, fraction: str = "ndfeb") -> Decision:
    u = u_mm * 20
    piece = Piece(pid, u, u - 200, u + 200, 300.0, 290.0, 310.0, 314.0, ("cam0",), 3)
    return Decision(piece, {}, "ndfeb", 1.0, fraction)


def test_groups_of_pieces_each_get_one_offset_and_stay_apart_on_the_belt() -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    cal = calibration_config(cfg, 0, Path("unused.sqlite"))
    assert set(cal.routing.classes.values()) == {"ndfeb"} and cal.ejection.margin_lead_mm == 0
    scan = Scan(centre_ms=4.0, range_ms=4.0)  # offsets 0, 2, 4, 6, 8
    planner = ScanPlanner(cal, 0, size=3, gap_mm=400, scan=scan)
    assert planner.plan([_decision(0, 0)], speed_mm_s=0.0)[0].command is None  # no speed: no group ...
    assert scan.queue[0] == 0.0 and not planner.groups  # ... and its offset is still to be tried
    # a stream 100 mm apart: 3 ejected, then pieces let through until 400 mm after the last ejected one
    plans = planner.plan([_decision(i, 100.0 * i) for i in range(1, 12)], speed_mm_s=2500.0)
    ejected = [p.decision.piece.id for p in plans if p.command is not None]
    assert ejected == [1, 2, 3, 7, 8, 9] and planner.skipped == 5
    assert [(g.offset_ms, g.pieces) for g in planner.groups] == [(0.0, [1, 2, 3]), (2.0, [7, 8, 9])]
    # the whole air window moves with the offset: 2 ms at 2.5 m/s is 5 mm = 100 counts earlier
    first, second = plans[0].command, planner.at(2.0).plan([_decision(1, 100.0)], 2500.0)[0].command
    assert first is not None and second is not None
    assert first.open_at - second.open_at == 100 and first.open_for == second.open_for
    assert planner.plan([_decision(99, 5000.0, fraction="residue")], 2500.0)[0].command is None  # not routed


def test_the_chute_counter_is_read_as_of_a_belt_position_across_its_wrap() -> None:
    chute = Chute(bank=0, banks=2)
    for count, raw in ((100, 65534), (200, 65535), (200, 0), (300, 2)):
        chute.add(count, raw)
    # the first reading taken once the belt was there; the belt standing still keeps the newest value
    assert chute.at(50) == 0 and chute.at(150) == 2 and chute.at(200) == 2 and chute.at(250) == 4
    assert chute.at(301) is None


# --- hw.calibrate_magnetometer ---


def test_the_peak_hold_fit_recovers_the_offsets_a_median_misses(tmp_path: Path) -> None:
    """Zero-field lines of the simulated board: each value is the peak of ~10-15 noisy samples."""
    bar = SimHallBar(
        load_sim_config(ROOT / "config" / "sim.yaml"), Belt(20.0, 2500.0), tuple, tmp_path / "bar.tty", seed=5
    )
    rng = np.random.default_rng(0)
    values = np.array([bar.readings(0.0, 0.0, rng.uniform(0.0105, 0.015)) for _ in range(400)])
    fit = fit_offsets(values)
    err = np.abs(fit.offsets - bar.true_offsets_mT)
    naive = np.abs(np.median(values, axis=0) - bar.true_offsets_mT)
    print(f"offset error max {err.max():.3f} mT (se max {fit.se.max():.3f}); plain median's {naive.max():.2f} mT")
    assert err.max() < 0.25
    assert naive.max() > 1.0  # why the model is needed
    assert fit.sigma == pytest.approx(bar.hb.noise_mT, rel=0.15)
