"""The service's OPC UA PLC link against the virtual PLC's real OPC UA server on loopback, belt running.

The same outcomes as the Modbus link (tests/test_plc_link.py): accepted in order, expired, timeout
when the PLC has no room, offline; reconnect and resync after the PLC's OPC UA stack restarts;
SignAndEncrypt with a client certificate and a user whose password comes from the environment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from sim.belt import Belt
from sim.config import SimConfig, SimPlcOpcUaConfig
from sim.plc import ExecutedEject, VirtualPlc
from sim.plc_opcua import PlcOpcUaServer
from sorter.config import ModbusMap, OpcUaSecurity, PlcConfig, PlcOpcUaConfig
from sorter.core.clock import ClockModel
from sorter.core.messages import EjectCommand
from sorter.drivers.plc.base import PlcCommand, PlcError
from sorter.drivers.plc.opcua_link import OpcUaPlcLink
from sorter.north.opcua.pki import make_certificate, trust
from sorter.north.users import hash_password
from tests.conftest import wait_until

pytestmark = [pytest.mark.wire, pytest.mark.asyncio(loop_scope="module")]

CPMM, SPEED = 20.0, 2500.0
RATE = CPMM * SPEED
LEAD = 0.03
QUEUE = 8


@dataclass
class Plant:
    belt: Belt
    plc: VirtualPlc
    server: PlcOpcUaServer
    fired: list[ExecutedEject] = field(default_factory=list)


async def make_plant(sim: SimPlcOpcUaConfig) -> Plant:
    belt = Belt(CPMM, SPEED, encoder_start=2**32 - 150_000)  # wraps ~3 s in
    fired: list[ExecutedEject] = []
    plc = VirtualPlc(ModbusMap(), belt, SimConfig(watchdog_ms=400, eject_queue_size=QUEUE), on_eject=fired.append)
    await plc.start("127.0.0.1", 0)
    server = PlcOpcUaServer(plc, PlcOpcUaConfig(endpoint="opc.tcp://127.0.0.1:0"), sim)
    await server.start()
    return Plant(belt, plc, server, fired)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def plant() -> AsyncIterator[Plant]:
    p = await make_plant(SimPlcOpcUaConfig())
    try:
        yield p
    finally:
        await p.server.stop()
        await p.plc.stop()


def link_config(plant: Plant, **security: object) -> PlcConfig:
    opcua = PlcOpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{plant.server.port}", security=OpcUaSecurity(**security))
    return PlcConfig(protocol="opcua", opcua=opcua, timeout_s=0.5, reconnect_min_s=0.05, reconnect_max_s=0.5)


@asynccontextmanager
async def running(cfg: PlcConfig) -> AsyncIterator[OpcUaPlcLink]:
    link = OpcUaPlcLink(cfg, ClockModel())
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        await link.stop()
        await asyncio.wait_for(task, 5)


async def started(link: OpcUaPlcLink) -> None:
    await wait_until(lambda: link.online and link.clock.ready, 8, "link online")
    await link.command(PlcCommand.RESET)
    await link.command(PlcCommand.START_BELT)
    assert link.status.belt_running
    await wait_until(lambda: abs(link.clock.rate - RATE) < 0.01 * RATE, 5, "clock locked on the belt")


def ahead(link: OpcUaPlcLink, seconds: float) -> int:
    return round(link.clock.count_at(time.monotonic() + seconds))


async def test_commands_are_accepted_in_order_and_fire_at_their_count(plant: Plant) -> None:
    async with running(link_config(plant)) as link:
        await started(link)
        first = plant.plc.last_seq
        await wait_until(lambda: ahead(link, 1.0) >= 2**32, 10, "the encoder about to wrap")
        # the first 0.5 s ahead, 50 ms apart: the PLC queues 8, so the 9th is sent once the 1st has fired and
        # must still be accepted before its own count (10 ms apart left 20 ms for that, a busy machine overran it)
        cmds = [EjectCommand(i, i % 2, 0b11 << i, ahead(link, 0.5 + 0.05 * i), 200) for i in range(20)]
        assert cmds[0].open_at < 2**32 <= cmds[-1].open_at  # the 32-bit counter wraps among them
        results = [await link.send(c, LEAD, 2.0) for c in cmds]  # the 9th waits (up to 2 s) for room in the queue
        assert [r.outcome for r in results] == ["accepted"] * 20
        assert [r.seq for r in results] == [first % 0xFFFF + 1 + i for i in range(20)]
        await wait_until(lambda: len(plant.fired) >= 20, 3, "all fired")
        assert [f.open_at for f in plant.fired[-20:]] == [c.open_at for c in cmds]  # across the encoder wrap too
        await wait_until(lambda: link.status.ejects_done >= 20, 2, "EjectsDone by subscription")
        # a command whose count is about to pass is not sent
        late = EjectCommand(99, 0, 1, ahead(link, 0.005), 200)
        assert (await link.send(late, LEAD)).outcome == "expired"


async def test_a_full_queue_times_out_and_recovers(plant: Plant) -> None:
    async with running(link_config(plant)) as link:
        await started(link)
        far = ahead(link, 30)  # fills the PLC's queue: nothing fires for 30 s
        outcomes = [(await link.send(EjectCommand(i, 0, 1, far + i, 100), LEAD, 0.3)).outcome for i in range(QUEUE)]
        assert outcomes == ["accepted"] * QUEUE
        res = await link.send(EjectCommand(50, 0, 1, far + 100, 100), LEAD, 0.3)
        assert res.outcome == "timeout" and res.seq is None  # not sent: no room
        assert not link.status.queue_overflow  # the PC never overfilled the PLC
        plant.plc.set_estop(True)  # flush, then carry on
        plant.plc.set_estop(False)
        await started(link)  # belt on again, and the clock model locked on it before predicting counts
        assert (await link.send(EjectCommand(51, 0, 1, ahead(link, 0.3), 100), LEAD)).outcome == "accepted"


async def test_reconnects_and_resubscribes_after_the_plc_opcua_stack_restarts(plant: Plant) -> None:
    async with running(link_config(plant)) as link:
        await started(link)
        assert (await link.send(EjectCommand(1, 0, 1, ahead(link, 0.3), 100), LEAD)).outcome == "accepted"
        await plant.server.set_reachable(False)
        await wait_until(lambda: not link.online, 3, "link offline")
        assert (await link.send(EjectCommand(2, 0, 1, ahead(link, 0.3), 100), LEAD)).outcome == "offline"
        plant.plc.last_seq = 40_000  # the PLC moved on meanwhile (another PC, a restart): its word counts
        await plant.server.set_reachable(True)
        t0 = time.monotonic()
        await wait_until(lambda: link.online, 5, "link back")
        back_s = time.monotonic() - t0
        assert back_s < 5
        await link.command(PlcCommand.RESET)  # the watchdog tripped while the PC could not heartbeat
        res = await link.send(EjectCommand(3, 0, 1, ahead(link, 0.3), 100), LEAD)
        assert res.outcome == "accepted" and res.seq == 40_001
        # the subscription is live again: status changes arrive without polling
        plant.plc.set_air_ok(False)
        await wait_until(lambda: "air_pressure_low" in link.status.alarms, 2, "alarm by subscription")
        plant.plc.set_air_ok(True)
        await wait_until(lambda: link.status.alarms == [], 2, "alarm cleared")


async def test_manual_valves_only_with_the_belt_stopped(plant: Plant) -> None:
    async with running(link_config(plant)) as link:
        await started(link)
        with pytest.raises(PlcError, match="refused"):
            await link.set_valve(0, 3, True)
        await link.command(PlcCommand.STOP_BELT)
        await link.set_valve(1, 3, True)
        assert plant.plc.coil(1, 3)
        await link.set_valve(1, 3, False)
        assert not plant.plc.coil(1, 3)


async def refused(link: OpcUaPlcLink, reason: str) -> None:
    """The link gives up a connection attempt with `reason` in its last error, and was never online meanwhile."""
    online: list[bool] = []

    def failed() -> bool:
        online.append(link.online)
        return bool(link.status.last_error) and reason in link.status.last_error

    await wait_until(failed, 5, f"a refused connection ({reason or 'any error'})")
    assert not any(online) and not link.online, link.status


async def test_signandencrypt_with_certificate_and_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = tmp_path / "pki"
    plc_cert, plc_key = make_certificate(
        pki / "plc.der", pki / "plc.pem", common_name="plc", application_uri="urn:test:plc", hostnames=["127.0.0.1"]
    )
    pc_cert, pc_key = make_certificate(
        pki / "pc.der", pki / "pc.pem", common_name="pc", application_uri="urn:test:pc", hostnames=["127.0.0.1"]
    )
    trust(pc_cert, pki / "trusted")
    sim = SimPlcOpcUaConfig(
        security="sign_encrypt",
        certificate=plc_cert,
        private_key=plc_key,
        trust_dir=pki / "trusted",
        username="sorter",
        password_hash=hash_password("plc-secret"),
    )
    plant = await make_plant(sim)
    try:
        secure = {
            "policy": "Basic256Sha256",
            "mode": "SignAndEncrypt",
            "certificate": pc_cert,
            "private_key": pc_key,
            "username": "sorter",
            "password_env": "TEST_PLC_PASSWORD",
        }
        monkeypatch.setenv("TEST_PLC_PASSWORD", "plc-secret")
        async with running(link_config(plant, **secure)) as link:
            await started(link)
            assert (await link.send(EjectCommand(1, 0, 1, ahead(link, 0.3), 100), LEAD)).outcome == "accepted"
        # a wrong password or none at all: never online, and the reason says why
        monkeypatch.setenv("TEST_PLC_PASSWORD", "wrong")
        async with running(link_config(plant, **secure)) as link:
            await refused(link, "BadUserAccessDenied")
        monkeypatch.delenv("TEST_PLC_PASSWORD")
        async with running(link_config(plant, **secure)) as link:
            await refused(link, "TEST_PLC_PASSWORD")
        # without security the PLC does not let us in at all
        async with running(link_config(plant)) as link:
            await refused(link, "")
    finally:
        await plant.server.stop()
        await plant.plc.stop()


async def test_a_plc_restart_is_noticed_on_reconnecting_and_the_totals_carry_on(plant: Plant) -> None:
    async with running(link_config(plant)) as link:
        await started(link)
        done0 = link.status.ejects_done
        cmds = [EjectCommand(i, 0, 1, ahead(link, 0.3 + 0.05 * i), 100) for i in range(3)]
        assert [(await link.send(c, LEAD)).outcome for c in cmds] == ["accepted"] * 3
        await wait_until(lambda: link.status.ejects_done == done0 + 3, 3, "the three fired")
        assert link.restarts == 0
        # a power cycle: the PLC's OPC UA stack goes down with it, and it comes back with seq and counters at 0
        await plant.server.set_reachable(False)
        await plant.plc.restart(down_s=0.1)
        await plant.server.set_reachable(True)
        await wait_until(lambda: link.online and link.restarts == 1, 5, "the link back, the restart noticed")
        assert link.mailbox.last_accepted == 0
        assert link.status.ejects_done == done0 + 3  # the running total does not step back with the PLC's counter
        await started(link)  # the restart stopped the belt
        res = await link.send(EjectCommand(9, 0, 1, ahead(link, 0.3), 100), LEAD)
        assert res.outcome == "accepted" and res.seq == 1
        await wait_until(lambda: link.status.ejects_done == done0 + 4, 3, "it fired")
        assert link.restarts == 1
