"""hw.calibrate_magnetometer: offsets and gains of the Hall bar recovered from the simulated bar's true errors.

Real time: the script reads the simulated bar's serial line while the technician (the test) slides the
reference magnet along it. A missing or babbling port is tests/test_hw_wire.py, the offset fit alone
tests/test_hw_fits.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.config import load_sim_config
from sorter.config import LineConfig
from tests.hwsim import ROOT, simulated_line

pytestmark = pytest.mark.line

REFERENCE_MT = 300.0


def sim_yaml() -> LineConfig:
    return load_sim_config(ROOT / "config" / "sim.yaml")


async def test_offsets_and_gains_recovered_from_the_simulated_bar(tmp_path: Path) -> None:
    cfg = sim_yaml()
    assert cfg.simulator is not None and cfg.magnetometer is not None
    assert cfg.magnetometer.offsets_mT is None and cfg.magnetometer.gains is None  # the config knows nothing yet
    hb = cfg.simulator.hallbar.model_copy(update={"offset_sigma_mT": 3.0, "gain_sigma": 0.05})
    cfg = cfg.model_copy(update={"simulator": cfg.simulator.model_copy(update={"hallbar": hb})})
    async with simulated_line(tmp_path, cfg) as line:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hw.calibrate_magnetometer",
            "--config",
            str(line.config),
            "--yes",
            "--reference-mT",
            str(REFERENCE_MT),
            "--seconds",
            "4",
            "--timeout",
            "30",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stderr is not None
        head = []
        # the technician reads the prompt, then slides the magnet along the bar
        while True:
            raw = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            head.append(raw)
            assert raw, "".join(head)
            if "pass the reference magnet" in raw:
                break
        answer = await line.send(cmd="ref_magnet", field_mT=REFERENCE_MT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        stderr = "".join(head) + err.decode()
    assert proc.returncode == 0, stderr
    truth = answer["ref_magnet"]
    assert isinstance(truth, dict)
    true_offsets, true_gains = np.array(truth["true_offsets_mT"]), np.array(truth["true_gains"])
    mag = load_sim_config(line.config).magnetometer
    assert mag is not None and mag.offsets_mT is not None and mag.gains is not None
    offset_err = np.abs(np.array(mag.offsets_mT) - true_offsets)
    gain_err = np.abs(np.array(mag.gains) * true_gains - 1.0)  # the service multiplies: config gain = 1 / true
    print(
        f"offsets: true spread {true_offsets.std():.2f} mT, error max {offset_err.max():.3f} mT; "
        f"gains: true spread {true_gains.std():.3f}, error max {100 * gain_err.max():.2f} %"
    )
    assert offset_err.max() < 0.5
    assert gain_err.max() < 0.02
    assert "written" in stderr and "offsets_mT" in stderr and "gains" in stderr  # the diff was shown
