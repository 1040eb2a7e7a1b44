"""The line's own conditions and acting states (sorter/line/control.py) against an in-process PLC fake.

`LineControl` sees only a PLC port, two readiness checks, an event recorder and a clock, so these
run in milliseconds with the clock advanced by hand: no simulator, no sleeps that hope.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import structlog

from sorter.config import StateMachineConfig
from sorter.core.messages import PlcStatus
from sorter.core.packml import Command, State
from sorter.drivers.plc.base import PlcCommand, alarms_of
from sorter.line.control import LineControl
from tests.conftest import wait_until

pytestmark = pytest.mark.fast

RUNNING = PlcStatus(online=True, belt_running=True, air_ok=True)


class FakePlc:
    """The PLC link's port: a status the test sets, and the commands the line sent."""

    def __init__(self) -> None:
        self._status = replace(RUNNING, belt_running=False)
        self.sent: list[PlcCommand] = []

    @property
    def status(self) -> PlcStatus:
        return self._status

    @property
    def online(self) -> bool:
        return self._status.online

    def set(self, **changes: Any) -> None:
        st = replace(self._status, **changes)
        self._status = replace(st, alarms=alarms_of(st))

    async def command(self, cmd: PlcCommand, timeout_s: float = 2.0) -> None:
        if not self._status.online:
            raise RuntimeError("PLC offline")
        self.sent.append(cmd)
        if cmd is PlcCommand.START_BELT:
            self.set(belt_running=True)
        elif cmd is PlcCommand.STOP_BELT:
            self.set(belt_running=False)
        elif cmd is PlcCommand.RESET:
            self.set(watchdog_tripped=False, queue_overflow=False)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def line() -> tuple[LineControl, FakePlc, Clock, list[tuple[str, dict[str, Any]]]]:
    plc, clock, events = FakePlc(), Clock(), []
    ctl = LineControl(
        StateMachineConfig(starved_after_s=10.0, start_timeout_s=5.0),
        plc,
        clock_ready=lambda: True,
        cameras_online=lambda: True,
        record_event=lambda kind, **kw: events.append((kind, kw)),
        log=structlog.get_logger("test"),
        now=clock,
    )
    return ctl, plc, clock, events


async def settle(ctl: LineControl, want: State) -> None:
    await wait_until(lambda: ctl.state is want, 2.0)


async def executing(ctl: LineControl) -> None:
    await ctl.command(Command.RESET)
    await settle(ctl, State.IDLE)
    await ctl.command(Command.START)
    await settle(ctl, State.EXECUTE)


async def test_start_resets_the_plc_runs_the_belt_and_records_each_state(line):
    ctl, plc, _, events = line
    await executing(ctl)
    assert plc.sent == [PlcCommand.RESET, PlcCommand.RESET, PlcCommand.START_BELT]
    assert [kw["new"] for kind, kw in events if kind == "state"] == ["Resetting", "Idle", "Starting", "Execute"]
    assert ctl.ejecting


async def test_estop_aborts_the_line(line):
    ctl, plc, _, _ = line
    await executing(ctl)
    plc.set(estop=True)
    ctl.check()
    await settle(ctl, State.ABORTED)
    assert plc.sent[-1] is PlcCommand.STOP_BELT
    assert not ctl.ejecting
    # Clear is refused while the e-stop is still pressed: the line aborts again
    await ctl.command(Command.CLEAR)
    await settle(ctl, State.ABORTED)
    plc.set(estop=False)
    await ctl.command(Command.CLEAR)
    await settle(ctl, State.STOPPED)


async def test_a_lost_plc_link_holds_the_line_and_its_return_unholds_it(line):
    ctl, plc, _, events = line
    await executing(ctl)
    plc.set(online=False, last_error="connection refused")
    ctl.check()
    await settle(ctl, State.HELD)
    assert not ctl.ejecting  # every piece goes to the default fraction while held
    ctl.check()
    assert ctl.state is State.HELD  # still no link: stays held
    plc.set(online=True, watchdog_tripped=True)  # its watchdog tripped meanwhile
    ctl.check()
    await settle(ctl, State.EXECUTE)
    assert plc.sent[-1] is PlcCommand.RESET  # Unholding reset the tripped watchdog
    whys = [kw["why"] for kind, kw in events if kind == "state"]
    assert "PLC link lost" in whys and "PLC link back" in whys


