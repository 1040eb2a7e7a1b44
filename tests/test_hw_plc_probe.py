"""hw.plc_probe against the simulated line's PLC over both protocols: the interface read and explained, round-trip
figures, the watchdog tripping (after the simulator's true watchdog time) and clearing, the valves pulsed with
the belt stopped. A PLC that is not there is tests/test_hw_wire.py.

Real time: the probe measures round trips and how long the PLC's watchdog takes to trip."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from sim.config import load_sim_config
from sorter.config import LineConfig
from tests.hwsim import ROOT, simulated_line, write_config

pytestmark = pytest.mark.line

WATCHDOG_MS = 300.0  # the simulated PLC's true watchdog time (the interface asks for 500)


def sim_yaml() -> LineConfig:
    return load_sim_config(ROOT / "config" / "sim.yaml")


def with_protocol(cfg: LineConfig, protocol: str) -> LineConfig:
    return cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"protocol": protocol})})


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at 80 columns when not on a terminal


def check_probe(res: subprocess.CompletedProcess[str], cfg: LineConfig) -> None:
    text = one_line(res.stderr)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    for item in ("encoder count", "belt running", "air pressure ok", "watchdog tripped", "queue free"):
        assert item in text
    assert "standing still" in text  # the simulated belt starts stopped
    rtt = re.search(r"(\d+) requests: min ([\d.]+), median ([\d.]+), p99 ([\d.]+), max ([\d.]+) ms", text)
    assert rtt, text
    n, lo, med, p99, hi = (float(g) for g in rtt.groups())
    assert n >= 60 and 0 < lo <= med <= p99 <= hi < cfg.plc.timeout_s * 1000
    trip = re.search(r"tripped (\d+) ms after the PC stopped its heartbeat", text)
    assert trip, text
    ms = float(trip.group(1))
    # the last heartbeat went out up to one interval before it stopped; the trip shows within a poll or two
    slack = cfg.plc.heartbeat_interval_ms + 2 * cfg.plc.poll_interval_ms + 100
    assert WATCHDOG_MS - cfg.plc.heartbeat_interval_ms <= ms <= WATCHDOG_MS + slack, ms
    assert "RESET cleared it" in text
    total = len(cfg.ejection.banks) * cfg.ejection.valves_per_bank
    assert f"pulsed {total} of {total}" in text and "refused: none" in text
    assert "FAIL" not in text
    print(f"{cfg.plc.protocol}: rtt min/median/p99 {lo}/{med}/{p99} ms; watchdog true {WATCHDOG_MS:g} ms, found {ms:g}")


async def test_probe_over_modbus_and_opcua(tmp_path: Path) -> None:
    cfg = sim_yaml()
    assert cfg.simulator is not None
    cfg = cfg.model_copy(update={"simulator": cfg.simulator.model_copy(update={"watchdog_ms": WATCHDOG_MS})})
    async with simulated_line(tmp_path, with_protocol(cfg, "modbus"), hallbar=False) as line:
        before = line.config.read_text()
        args = ("--pulse-valves", "--pulse-ms", "5", "--requests", "80")
        check_probe(await line.script("plc_probe", *args), line.cfg)
        # the same simulated PLC serves OPC UA beside Modbus: plc.protocol picks what the script speaks
        opcua = with_protocol(line.cfg, "opcua")
        path = write_config(opcua, tmp_path / "line-opcua.yaml")
        check_probe(await dataclasses.replace(line, config=path).script("plc_probe", *args), opcua)
        assert line.config.read_text() == before  # a probe writes nothing
