"""hw.calibrate_encoder against the simulated line: from a wrong belt.counts_per_mm to the encoder's true one.

Real time: the script reads the running belt's encoder from the PLC while the cameras see the marks pass,
and pairs the two by time; the fits alone are in tests/test_hw_fits.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hw.common import history_path
from sim.config import load_sim_config
from tests.hwsim import ROOT, simulated_line

pytestmark = pytest.mark.line

TRUE_CPM = 20.46  # the simulated encoder; the config says 20


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
