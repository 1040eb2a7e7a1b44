"""hw.calibrate_eject against the simulated line: from a wrong valve delay to the valves' true timing."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hw.calibrate_eject import Chute, Point, Scan, ScanPlanner, calibration_config, find_edges
from hw.common import HwError, history_path
from sim.belt import Belt
from sim.config import SimConfig, SimPlcOpcUaConfig, load_sim_config
from sim.demo import free_port
from sim.plc import VirtualPlc
from sim.plc_opcua import PlcOpcUaServer
from sorter.config import ModbusMap, PlcConfig, PlcNodeNames, PlcOpcUaConfig
from sorter.core.clock import ClockModel
from sorter.core.messages import Decision, Piece
from sorter.drivers.plc import make_plc_link
from sorter.drivers.plc.base import PlcError
from tests.hwsim import ROOT, simulated_line, write_config

TRUE_OPEN_MS, TRUE_CLOSE_MS = 9.0, 8.0  # the simulated valves: 5 ms slower than the config's 4 / 3 ms


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
        deadline = time.monotonic() + 5
        while not link.online and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert link.online
        return link, task

    try:
        link, task = await link_to()
        assert await link.read_chute_counts(2) == [0, 0]
        for bank in (0, 0, 1):
            plc.chute_pulse(bank)  # pieces breaking the barriers
        await asyncio.sleep(0.1)  # OPC UA: the scan publishes the change
        assert await link.read_chute_counts(2) == [2, 1]
        await link.stop()
        task.cancel()
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
        await link.stop()
        task.cancel()
    finally:
        await server.stop()
        await plc.stop()


def test_no_plc_is_a_clear_message_and_the_config_is_untouched(tmp_path: Path) -> None:
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


@pytest.mark.slow
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
