"""What every PLC link shares, whatever the protocol: status, outcomes, reconnect policy, alarms.

A link owns one connection to the PLC. `run()` connects, runs a protocol
session until it fails, reports offline and reconnects with exponential
backoff; it never raises for connection trouble. Subclasses (Modbus in
sorter.drivers.plc.link, OPC UA in sorter.drivers.plc.opcua_link) provide `_connect`,
`_session`, `_close`, `send`, `command` and `set_valve` with the same
meaning, so everything above the link is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

import structlog

from sorter.config import PlcConfig
from sorter.core.clock import ClockModel
from sorter.core.messages import EjectCommand, Outcome, PlcStatus

VALVES_PER_BANK = 32
CANCEL_RETRY_S = 0.1  # a session loop still running this long after a cancel is cancelled again


class PlcError(Exception):
    """Any failure talking to the PLC: not connected, timeout, lost connection, a refused request.

    `code` is the Modbus exception code when the PLC answered with one (the
    connection is fine then), else None.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PlcCommand(IntEnum):
    START_BELT = 1
    STOP_BELT = 2
    RESET = 3


class StatusBit(IntEnum):
    BELT_RUNNING = 0
    AIR_OK = 1
    ESTOP = 2
    WATCHDOG_TRIPPED = 3
    QUEUE_OVERFLOW = 4


@dataclass(frozen=True, slots=True)
class EjectResult:
    seq: int | None
    outcome: Outcome
    t_sent: float | None  # when the command went out
    t_accepted: float | None  # when the PC learnt that the PLC had accepted it


def status_from_bits(bits: int, **values: Any) -> PlcStatus:
    """A PlcStatus from the status word plus the other values; alarms filled in."""
    st = PlcStatus(
        belt_running=bool(bits & (1 << StatusBit.BELT_RUNNING)),
        air_ok=bool(bits & (1 << StatusBit.AIR_OK)),
        estop=bool(bits & (1 << StatusBit.ESTOP)),
        watchdog_tripped=bool(bits & (1 << StatusBit.WATCHDOG_TRIPPED)),
        queue_overflow=bool(bits & (1 << StatusBit.QUEUE_OVERFLOW)),
        **values,
    )
    return replace(st, alarms=alarms_of(st))


def alarms_of(s: PlcStatus) -> list[str]:
    if not s.online:
        return ["offline"]
    out = []
    if s.estop:
        out.append("estop")
    if not s.air_ok:
        out.append("air_pressure_low")
    if s.watchdog_tripped:
        out.append("watchdog_tripped")
    if s.queue_overflow:
        out.append("eject_queue_overflow")
    return out


def check_command(cmd: EjectCommand) -> None:
    if not 0 <= cmd.bank <= 0xFFFF:
        raise ValueError(f"bank {cmd.bank} out of range")
    if not 0 < cmd.valve_mask < 1 << 32:
        raise ValueError(f"valve mask {cmd.valve_mask:#x} must be non-zero and fit 32 bits")
    if not 1 <= cmd.open_for <= 0xFFFF:
        raise ValueError(f"open_for {cmd.open_for} counts must be 1..65535")


def check_valve(bank: int, valve: int) -> None:
    if not 0 <= valve < VALVES_PER_BANK or bank < 0:
        raise ValueError(f"no valve {valve} in bank {bank}")


# The PLC's counters only count up and wrap (docs/plc-interface.md section 3); between two looks they move by
# at most the commands it can execute in that time, far below half their range. A step "backwards" (a modular
# difference of half the range or more) is a counter that started again from 0: the PLC restarted.
def plc_restarted(
    pc_last_seq: int, plc_last_seq: int, counters: tuple[tuple[int | None, int], ...], modulus: int = 0x10000
) -> str | None:
    """Why the PLC's values show it restarted since the PC last saw them (None: they do not).

    - its last accepted seq is 0 although the PC saw it accept `pc_last_seq` > 0: seq never returns to 0
      (65535 is followed by 1), only a power-up clears it;
    - one of its counters (ejects done, late), given as (last raw value seen or None, raw value now), stepped
      back: they count since power-up and are never reset. `modulus`: where they wrap (Modbus registers
      2**16, the OPC UA UInt32 nodes 2**32).
    """
    if plc_last_seq == 0 and pc_last_seq != 0:
        return f"its last accepted seq went from {pc_last_seq} to 0"
    for old, new in counters:
        if old is not None and (new - old) % modulus >= modulus // 2:
            return f"a counter stepped back from {old} to {new}"
    return None