async def test_an_operators_hold_is_not_lifted_by_the_link_coming_back(line):
    ctl, plc, _, _ = line
    await executing(ctl)
    await ctl.command(Command.HOLD, user="anna")
    await settle(ctl, State.HELD)
    plc.set(online=False)
    ctl.check()
    plc.set(online=True)
    ctl.check()
    await asyncio.sleep(0)
    assert ctl.state is State.HELD  # the operator held it: only the operator unholds it
    await ctl.command(Command.UNHOLD, user="anna")
    await settle(ctl, State.EXECUTE)


async def test_a_tripped_watchdog_holds_until_the_plc_is_reset(line):
    ctl, plc, _, _ = line
    await executing(ctl)
    plc.set(watchdog_tripped=True)
    ctl.check()
    await settle(ctl, State.HELD)
    ctl.check()  # the link is up: unhold, which resets the PLC
    await settle(ctl, State.EXECUTE)
    assert plc.sent[-1] is PlcCommand.RESET and not plc.status.watchdog_tripped


async def test_an_automatic_unhold_that_loses_the_link_again_goes_back_to_held_and_retries(line):
    ctl, plc, clock, events = line
    await executing(ctl)
    plc.set(watchdog_tripped=True)
    ctl.check()
    await settle(ctl, State.HELD)
    real = plc.command

    async def link_drops(cmd: PlcCommand, timeout_s: float = 2.0) -> None:
        plc.set(online=False)  # the reset's write never gets through: the connection is lost meanwhile
        raise RuntimeError("write holding register 1: connection lost")

    plc.command = link_drops  # type: ignore[method-assign]
    ctl.check()  # the link is up: unhold (which resets the PLC), and that fails
    await settle(ctl, State.HELD)
    assert any("unholding failed" in kw["why"] for kind, kw in events if kind == "state")
    plc.command = real  # type: ignore[method-assign]
    plc.set(online=True)
    ctl.check()
    assert ctl.state is State.HELD  # not before the retry delay
    clock.t += 10.0
    ctl.check()
    await settle(ctl, State.EXECUTE)  # held by the line, lifted by the line: no operator needed


async def test_a_dry_feed_suspends_the_line_and_the_next_piece_resumes_it(line):
    ctl, _, clock, _ = line
    await executing(ctl)
    clock.t += 9.9
    ctl.check()
    assert ctl.state is State.EXECUTE  # not yet starved_after_s
    clock.t += 0.2
    ctl.check()
    await settle(ctl, State.SUSPENDED)
    assert ctl.ejecting  # suspended for want of pieces, still sorting what comes
    ctl.piece_seen()
    ctl.check()
    await settle(ctl, State.EXECUTE)


async def test_starting_gives_up_when_the_belt_does_not_run(line):
    ctl, plc, clock, events = line

    async def jammed(cmd: PlcCommand, timeout_s: float = 2.0) -> None:
        plc.sent.append(cmd)  # the PLC takes START_BELT, but the belt never runs (a jammed drive)

    plc.command = jammed  # type: ignore[method-assign]
    await ctl.command(Command.RESET)
    await settle(ctl, State.IDLE)
    await ctl.command(Command.START)
    await wait_until(lambda: PlcCommand.START_BELT in plc.sent, 2.0)
    clock.t += 6.0  # past states.start_timeout_s
    await settle(ctl, State.STOPPED)
    assert any(kind == "alarm" and kw["alarm"] == "starting_failed" for kind, kw in events)


async def test_stop_turns_the_belt_off(line):
    ctl, plc, _, _ = line
    await executing(ctl)
    await ctl.command(Command.STOP)
    await settle(ctl, State.STOPPED)
    assert plc.sent[-1] is PlcCommand.STOP_BELT and not plc.status.belt_running
