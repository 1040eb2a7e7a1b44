"""hw.calibrate_encoder against the simulated line: from a wrong belt.counts_per_mm to the encoder's true one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hw.calibrate_encoder import Sighting, along_distance, combine, fit_camera, group_marks
from hw.common import HwError, history_path
from sim.config import load_sim_config
from sim.demo import free_port
from sorter.config import CameraConfig, CameraMapping, SimCameraSource
from tests.hwsim import ROOT, simulated_line, write_config

TRUE_CPM = 20.46  # the simulated encoder; the config says 20


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


@pytest.mark.slow
async def test_counts_per_mm_recovered_from_a_target_on_the_belt(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    assert cfg.simulator is not None and cfg.belt.counts_per_mm == 20
    cfg = cfg.model_copy(update={"simulator": cfg.simulator.model_copy(update={"encoder_counts_per_mm": TRUE_CPM})})
    async with simulated_line(tmp_path, cfg, hallbar=False) as line:
        # the technician lays a strip with two dots 300 mm apart (slightly askew) under both cameras
        await line.send(cmd="encoder_target", distance_mm=300, x_mm=292, angle_deg=1.0)
        done = await line.script("calibrate_encoder", "--distance-mm", "300", timeout=60)
    assert done.returncode == 0, done.stderr
    found = load_sim_config(line.config).belt.counts_per_mm
    print(f"counts/mm: true {TRUE_CPM}, found {found} ({1e6 * (found - TRUE_CPM) / TRUE_CPM:+.0f} ppm)")
    print(done.stderr)
    assert found == pytest.approx(TRUE_CPM, rel=0.002)
    (entry,) = [json.loads(x) for x in history_path(line.config).read_text().splitlines()]
    assert entry["changes"][0]["old"] == 20 and set(entry["measured"]["cameras"]) == {"cam0", "cam1"}


@pytest.mark.slow
async def test_counts_per_mm_recovered_from_a_mark_on_the_belt_loop(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    assert cfg.simulator is not None
    cfg = cfg.model_copy(update={"simulator": cfg.simulator.model_copy(update={"encoder_counts_per_mm": TRUE_CPM})})
    async with simulated_line(tmp_path, cfg, hallbar=False) as line:
        await line.send(cmd="belt_mark", belt_length_mm=2500, x_mm=150)
        done = await line.script("calibrate_encoder", "--belt-length-mm", "2500", "--passes", "2", timeout=60)
    assert done.returncode == 0, done.stderr
    found = load_sim_config(line.config).belt.counts_per_mm
    print(f"counts/mm (belt loop): true {TRUE_CPM}, found {found}")
    assert found == pytest.approx(TRUE_CPM, rel=0.002)


def test_no_plc_is_a_clear_message(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    config = write_config(
        cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"port": free_port()})}), tmp_path / "line.yaml"
    )
    before = config.read_text()
    done = subprocess.run(
        [sys.executable, "-m", "hw.calibrate_encoder", "--config", str(config), "--yes", "--distance-mm", "300"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "PLC at 127.0.0.1:" in done.stderr and "not reachable" in done.stderr and "check:" in done.stderr
    assert "Traceback" not in done.stderr and config.read_text() == before
