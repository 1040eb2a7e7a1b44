"""The hw/ scripts against real peers but no running line: a camera, PLC or Hall bar that is absent or
babbling is named without a traceback, and the config is left as it was; the chute counters that the eject
calibration reads, through both PLC links against the virtual PLC's servers on loopback."""

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

import pytest

from sim.belt import Belt
from sim.config import SimConfig, SimPlcOpcUaConfig, load_sim_config
from sim.demo import free_port
from sim.plc import VirtualPlc
from sim.plc_opcua import PlcOpcUaServer
from sorter.config import LineConfig, ModbusMap, PlcConfig, PlcNodeNames, PlcOpcUaConfig
from sorter.core.clock import ClockModel
from sorter.drivers.plc import make_plc_link
from sorter.drivers.plc.base import PlcError
from tests.conftest import wait_until
from tests.hwsim import ROOT, write_config

pytestmark = pytest.mark.wire


def sim_yaml() -> LineConfig:
    return load_sim_config(ROOT / "config" / "sim.yaml")


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at 80 columns when not on a terminal


# --- cameras ---


@pytest.mark.parametrize("script", ["camera_check", "calibrate_camera"])
def test_an_absent_camera_is_named_without_a_traceback(tmp_path: Path, script: str) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    # nothing listens at cam1's address (the camera is unplugged); cam0 is absent too
    cams = [
        c.model_copy(update={"source": c.source.model_copy(update={"address": f"127.0.0.1:{free_port()}"})})
        for c in cfg.cameras
    ]
    path = write_config(cfg.model_copy(update={"cameras": cams}), tmp_path / "line.yaml")
    before = path.read_text()
    extra = ["--out", str(tmp_path / "out")] if script == "camera_check" else []
    cmd = [sys.executable, "-m", f"hw.{script}", "--config", str(path), "--yes", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for cam in cams:
        assert f"camera {cam.name} (sim camera at {cam.source.address}) delivers no frames" in res.stderr
    assert "powered and connected" in res.stderr and "cameras[1].source" in res.stderr
    assert path.read_text() == before


# --- the PLC ---


def test_calibrate_encoder_without_a_plc_is_a_clear_message(tmp_path: Path) -> None:
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


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
async def test_chute_counters_read_through_the_line_links(protocol: str) -> None:
    belt = Belt(20.0, 2500.0)
    plc = VirtualPlc(ModbusMap(), belt, SimConfig(), banks=2)
    await plc.start("127.0.0.1", 0)
    server = PlcOpcUaServer(plc, PlcOpcUaConfig(endpoint="opc.tcp://127.0.0.1:0"), SimPlcOpcUaConfig())
    if protocol == "opcua":
        await server.start()

    async def link_to(**changes: object):  # the PC's view of the PLC, possibly wrong about the counters
        opcua = PlcOpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{server.port}")
        cfg = PlcConfig(protocol=protocol, port=plc.port, opcua=opcua).model_copy(update=changes)  # type: ignore[arg-type]
        link = make_plc_link(cfg, ClockModel())
        task = asyncio.create_task(link.run())
        await wait_until(lambda: link.online, 5, "link online")
        return link, task

    async def unlink(link, task) -> None:  # type: ignore[no-untyped-def]
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def counts_read(want: list[int]) -> bool:
        return await link.read_chute_counts(2) == want

    try:
        link, task = await link_to()
        assert await link.read_chute_counts(2) == [0, 0]
        for bank in (0, 0, 1):
            plc.chute_pulse(bank)  # pieces breaking the barriers
        await wait_until(lambda: counts_read([2, 1]), 2, "the pulses counted (OPC UA: once the scan publishes them)")
        await unlink(link, task)
        if protocol == "modbus":  # a PLC program without the registers
            link, task = await link_to(registers=ModbusMap(ir_chute_counts=40))
            match = "no chute counters at input registers 40..41"
        else:  # a PLC without the node still serves the line; only this read fails
            link, task = await link_to(
                opcua=PlcOpcUaConfig(
                    endpoint=f"opc.tcp://127.0.0.1:{server.port}", nodes=PlcNodeNames(chute_counts="NoSuchNode")
                )
            )
            match = "has no node Line/NoSuchNode"
        with pytest.raises(PlcError, match=match):
            await link.read_chute_counts(2)
        await unlink(link, task)
    finally:
        await server.stop()
        await plc.stop()


def test_calibrate_eject_without_a_plc_is_a_clear_message(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    port = free_port()  # nobody listens there
    config = write_config(
        cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"port": port})}), tmp_path / "l.yaml"
    )
    before = config.read_text()
    done = subprocess.run(
        [sys.executable, "-m", "hw.calibrate_eject", "--config", str(config), "--yes"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())  # rich wraps long lines
    assert f"PLC at 127.0.0.1:{port} (Modbus TCP) not reachable" in said and "check:" in said
    assert "Traceback" not in done.stderr and config.read_text() == before


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
def test_a_plc_that_is_not_there_is_named(tmp_path: Path, protocol: str) -> None:
    port = free_port()  # nothing listens there
    cfg = sim_yaml()
    plc = cfg.plc.model_copy(
        update={
            "protocol": protocol,
            "host": "127.0.0.1",
            "port": port,
            "opcua": cfg.plc.opcua.model_copy(update={"endpoint": f"opc.tcp://127.0.0.1:{port}"}),
        }
    )
    config = write_config(cfg.model_copy(update={"plc": plc}), tmp_path / "line.yaml")
    cmd = [sys.executable, "-m", "hw.plc_probe", "--config", str(config), "--yes", "--connect-timeout", "1.5"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    text = one_line(res.stderr)
    assert res.returncode == 2, res.stderr
    assert f"no PLC answers at {'opc.tcp://' if protocol == 'opcua' else ''}127.0.0.1:{port}" in text
    assert ("plc.opcua.endpoint" if protocol == "opcua" else "plc.host and plc.port") in text  # what to check
    assert "Traceback" not in res.stderr


# --- the Hall bar ---


def run_magnetometer(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hw.calibrate_magnetometer", "--config", str(config), "--yes", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def config_with_port(tmp_path: Path, port: str) -> Path:
    cfg = sim_yaml()
    assert cfg.magnetometer is not None
    cfg = cfg.model_copy(update={"magnetometer": cfg.magnetometer.model_copy(update={"port": port})})
    return write_config(cfg, tmp_path / "line.yaml")


def test_a_missing_hall_bar_port_is_named(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB9")
    config = config_with_port(tmp_path, port)
    before = config.read_text()
    res = run_magnetometer(config, "--reference-mT", "300")
    assert res.returncode == 2, res.stderr
    assert f"cannot open the Hall bar's serial port {port}" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr and config.read_text() == before


def test_a_port_answering_garbage_is_named_as_not_a_hall_bar(tmp_path: Path) -> None:
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
        res = run_magnetometer(config, "--reference-mT", "300")
    finally:
        stop.set()
        writer.join()
        os.close(master)
        os.close(slave)
    text = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr
    assert f"the device on {port} sends no valid Hall-bar data line" in text
    assert "baudrate" in text and "Traceback" not in res.stderr
