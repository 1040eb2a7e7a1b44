"""hw.calibrate_eject against the simulated line: from a wrong valve delay to the valves' true timing.

Real time: the delay is found from test pieces blown (or not) on the running belt and counted in the chutes;
the scan's logic alone is in tests/test_hw_fits.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hw.common import history_path
from sim.config import load_sim_config
from tests.hwsim import ROOT, simulated_line

pytestmark = pytest.mark.line

TRUE_OPEN_MS, TRUE_CLOSE_MS = 9.0, 8.0  # the simulated valves: 5 ms slower than the config's 4 / 3 ms


async def test_valve_delay_recovered_from_test_pieces_and_chute_counts(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    assert cfg.simulator is not None and cfg.ejection.valve_open_delay_ms == 4.0
    sim = cfg.simulator.model_copy(
        update={"valve_open_delay_ms": TRUE_OPEN_MS, "valve_close_delay_ms": TRUE_CLOSE_MS, "speed_drift": 0.02}
    )
    cfg = cfg.model_copy(update={"simulator": sim})
    async with simulated_line(tmp_path, cfg, hallbar=False) as line:
        # the technician lays out the test pieces: 20 mm NdFeB discs, 6 to a group, a gap between groups
        st = await line.send(cmd="test_pieces", n=240, group=6, spacing_mm=100, gap_mm=500, upstream_mm=2500)
        assert st["fed"] == 240
        done = await line.script("calibrate_eject", "--pieces", "6", "--gap-mm", "400", timeout=85)
        st = await line.send(cmd="status")
    assert done.returncode == 0, done.stderr
    found = load_sim_config(line.config).ejection
    print(done.stderr)
    print(f"valve open delay: true {TRUE_OPEN_MS}, found {found.valve_open_delay_ms} ms; chutes {st['plc']['chutes']}")
    assert found.valve_open_delay_ms == pytest.approx(TRUE_OPEN_MS, abs=1.0)
    assert found.valve_close_delay_ms == pytest.approx(TRUE_CLOSE_MS, abs=1.0)
    (entry,) = [json.loads(x) for x in history_path(line.config).read_text().splitlines()]
    assert entry["changes"][0]["key"] == "ejection.valve_open_delay_ms" and entry["changes"][0]["old"] == 4.0
    assert math.isfinite(entry["residuals"]["sigma_ms"]) and entry["residuals"]["sigma_ms"] < 1.0
