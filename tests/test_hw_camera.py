"""hw.camera_check and hw.calibrate_camera, run unattended against the simulated line.

Real time: the scripts grab the simulated cameras' streams as they come, and the check judges their frame
rate and delay; the fit itself is tested in-process in tests/test_hw_fits.py."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sim.config import SimCameraTruth, load_sim_config
from sorter.config import LineConfig
from sorter.core.clock import ClockModel
from sorter.drivers.plc import make_plc_link
from sorter.drivers.plc.base import PlcCommand
from tests.conftest import wait_until
from tests.hwsim import ROOT, SimLine, simulated_line

pytestmark = pytest.mark.line


@asynccontextmanager
async def belt_running(line: SimLine) -> AsyncIterator[None]:
    """The technician starts the belt at the panel: here through the PLC, as the line service does."""
    link = make_plc_link(line.cfg.plc, ClockModel())
    task = asyncio.create_task(link.run())
    try:
        await wait_until(lambda: link.online, 10, "the PLC link online")
        await link.command(PlcCommand.START_BELT)
        yield
    finally:
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_camera_check_passes_on_the_running_line(tmp_path: Path) -> None:
    async with simulated_line(tmp_path / "run", hallbar=False) as line, belt_running(line):
        await line.send(cmd="feed", on=True)

        async def pieces_passed_the_cameras() -> bool:
            return sum((await line.send(cmd="status"))["binned"].values()) > 0  # the bins are past the cameras

        await wait_until(pieces_passed_the_cameras, 20, "the first pieces under the cameras and in a bin")
        before = line.config.read_text()
        # the delay limit allows for CI's two shared cores starving the simulator now and then: the camera's
        # own delay (10-60 ms) is checked on the median below
        args = ("--seconds", "3", "--max-delay-ms", "300", "--out", str(tmp_path / "check"))
        res = await line.script("camera_check", *args)
    assert res.returncode == 0, res.stderr
    assert "local camera devices:" in res.stderr
    report = json.loads((tmp_path / "check" / "camera-check.json").read_text())
    for cam in report["cameras"]:
        print(cam["camera"], "fps", cam["fps"], "delay ms", cam["delay_ms"], "focus", cam["focus"])
        assert 55 <= cam["fps"] <= 65
        assert 10 <= cam["delay_ms"]["median"] <= 60
        assert 40 <= cam["belt_mm_per_frame"] <= 44  # 2500 mm/s / 60 fps, +-5 % belt speed drift
        assert cam["focus"] is not None and not cam["failures"]
        assert Path(cam["frame_png"]).is_file()
    assert line.config.read_text() == before  # a check writes nothing


# where the simulated cameras really are, and the config's deliberately wrong idea of it
TRUTH = {
    "cam0": SimCameraTruth(centre_mm=(158.6, 1.4), mm_per_px=0.2483, rotation_deg=0.7),
    "cam1": SimCameraTruth(centre_mm=(441.8, -1.1), mm_per_px=0.2521, rotation_deg=-0.45),
}
WRONG = {"cam0": ((150.0, 4.0), 0.262, -1.5), "cam1": ((452.0, -3.0), 0.24, 1.2)}


def miscalibrated() -> LineConfig:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    assert cfg.simulator is not None
    cams = [
        c.model_copy(
            update={
                "mapping": c.mapping.model_copy(
                    update=dict(zip(("centre_mm", "mm_per_px", "rotation_deg"), WRONG[c.name], strict=True))
                )
            }
        )
        for c in cfg.cameras
    ]
    sim = cfg.simulator.model_copy(update={"cameras": TRUTH})
    return cfg.model_copy(update={"cameras": cams, "simulator": sim})


async def test_calibration_recovers_the_true_camera_geometry(tmp_path: Path) -> None:
    async with simulated_line(tmp_path / "run", miscalibrated(), hallbar=False) as line:
        # the technician lays the target on the stopped belt (left edge at the guide, ticks on the
        # cameras' centre-line mark) and switches the cameras to free-run
        await line.send(cmd="target", on=True)
        await line.send(cmd="camera_trigger", mode="free_run", fps=15)
        res = await line.script("calibrate_camera")
        assert res.returncode == 0, res.stderr
        # focus judged on the target: a defocused lens fails the check, the sharp one passes
        await line.send(cmd="camera_focus", camera="cam1", blur_px=1.0)
        args = ("--min-fps", "10", "--max-delay-ms", "1000", "--seconds", "1.5", "--out", str(tmp_path / "c"))
        check = await line.script("camera_check", *args)  # free-run at 15 fps; only focus is judged here
    cfg = load_sim_config(line.config)
    found = {}
    for cam in cfg.cameras:
        truth, m = TRUTH[cam.name], cam.mapping
        assert truth.mm_per_px and truth.centre_mm and truth.rotation_deg is not None
        found[cam.name] = (m.mm_per_px / truth.mm_per_px - 1, m.rotation_deg - truth.rotation_deg)
        # achieved in the simulator: scale ~1e-5, rotation ~0.001 deg, centre ~0.001 mm (fit sigma ~0.002 mm)
        assert abs(m.mm_per_px / truth.mm_per_px - 1) < 0.0005, (cam.name, m.mm_per_px, truth.mm_per_px)
        assert abs(m.rotation_deg - truth.rotation_deg) < 0.02, (cam.name, m.rotation_deg)
        assert math.dist(m.centre_mm, truth.centre_mm) < 0.1, (cam.name, m.centre_mm)
    (entry,) = [json.loads(x) for x in (tmp_path / "run" / "line.calibration-history.jsonl").read_text().splitlines()]
    res_mm = entry["residuals"]
    print("found (scale err, rotation err):", found, "residuals:", json.dumps(res_mm))
    assert all(res_mm[c]["rms_mm"] < 0.05 and res_mm[c]["max_mm"] < 0.3 for c in TRUTH)  # limit 0.3 mm rms
    (ov,) = res_mm["overlaps"]
    assert ov["shared"] >= 4 and ov["max_mm"] < 0.1 and 30 < ov["width_mm"] < 45  # they agree where both see
    gains = [entry["measured"][c]["grey"]["gains_bgr"] for c in TRUTH]
    assert all(abs(k - 1) < 0.03 for g in gains for k in g)  # the simulated light is neutral
    assert "switch the cameras back to encoder trigger" in res.stderr

    assert check.returncode == 1, check.stderr
    report = json.loads((tmp_path / "c" / "camera-check.json").read_text())
    by_name = {c["camera"]: c for c in report["cameras"]}
    print("focus on the target: sharp", by_name["cam0"]["focus"], "defocused", by_name["cam1"]["focus"])
    assert by_name["cam0"]["failures"] == []
    assert [f for f in by_name["cam1"]["failures"] if "focus" in f] == by_name["cam1"]["failures"] != []
    assert "cam1: out of focus" in check.stderr