class PlcLinkBase:
    """Connection lifecycle, status publication and alarm logging shared by the protocol links."""

    def __init__(
        self, cfg: PlcConfig, clock: ClockModel, *, log: Any, where: str, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self._now = now  # the line's Timebase.now: the same clock as the poll times fed to `clock`
        self.log = (log or structlog.get_logger("plc")).bind(plc=where)
        self.heartbeat_enabled = True  # commissioning: switch off to prove the PLC's watchdog trips
        self.restarts = 0  # PLC restarts noticed (seq or counters back at their power-up values)
        self._status = PlcStatus(alarms=["offline"])
        self._stop = asyncio.Event()
        self._tick = asyncio.Event()  # replaced and set after every status update and on going offline
        self._run_done: asyncio.Future[None] | None = None
        # who wants each encoder poll as the clock model gets it: (t_request, t_response, count32, the status
        # after the poll); the recorder (sorter/line/recording.py). Called on the loop; must not block.
        self.poll_taps: list[Callable[[float, float, int, PlcStatus], None]] = []

    # --- public state ---
    @property
    def status(self) -> PlcStatus:
        return self._status

    @property
    def online(self) -> bool:
        return self._status.online

    # --- what a protocol provides ---
    async def _connect(self) -> None:
        raise NotImplementedError

    async def _session(self) -> None:
        """Run until the connection fails (raise PlcError) or stop() is called (return)."""
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _went_offline(self) -> None:
        """Hook: fail whatever waits on the connection (the fate of unacknowledged commands is unknown)."""

    # --- lifecycle ---
    async def stop(self) -> None:
        """Make run() finish (it closes the connection) and wait until it has (at most a few s)."""
        self._stop.set()
        if self._run_done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._run_done), 4 * self.cfg.timeout_s + 1.0)

    async def run(self) -> None:
        """Connect and run sessions until stop(); reconnect with backoff on any trouble."""
        delay = self.cfg.reconnect_min_s
        failures = 0
        self._run_done = asyncio.get_running_loop().create_future()
        try:
            while not self._stop.is_set():
                try:
                    await self._connect()
                except PlcError as exc:
                    failures += 1
                    self._set_offline(str(exc))
                    # the first failure is news; the rest of a streak is noise at warning level
                    (self.log.warning if failures == 1 else self.log.debug)(
                        "plc connect failed", error=str(exc), attempt=failures, retry_in_s=round(delay, 3)
                    )
                    await self._pause(delay)
                    delay = min(delay * 2, self.cfg.reconnect_max_s)
                    continue
                failures = 0
                try:
                    await self._session()
                except PlcError as exc:
                    await self._close()
                    self._set_offline(str(exc))
                    delay = self.cfg.reconnect_min_s
                    self.log.debug("plc reconnect scheduled", retry_in_s=delay)
                    await self._pause(delay)
                    delay = min(delay * 2, self.cfg.reconnect_max_s)
        finally:
            await self._close()
            self._set_offline("stopped", stopping=True)
            if not self._run_done.done():
                self._run_done.set_result(None)

    async def _every_poll(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run step() every plc.poll_interval_ms (late: skip ahead rather than burst) until it raises."""
        interval = self.cfg.poll_interval_ms / 1000.0
        next_t = self._now()
        while True:
            next_t += interval
            wait = next_t - self._now()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                next_t = self._now()
            await step()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _until_stopped(self, *loops: Any) -> None:
        """Run the session's loops until one fails (its PlcError is raised) or stop() is called."""
        tasks = [asyncio.create_task(c) for c in loops]
        tasks.append(asyncio.create_task(self._stop.wait(), name="plc-stop"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # on Python 3.11 wait_for() (asyncua wraps every request in it) loses a cancellation that lands as
            # the request completes (gh-86296), and that loop would run on: cancel again until each has ended
            pending = set(tasks)
            while pending:
                for t in pending:
                    t.cancel()
                _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
            for t in tasks:
                if not t.cancelled():
                    t.exception()  # retrieved: a loop that failed while being stopped is not an error to report
        for t in done:
            if t.get_name() != "plc-stop" and (exc := t.exception()) is not None:
                raise exc

    def _set_offline(self, error: str, *, stopping: bool = False) -> None:
        was_online = self._status.online
        st = self._status
        # the last known PLC values stay visible (marked offline) for the HMI
        self._status = replace(st, online=False, last_error=error, alarms=["offline"])
        self._went_offline()
        if was_online and stopping:
            self.log.info("plc link stopped")
        elif was_online:
            self.log.warning("plc disconnected", error=error)
            self._log_alarms(st.alarms, ["offline"])
        self._notify()

    def _publish(self, st: PlcStatus) -> None:
        """Make a new status current, logging alarms raised and cleared."""
        prev, self._status = self._status, st
        if st.alarms != prev.alarms:
            self._log_alarms(prev.alarms, st.alarms)
        self._notify()

    def _noticed_restart(self, why: str, pc_last_seq: int, plc_last_seq: int, pending: int) -> None:
        """Count and raise a PLC restart (seen in its seq or counters): its eject queue was lost."""
        self.restarts += 1
        self.log.warning(
            "ALARM plc restarted: its eject queue and counters were lost, resynchronising",
            reason=why,
            pc_last_seq=pc_last_seq,
            plc_last_seq=plc_last_seq,
            pending=pending,
            action="commands the PLC had queued will not fire; check why the PLC restarted (power, watchdog, program)",
        )

    def _tap_poll(self, t_req: float, t_resp: float, count32: int) -> None:
        for tap in self.poll_taps:
            tap(t_req, t_resp, count32, self._status)

    def _log_alarms(self, before: list[str], after: list[str]) -> None:
        for name in after:
            if name not in before:
                self.log.warning("plc alarm raised", alarm=name)
        for name in before:
            if name not in after:
                self.log.info("plc alarm cleared", alarm=name)

    def _notify(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def _wait_tick(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tick.wait(), timeout)

    def _expired(self, cmd: EjectCommand, min_lead_s: float) -> bool:
        """Would the command reach the PLC less than min_lead_s before its open count?"""
        one_way = self._status.rtt_ms / 2000.0
        return self.clock.count_at(self._now() + one_way + min_lead_s) >= cmd.open_at

    # --- the interface every link has ---
    async def send(self, cmd: EjectCommand, min_lead_s: float, max_wait_s: float | None = None) -> EjectResult:
        raise NotImplementedError

    async def command(self, code: int | PlcCommand, timeout_s: float | None = None) -> None:
        raise NotImplementedError

    async def set_valve(self, bank: int, valve: int, on: bool) -> None:
        raise NotImplementedError

    async def read_chute_counts(self, banks: int) -> list[int]:
        """The optional chute light-barrier counters, one per bank (commissioning: hw.calibrate_eject).

        Raw counts that wrap (16 bits over Modbus, 32 over OPC UA): compare readings with `chute_delta`.
        Raises PlcError when offline or when the PLC has none.
        """
        raise NotImplementedError


def chute_delta(new: int, old: int) -> int:
    """Pieces counted between two readings of a chute counter; modulo 2**16 suits both protocols' wraps
    (fewer than 65 536 pieces pass between two readings)."""
    return (new - old) % (1 << 16)
