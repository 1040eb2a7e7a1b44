"""PlcLink against the real VirtualPlc Modbus TCP server on loopback, with a running belt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from sim.belt import Belt
from sim.config import SimConfig
from sim.plc import ExecutedEject, VirtualPlc
from sorter.config import ModbusMap, PlcConfig
from sorter.core.clock import ClockModel
from sorter.core.geometry import wrap32
from sorter.core.messages import EjectCommand
from sorter.drivers.plc.link import EjectResult, PlcCommand, PlcLink
from sorter.drivers.plc.modbus import ModbusClient, PlcError
from tests.conftest import wait_until

pytestmark = pytest.mark.wire

CPMM = 20.0
SPEED = 2500.0
RATE = CPMM * SPEED  # 50 000 counts/s
LEAD = 0.03  # min_lead_s used throughout
REGS = ModbusMap()


@dataclass
class Rig:
    belt: Belt
    plc: VirtualPlc
    link: PlcLink
    clock: ClockModel
    fired: list[ExecutedEject] = field(default_factory=list)

    def ahead(self, seconds: float) -> int:
        """The unwrapped count the belt reaches `seconds` from now (per the link's clock model)."""
        return round(self.clock.count_at(time.monotonic() + seconds))

    async def run_belt(self) -> None:
        await self.link.command(PlcCommand.START_BELT)
        assert self.link.status.belt_running
        await wait_until(lambda: abs(self.clock.rate - RATE) < 0.01 * RATE, what="clock model locked on the belt")

    async def passed(self, count: int, timeout: float = 3.0) -> None:
        await wait_until(lambda: self.belt.count() > count + 500, timeout, f"belt past {count}")


@asynccontextmanager
async def rig(
    *, encoder_start: int = 1_000_000, watchdog_ms: float = 2000.0, start_seq: int = 0, **plc_kw: float
) -> AsyncIterator[Rig]:
    belt = Belt(CPMM, SPEED, encoder_start=encoder_start)
    fired: list[ExecutedEject] = []
    plc = VirtualPlc(REGS, belt, SimConfig(watchdog_ms=watchdog_ms), banks=2, on_eject=fired.append, scan_s=0.001)
    plc.last_seq = start_seq
    await plc.start("127.0.0.1", 0)
    kw = {"timeout_s": 0.3, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **plc_kw}
    cfg = PlcConfig(host="127.0.0.1", port=plc.port, **kw)  # type: ignore[arg-type]
    clock = ClockModel()
    link = PlcLink(cfg, clock)
    task = asyncio.create_task(link.run())
    r = Rig(belt, plc, link, clock, fired)
    try:
        await wait_until(lambda: link.online and clock.ready, what="link online")
        yield r
    finally:
        await link.stop()
        await asyncio.wait_for(task, 2.0)
        await plc.stop()
        belt.stop()


def command(r: Rig, i: int, open_at: int) -> EjectCommand:
    return EjectCommand(
        piece_id=i, bank=i % 2, valve_mask=(0b11 << (i % 30)) | (1 << 31), open_at=open_at, open_for=100 + i
    )


def slot_words(seq: int, cmd: EjectCommand) -> list[int]:
    at32 = wrap32(cmd.open_at)
    mask = cmd.valve_mask
    return [seq, cmd.bank, mask >> 16, mask & 0xFFFF, at32 >> 16, at32 & 0xFFFF, cmd.open_for, 0]


def slot_of(seq: int) -> list[int]:
    return [REGS.hr_slots + (seq % REGS.slot_count) * REGS.slot_stride, REGS.slot_stride]


def check_fired(r: Rig, sent: list[tuple[EjectCommand, EjectResult]]) -> None:
    by_seq = {ex.seq: ex for ex in r.fired}
    for cmd, res in sent:
        ex = by_seq[res.seq]  # type: ignore[index]
        assert (ex.bank, ex.valve_mask, ex.open_for) == (cmd.bank, cmd.valve_mask, cmd.open_for)
        assert ex.open_at == cmd.open_at  # exact, unwrapped: the physics relies on it
        assert abs(r.belt.count(ex.t_fire) - cmd.open_at) <= 1  # and the belt really was there then
    assert [ex.open_at for ex in r.fired] == sorted(ex.open_at for ex in r.fired)


@pytest.mark.asyncio
async def test_commands_accepted_in_order_with_slot_contents() -> None:
    async with rig() as r:
        await r.run_belt()
        cmds = [command(r, i, r.ahead(0.25 + 0.01 * i)) for i in range(20)]  # 20 > 16 slots: slots are reused
        results = await asyncio.gather(*(r.link.send(c, LEAD) for c in cmds))
        assert [res.outcome for res in results] == ["accepted"] * 20
        assert [res.seq for res in results] == list(range(1, 21))
        for res in results:
            assert res.t_sent is not None and res.t_accepted is not None and res.t_accepted > res.t_sent
        for cmd, res in list(zip(cmds, results, strict=True))[-16:]:
            assert res.seq is not None and r.plc.holding(*slot_of(res.seq)) == slot_words(res.seq, cmd)
        assert r.plc.accepted == 20 and r.plc.last_seq == 20
        await wait_until(lambda: len(r.fired) == 20, what="all 20 fired")
        check_fired(r, list(zip(cmds, results, strict=True)))
        await wait_until(lambda: r.link.status.ejects_done == 20, what="ejects_done polled")
        assert r.link.status.ejects_late == 0 and r.link.status.last_seq == 20


@pytest.mark.asyncio
async def test_seq_wrap_from_plc_state() -> None:
    """The link resyncs its mailbox from register 5 and carries seq over 65535 -> 1."""
    async with rig(start_seq=65533) as r:
        assert r.link.mailbox.next_seq == 65534
        await r.run_belt()
        cmds = [command(r, i, r.ahead(0.15 + 0.01 * i)) for i in range(4)]
        results = await asyncio.gather(*(r.link.send(c, LEAD) for c in cmds))
        assert [res.seq for res in results] == [65534, 65535, 1, 2]
        assert all(res.outcome == "accepted" for res in results)
        for cmd, res in zip(cmds, results, strict=True):
            assert res.seq is not None and r.plc.holding(*slot_of(res.seq)) == slot_words(res.seq, cmd)
        await wait_until(lambda: len(r.fired) == 4, what="fired")
        assert [ex.seq for ex in r.fired] == [65534, 65535, 1, 2]


@pytest.mark.asyncio
async def test_encoder_wraps_across_2_32_during_a_run() -> None:
    start = 2**32 - 30_000  # 0.6 s before the wrap at full speed
    async with rig(encoder_start=start) as r:
        await r.run_belt()
        base = r.ahead(0.1)
        assert base < 2**32 - 5_000
        cmds = [command(r, i, base + 4_000 * (i + 1)) for i in range(8)]
        assert cmds[0].open_at < 2**32 < cmds[-1].open_at
        results = await asyncio.gather(*(r.link.send(c, LEAD) for c in cmds))
        assert all(res.outcome == "accepted" for res in results)
        wrapped = [c for c in cmds if c.open_at >= 2**32]
        res_w = results[cmds.index(wrapped[0])]
        assert res_w.seq is not None
        assert r.plc.holding(*slot_of(res_w.seq))[4:6] == [0, wrapped[0].open_at - 2**32]  # sent as wrap32
        await r.passed(cmds[-1].open_at)
        await wait_until(lambda: len(r.fired) == 8, what="fired")
        check_fired(r, list(zip(cmds, results, strict=True)))
        latest = r.clock.latest
        assert latest is not None and latest[1] > 2**32  # the clock model kept counting past the wrap
        assert abs(r.clock.count_at(time.monotonic()) - r.belt.count()) < 0.01 * RATE


@pytest.mark.asyncio
async def test_expired_commands_are_not_sent() -> None:
    async with rig() as r:
        await r.run_belt()
        next_seq = r.link.mailbox.next_seq
        for open_at in (r.ahead(-0.05), r.ahead(0.0), r.ahead(LEAD / 3)):
            res = await r.link.send(command(r, 0, open_at), LEAD)
            assert res == EjectResult(None, "expired", None, None)
        assert r.link.mailbox.next_seq == next_seq and r.plc.accepted == 0
        assert r.plc.holding(*slot_of(next_seq)) == [0] * 8
        ok = await r.link.send(command(r, 1, r.ahead(0.2)), LEAD)
        assert ok.outcome == "accepted" and ok.seq == next_seq


@pytest.mark.asyncio
async def test_watchdog_trips_without_heartbeat_and_ejects_nothing_until_reset() -> None:
    async with rig(watchdog_ms=200) as r:
        await r.run_belt()
        queued = command(r, 0, r.ahead(0.8))
        assert (await r.link.send(queued, LEAD)).outcome == "accepted"
        assert len(r.plc.queue) == 1

        r.link.heartbeat_enabled = False
        await wait_until(lambda: r.link.status.watchdog_tripped, 2.0, "watchdog trip")
        assert "watchdog_tripped" in r.link.status.alarms
        assert r.plc.queue == []  # dropped, fail-safe
        r.link.heartbeat_enabled = True

        # still tripped: the PLC takes nothing, so the link does not write and the command expires
        res = await r.link.send(command(r, 1, r.ahead(0.15)), LEAD)
        assert res.outcome == "expired" and r.plc.accepted == 1
        await r.passed(queued.open_at)
        assert r.fired == [] and r.plc.executed == 0

        await r.link.command(PlcCommand.RESET)
        assert not r.link.status.watchdog_tripped and r.link.status.alarms == []
        again = command(r, 2, r.ahead(0.15))
        res = await r.link.send(again, LEAD)
        assert res.outcome == "accepted"
        await wait_until(lambda: len(r.fired) == 1, what="fired after reset")
        assert r.fired[0].seq == res.seq and r.fired[0].open_at == again.open_at


@pytest.mark.asyncio
async def test_reconnects_with_backoff_and_resyncs() -> None:
    with capture_logs() as logs:
        async with rig(watchdog_ms=10_000) as r:
            assert (await r.link.send(command(r, 0, r.ahead(0) + 10_000), LEAD)).outcome == "accepted"

            # connections dropped: offline, then straight back
            assert r.plc.drop_connections() == 1
            await wait_until(lambda: not r.link.online, 1.0, "offline after drop")
            await wait_until(lambda: r.link.online, 2.0, "online after drop")

            # unreachable: offline with backoff, commands refused as offline
            await r.plc.set_reachable(False)
            await wait_until(lambda: not r.link.online, 1.0, "offline")
            st = r.link.status
            assert st.alarms == ["offline"] and st.last_error
            res = await r.link.send(command(r, 1, r.ahead(0) + 10_000), LEAD)
            assert res == EjectResult(None, "offline", None, None)
            with pytest.raises(PlcError):
                await r.link.command(PlcCommand.RESET)

            def failures() -> list[float]:
                return [e["retry_in_s"] for e in logs if e["event"] == "plc connect failed"]

            await wait_until(lambda: len(failures()) >= 4, 3.0, "connect retries")
            delays = failures()
            assert delays[:4] == [0.1, 0.2, 0.2, 0.2]  # doubling from reconnect_min_s, capped at reconnect_max_s

            # the PLC came back with other mailbox state (e.g. replaced): the link follows register 5
            r.plc.last_seq = 40_000
            await r.plc.set_reachable(True)
            await wait_until(lambda: r.link.online, 2.0, "online again")
            assert r.link.mailbox.next_seq == 40_001
            res = await r.link.send(command(r, 2, r.ahead(0) + 10_000), LEAD)
            assert res.outcome == "accepted" and res.seq == 40_001
    events = [e["event"] for e in logs]
    assert events.count("plc connected") == 3 and events.count("plc disconnected") == 2


@pytest.mark.asyncio
async def test_manual_valves_commands_and_alarms() -> None:
    async with rig() as r:
        await r.link.set_valve(1, 3, True)
        assert r.plc.coil(1, 3) and r.plc.coil_log[-1][1:] == (REGS.coil_valves + 35, True)
        await r.link.set_valve(1, 3, False)
        assert not r.plc.coil(1, 3)
        await r.link.set_valve(0, 7, True)
        await r.run_belt()
        assert not r.plc.coil(0, 7)  # valves are the PLC's once the belt runs
        with pytest.raises(PlcError) as err:
            await r.link.set_valve(0, 7, True)
        assert err.value.code == 6
        assert r.link.online  # an exception response is not a connection problem

        r.plc.set_air_ok(False)
        await wait_until(lambda: "air_pressure_low" in r.link.status.alarms, what="air alarm")
        r.plc.set_air_ok(True)
        r.plc.set_estop(True)
        await wait_until(lambda: r.link.status.estop and not r.link.status.belt_running, what="estop")
        assert r.link.status.alarms == ["estop"]
        await wait_until(lambda: r.clock.rate < r.clock.min_rate, what="clock model sees the stop")
        # the belt stands, so nothing expires; the e-stopped PLC takes nothing: bounded wait, not sent
        res = await r.link.send(command(r, 0, r.ahead(0.0) + 5_000), LEAD, max_wait_s=0.1)
        assert res == EjectResult(None, "timeout", None, None)
        r.plc.set_estop(False)
        await r.link.command(PlcCommand.STOP_BELT)
        assert r.link.status.alarms == [] and not r.link.status.belt_running
        assert r.link.status.speed_mm_s == 0


@pytest.mark.asyncio
async def test_virtual_plc_register_map_directly() -> None:
    """The wire format as a PLC programmer reads docs/plc-interface.md: word order, late commands, coils."""
    belt = Belt(CPMM, SPEED, encoder_start=2**32 - 7)
    fired: list[ExecutedEject] = []
    plc = VirtualPlc(REGS, belt, SimConfig(), on_eject=fired.append, scan_s=0.001)
    await plc.start("127.0.0.1", 0)
    client = ModbusClient("127.0.0.1", plc.port, unit_id=REGS.unit_id, timeout_s=0.5)
    try:
        await client.connect()
        regs = await client.read_input_registers(0, 8)
        assert regs[0:2] == [0xFFFF, 0xFFF9]  # 2**32 - 7, high word first
        assert regs[3] == 0b00010 and regs[4] == SimConfig().eject_queue_size and regs[5] == 0  # air ok, stopped

        await client.write_coil(REGS.coil_valves + 33, True)
        assert (await client.read_coils(REGS.coil_valves + 32, 4)) == [False, True, False, False]

        await client.write_register(REGS.hr_heartbeat, 1)  # arms the watchdog: the PLC accepts from now on
        await client.write_register(REGS.hr_command, 1)
        await wait_until(lambda: plc.holding(REGS.hr_command) == [0], what="start cleared")
        assert belt.running and not plc.coil(1, 1)
        await wait_until(lambda: belt.count() > 2**32 + 5_000, what="belt past the wrap")

        late_at = wrap32(belt.count() - 1_000)
        good_at = wrap32(belt.count() + 5_000)
        await client.write_registers(slot_of(1)[0], [1, 0, 0, 1, late_at >> 16, late_at & 0xFFFF, 50, 0])
        await client.write_registers(slot_of(2)[0], [2, 1, 0x8000, 0, good_at >> 16, good_at & 0xFFFF, 60, 0])
        await wait_until(lambda: plc.last_seq == 2, what="both accepted")
        await wait_until(lambda: len(fired) == 1, what="fired")
        regs = await client.read_input_registers(0, 8)
        assert regs[5:8] == [2, 1, 1]  # last seq, executed, late
        assert (plc.accepted, plc.executed, plc.late) == (2, 1, 1)
        assert fired[0].seq == 2 and fired[0].valve_mask == 0x8000_0000 and fired[0].open_at == 2**32 + good_at
    finally:
        client.close()
        await plc.stop()
