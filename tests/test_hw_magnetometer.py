"""hw.calibrate_magnetometer: offsets and gains of the Hall bar recovered from the simulated bar's true errors;
a missing or babbling serial port is a clear message, not a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import tty
from pathlib import Path

import numpy as np
import pytest

from hw.calibrate_magnetometer import fit_offsets
from sim.belt import Belt
from sim.config import load_sim_config
from sim.hallbar import SimHallBar
from sorter.config import LineConfig
from tests.hwsim import ROOT, simulated_line, write_config

REFERENCE_MT = 300.0


def sim_yaml() -> LineConfig:
    return load_sim_config(ROOT / "config" / "sim.yaml")


def test_the_peak_hold_fit_recovers_the_offsets_a_median_misses(tmp_path: Path) -> None:
    """Zero-field lines of the simulated board: each value is the peak of ~10-15 noisy samples."""
    bar = SimHallBar(sim_yaml(), Belt(20.0, 2500.0), tuple, tmp_path / "bar.tty", seed=5)
    rng = np.random.default_rng(0)
    values = np.array([bar.readings(0.0, 0.0, rng.uniform(0.0105, 0.015)) for _ in range(400)])
    fit = fit_offsets(values)
    err = np.abs(fit.offsets - bar.true_offsets_mT)
    naive = np.abs(np.median(values, axis=0) - bar.true_offsets_mT)
    print(f"offset error max {err.max():.3f} mT (se max {fit.se.max():.3f}); plain median's {naive.max():.2f} mT")
    assert err.max() < 0.25
    assert naive.max() > 1.0  # why the model is needed
    assert fit.sigma == pytest.approx(bar.hb.noise_mT, rel=0.15)


def run(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hw.calibrate_magnetometer", "--config", str(config), "--yes", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def config_with_port(tmp_path: Path, port: str) -> Path:
    cfg = sim_yaml()
    assert cfg.magnetometer is not None
    cfg = cfg.model_copy(update={"magnetometer": cfg.magnetometer.model_copy(update={"port": port})})
    return write_config(cfg, tmp_path / "line.yaml")


def test_a_missing_port_is_named(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB9")
    config = config_with_port(tmp_path, port)
    before = config.read_text()
    res = run(config, "--reference-mT", "300")
    assert res.returncode == 2, res.stderr
    assert f"cannot open the Hall bar's serial port {port}" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr and config.read_text() == before


def test_a_port_answering_garbage_is_named(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    port = os.ttyname(slave)
    config = config_with_port(tmp_path, port)
    stop = threading.Event()

    def babble() -> None:  # another device, or the bar at the wrong baud rate
        rng = random.Random(1)
        os.set_blocking(master, False)
        while not stop.wait(0.01):
            junk = bytes(rng.choice(b"$*,0123456789ABCDEFHB\r\n\x00\xff~") for _ in range(64))
            with contextlib.suppress(BlockingIOError):  # nobody reads yet: a serial line's bytes go nowhere too
                os.write(master, junk)

    writer = threading.Thread(target=babble, daemon=True)
    writer.start()
    try:
        res = run(config, "--reference-mT", "300")
    finally:
        stop.set()
        writer.join()
        os.close(master)
        os.close(slave)
    text = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr
    assert f"the device on {port} sends no valid Hall-bar data line" in text
    assert "baudrate" in text and "Traceback" not in res.stderr


@pytest.mark.slow
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
