"""The replay PLC (sorter/drivers/plc/replay.py): the recorded encoder track read back at any time, the
mailbox accepting at once and in order, and the unchanged PLC link running on it in virtual time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sorter.config import PlcConfig
from sorter.core.clock import ClockModel
from sorter.core.messages import EjectCommand, Outcome
from sorter.drivers.plc.link import PlcLink
from sorter.drivers.plc.replay import ReplayPlc
from sorter.line.virtualtime import VirtualClock, VirtualTimeLoop

pytestmark = pytest.mark.fast

CPS = 10_000  # counts per second of the recorded belt
START = 2**32 - 3_000  # the counter wraps 0.3 s into the track


def polls(t0: float = 100.0, n: int = 200, period: float = 0.01, status: int = 0b11) -> list[dict[str, Any]]:
    out = []
    for k in range(n):
        t = t0 + k * period
        out.append(
            {
                "t_request": t - 0.0005,
                "t_response": t + 0.0005,
                "count32": round(START + CPS * (t - t0)) % 2**32,
                "speed_mm_s": 2500.0,
                "status": status if k < n // 2 else status | 0b100,  # e-stop from the middle on
                "queue_free": 16,
                "last_seq": 0,
            }
        )
    return out


def run(clock: VirtualClock, coro: Any) -> Any:
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def test_the_count_is_interpolated_between_recorded_polls_across_the_wrap() -> None:
    clock = VirtualClock(100.0, 0.0)
    plc = ReplayPlc(PlcConfig(), polls(), clock.now)
    assert plc.count_at(100.0) == START
    assert plc.count_at(100.005) == START + 50  # between two polls
    assert plc.count_at(100.5) == START + 5_000  # past 2**32: unwrapped along the track
    assert plc.count_at(50.0) == START  # before the recording: standing at its first count
    assert plc.count_at(200.0) == START + CPS * 1.99  # after it: standing at its last
    regs = plc.input_registers(100.5)
    r = plc.regs
    assert (regs[r.ir_encoder] << 16 | regs[r.ir_encoder + 1]) == (START + 5_000) % 2**32
    assert regs[r.ir_status] == 0b11 and plc.input_registers(101.5)[r.ir_status] == 0b111
    assert regs[r.ir_speed] == 2500 and regs[r.ir_queue_free] == r.slot_count


def test_the_mailbox_accepts_at_once_and_in_seq_order() -> None:
    clock = VirtualClock(100.0, 0.0)
    plc = ReplayPlc(PlcConfig(), polls(), clock.now)
    r = plc.regs

    def slot(seq: int) -> int:
        return r.hr_slots + (seq % r.slot_count) * r.slot_stride

    async def go() -> None:
        await plc.connect()
        await plc.write_registers(slot(2), [2, 0, 0, 1, 0, 5, 30, 0])  # seq 2 before seq 1: waits
        assert plc.last_seq == 0
        await plc.write_registers(slot(1), [1, 1, 0, 3, 0, 9, 30, 0])
        assert plc.last_seq == 2 and [c.seq for c in plc.commands] == [1, 2]
        assert plc.commands[0].valve_mask == 3 and plc.commands[0].open_at32 == 9
        await plc.write_register(r.hr_command, 1)
        assert await plc.read_holding_registers(r.hr_command, 1) == [0]  # taken at once
        assert plc.belt_commands[0][1] == 1

    run(clock, go())


def test_the_unchanged_link_runs_on_it_in_virtual_time() -> None:
    clock = VirtualClock(100.0, 0.0)
    cfg = PlcConfig()
    model = ClockModel(clock=clock.now)
    plc = ReplayPlc(cfg, polls(n=400), clock.now)
    link = PlcLink(cfg, model, now=clock.now, client=plc)

    async def go() -> tuple[Outcome, float, bool]:
        task = asyncio.create_task(link.run())
        while not (link.online and model.ready):
            await asyncio.sleep(0.01)
        t = clock.now()
        at = model.count_at(t)
        result = await link.send(EjectCommand(1, 0, 0b1, round(at + CPS), 40), 0.05)
        st = link.status
        await link.stop()
        await asyncio.gather(task, return_exceptions=True)
        return result.outcome, abs(at - plc.count_at(t)), st.belt_running

    outcome, err, running = run(clock, go())
    assert outcome is Outcome.ACCEPTED
    assert err < 5  # the clock model fitted on the replayed polls reads the recorded belt
    assert running
    assert [c.seq for c in plc.commands] == [1]


def test_a_recording_without_polls_is_refused() -> None:
    from sorter.drivers.plc.base import PlcError

    with pytest.raises(PlcError, match="no encoder polls"):
        ReplayPlc(PlcConfig(), [], lambda: 0.0)


def test_the_timed_polls_play_the_recorded_samples_back() -> None:
    """The clock model must get the samples the live one got: same request/response times, same counts."""
    clock = VirtualClock(99.99, 0.0)
    rec = polls(n=20)
    plc = ReplayPlc(PlcConfig(), rec, clock.now)
    r = plc.regs

    async def go() -> list[tuple[float, float, int]]:
        await plc.connect()
        out = []
        for _ in range(5):
            regs, t_req, t_resp = await plc.read_input_registers_timed(r.ir_encoder, 8)
            out.append((t_req, t_resp, regs[0] << 16 | regs[1]))
            await asyncio.sleep(0.01 - 0.0008)  # the link's interval after the answer
        return out

    got = run(clock, go())
    assert got == [(p["t_request"], p["t_response"], p["count32"]) for p in rec[:5]]
    assert plc.polls_played == 5
