"""The PLC link: one Modbus TCP connection that polls, heartbeats and sends eject commands.

One task (`run`) owns the connection: it connects, polls the input registers
every `poll_interval_ms` in one FC4 read (feeding the clock model with the
request/response times), writes the heartbeat every `heartbeat_interval_ms`,
and on any trouble drops the connection, reports offline and reconnects with
exponential backoff. It never raises for connection trouble.

`send()` writes eject commands into the PLC's mailbox (docs/plc-interface.md)
and completes when a poll shows the PLC accepted them. Everything after a
reconnect is resynchronised from the PLC's "last accepted seq" register,
which is the only truth about what the PLC has taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Literal

import structlog

from sorter.clock import ClockModel
from sorter.config import PlcConfig
from sorter.geometry import wrap32
from sorter.messages import EjectCommand
from sorter.plc.mailbox import Mailbox, MailboxDesync
from sorter.plc.modbus import ModbusClient, PlcError

VALVES_PER_BANK = 32  # coil layout: bank b, valve v -> coil_valves + 32 * b + v
SLOT_WORDS = 7  # seq, bank, mask hi, mask lo, open-at hi, open-at lo, open-for; the rest of a slot is reserved

Outcome = Literal["accepted", "expired", "offline", "timeout"]


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
class PlcStatus:
    online: bool = False
    belt_running: bool = False
    air_ok: bool = False
    estop: bool = False
    watchdog_tripped: bool = False
    queue_overflow: bool = False
    queue_free: int = 0
    last_seq: int = 0
    ejects_done: int = 0  # running totals, unwrapped from the PLC's 16-bit counters
    ejects_late: int = 0
    speed_mm_s: float = 0.0
    rtt_ms: float = 0.0
    last_error: str | None = None
    alarms: list[str] = field(default_factory=list)
    t_polled: float = 0.0  # PC monotonic time of the last poll's response


@dataclass(frozen=True, slots=True)
class EjectResult:
    seq: int | None
    outcome: Outcome
    t_sent: float | None  # when the slot write went out
    t_accepted: float | None  # response time of the poll that showed the PLC had accepted it


def _alarms(s: PlcStatus) -> list[str]:
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


class PlcLink:
    def __init__(self, cfg: PlcConfig, clock: ClockModel, *, log: Any = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.regs = r = cfg.registers
        self.log = (log or structlog.get_logger("plc")).bind(plc=f"{cfg.host}:{cfg.port}")
        self.mailbox = Mailbox(r.slot_count)
        self.heartbeat_enabled = True  # commissioning: switch off to prove the PLC's watchdog trips
        self._client = ModbusClient(cfg.host, cfg.port, unit_id=r.unit_id, timeout_s=cfg.timeout_s)
        addrs = r.input_addresses
        self._ir_lo = min(addrs)
        self._ir_count = max(addrs) - self._ir_lo + 1
        if self._ir_count > 125:
            raise ValueError(f"plc.registers: input registers span {self._ir_count} (> 125, one FC4 read)")
        self._status = PlcStatus(alarms=["offline"])
        self._stop = asyncio.Event()
        self._tick = asyncio.Event()  # replaced and set after every poll and on going offline
        self._send_lock = asyncio.Lock()
        self._waiters: dict[int, asyncio.Future[float | Outcome]] = {}
        self._hb_value = 0
        self._raw_done: int | None = None
        self._raw_late: int | None = None
        self._done_total = 0
        self._late_total = 0
        self._t_poll_request = 0.0
        self._run_done: asyncio.Future[None] | None = None

    # --- public state ---
    @property
    def status(self) -> PlcStatus:
        return self._status

    @property
    def online(self) -> bool:
        return self._status.online

    # --- lifecycle ---
    async def stop(self) -> None:
        """Make run() finish (it closes the connection) and wait until it has (at most a few s)."""
        self._stop.set()
        if self._run_done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._run_done), 4 * self.cfg.timeout_s + 1.0)

    async def run(self) -> None:
        """Connect, poll and heartbeat until stop(); reconnect with backoff on any trouble."""
        delay = self.cfg.reconnect_min_s
        failures = 0
        self._run_done = asyncio.get_running_loop().create_future()
        try:
            while not self._stop.is_set():
                try:
                    await self._client.connect()
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
                    self._client.close()
                    self._set_offline(str(exc))
                    delay = self.cfg.reconnect_min_s
                    self.log.debug("plc reconnect scheduled", retry_in_s=delay)
                    await self._pause(delay)
                    delay = min(delay * 2, self.cfg.reconnect_max_s)
        finally:
            self._client.close()
            self._set_offline("stopped", stopping=True)
            if not self._run_done.done():
                self._run_done.set_result(None)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _session(self) -> None:
        regs, t_req, t_resp = await self._client.read_input_registers_timed(self._ir_lo, self._ir_count)
        # the PLC's register 5 is the only truth about what it has taken
        self.mailbox.resync(regs[self.regs.ir_last_seq - self._ir_lo])
        self._apply_poll(regs, t_req, t_resp, online=True)
        self.log.info("plc connected", last_seq=self.mailbox.last_accepted, alarms=self._status.alarms)
        tasks = [
            asyncio.create_task(self._poll_loop(), name="plc-poll"),
            asyncio.create_task(self._heartbeat_loop(), name="plc-heartbeat"),
            asyncio.create_task(self._stop.wait(), name="plc-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if t.get_name() != "plc-stop" and (exc := t.exception()) is not None:
                raise exc

    def _set_offline(self, error: str, *, stopping: bool = False) -> None:
        was_online = self._status.online
        st = self._status
        # the last known PLC values stay visible (marked offline) for the HMI
        self._status = replace(st, online=False, last_error=error, alarms=["offline"])
        # a command written but not seen accepted has an unknown fate; the resync on
        # reconnect makes the mailbox right again
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result("offline")
        self._waiters.clear()
        if was_online and stopping:
            self.log.info("plc link stopped")
        elif was_online:
            self.log.warning("plc disconnected", error=error)
            self._log_alarms(st.alarms, ["offline"])
        self._notify()

    # --- polling and heartbeat ---
    async def _poll_loop(self) -> None:
        interval = self.cfg.poll_interval_ms / 1000.0
        next_t = time.monotonic()
        while True:
            next_t += interval
            wait = next_t - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                next_t = time.monotonic()  # late: skip ahead rather than burst
            regs, t_req, t_resp = await self._client.read_input_registers_timed(self._ir_lo, self._ir_count)
            self._apply_poll(regs, t_req, t_resp)

    async def _heartbeat_loop(self) -> None:
        interval = self.cfg.heartbeat_interval_ms / 1000.0
        while True:
            if self.heartbeat_enabled:
                self._hb_value = (self._hb_value + 1) & 0xFFFF
                await self._client.write_register(self.regs.hr_heartbeat, self._hb_value)
            await asyncio.sleep(interval)

    def _apply_poll(self, regs: list[int], t_req: float, t_resp: float, *, online: bool = False) -> None:
        r = self.regs

        def reg(address: int) -> int:
            return regs[address - self._ir_lo]

        self.clock.add(t_req, t_resp, (reg(r.ir_encoder) << 16) | reg(r.ir_encoder + 1))
        bits = reg(r.ir_status)
        last_seq = reg(r.ir_last_seq)
        try:
            accepted = self.mailbox.on_accepted(last_seq)
        except MailboxDesync as exc:
            self.log.error("plc mailbox desync, resynchronising", error=str(exc))
            self.mailbox.resync(last_seq)
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_result("timeout")
            self._waiters.clear()
            accepted = []
        for seq in accepted:
            waiter = self._waiters.pop(seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(t_resp)
        done, late = reg(r.ir_ejects_done), reg(r.ir_ejects_late)
        if self._raw_done is None or self._raw_late is None:
            self._done_total, self._late_total = done, late
        else:
            self._done_total += (done - self._raw_done) & 0xFFFF
            self._late_total += (late - self._raw_late) & 0xFFFF
        self._raw_done, self._raw_late = done, late
        prev = self._status
        st = PlcStatus(
            online=online or prev.online,
            belt_running=bool(bits & (1 << StatusBit.BELT_RUNNING)),
            air_ok=bool(bits & (1 << StatusBit.AIR_OK)),
            estop=bool(bits & (1 << StatusBit.ESTOP)),
            watchdog_tripped=bool(bits & (1 << StatusBit.WATCHDOG_TRIPPED)),
            queue_overflow=bool(bits & (1 << StatusBit.QUEUE_OVERFLOW)),
            queue_free=reg(r.ir_queue_free),
            last_seq=last_seq,
            ejects_done=self._done_total,
            ejects_late=self._late_total,
            speed_mm_s=float(reg(r.ir_speed)),
            rtt_ms=(t_resp - t_req) * 1000.0,
            last_error=prev.last_error,
            t_polled=t_resp,
        )
        alarms = _alarms(st)
        self._status = replace(st, alarms=alarms)
        self._t_poll_request = t_req
        if alarms != prev.alarms:
            self._log_alarms(prev.alarms, alarms)
        self._notify()

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

    async def _poll_after(self, t: float, timeout: float) -> None:
        """Wait for a poll whose request left after PC time t (so it shows what happened before t)."""
        deadline = time.monotonic() + timeout
        while self._t_poll_request <= t:
            if not self.online:
                raise PlcError("PLC went offline")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PlcError(f"no poll of the PLC within {timeout:g} s")
            await self._wait_tick(left)

    # --- eject commands ---
    def _expired(self, cmd: EjectCommand, min_lead_s: float) -> bool:
        """Would the command reach the PLC less than min_lead_s before its open count?"""
        one_way = self._status.rtt_ms / 2000.0
        return self.clock.count_at(time.monotonic() + one_way + min_lead_s) >= cmd.open_at

    def _can_write(self) -> bool:
        st = self._status
        # the PLC takes nothing while tripped or e-stopped; more than queue_free would overflow it
        return (
            self.mailbox.can_write()
            and st.queue_free > self.mailbox.pending
            and not st.watchdog_tripped
            and not st.estop
        )

    async def send(self, cmd: EjectCommand, min_lead_s: float, max_wait_s: float | None = None) -> EjectResult:
        """Write one eject command and wait until the PLC accepted it.

        Outcomes: 'accepted'; 'expired' (not sent: it could no longer reach
        the PLC min_lead_s before its open count, also after waiting for room);
        'offline' (link down or not yet synchronised, or it went down before
        acceptance was seen: the PLC may or may not execute it); 'timeout'
        (not sent because the PLC had no room for max_wait_s, default
        timeout_s - e.g. e-stopped with the belt standing, so nothing can expire -
        or written but no acceptance seen within timeout_s; seq tells which).
        """
        _check_command(cmd)
        give_up = time.monotonic() + (self.cfg.timeout_s if max_wait_s is None else max_wait_s)
        async with self._send_lock:  # FIFO: commands go out in the order send() was called
            while True:
                if not self.online or not self.clock.ready:
                    return EjectResult(None, "offline", None, None)
                if self._expired(cmd, min_lead_s):
                    return EjectResult(None, "expired", None, None)
                if self._can_write():
                    break
                left = give_up - time.monotonic()
                if left <= 0:
                    return EjectResult(None, "timeout", None, None)
                await self._wait_tick(min(left, self.cfg.timeout_s))
            seq, slot = self.mailbox.reserve()
            fut: asyncio.Future[float | Outcome] = asyncio.get_running_loop().create_future()
            self._waiters[seq] = fut
            t_sent = time.monotonic()
            # shielded: once a seq is reserved its slot write must finish even if the caller
            # gives up, or the PLC would wait for that seq forever
            write = asyncio.ensure_future(self._write_slot(seq, slot, cmd))
            if not await asyncio.shield(write):
                return EjectResult(seq, "offline", t_sent, None)
        try:
            got = await asyncio.wait_for(asyncio.shield(fut), self.cfg.timeout_s)
        except TimeoutError:
            self._waiters.pop(seq, None)
            return EjectResult(seq, "timeout", t_sent, None)
        if isinstance(got, float):
            return EjectResult(seq, "accepted", t_sent, got)
        return EjectResult(seq, got, t_sent, None)

    async def _write_slot(self, seq: int, slot: int, cmd: EjectCommand) -> bool:
        r = self.regs
        at32 = wrap32(cmd.open_at)
        words = [seq, cmd.bank, cmd.valve_mask >> 16, cmd.valve_mask & 0xFFFF, at32 >> 16, at32 & 0xFFFF, cmd.open_for]
        words += [0] * (r.slot_stride - SLOT_WORDS)
        try:
            await self._client.write_registers(r.hr_slots + slot * r.slot_stride, words)
            return True
        except PlcError as exc:
            # whether the PLC got it is unknown: drop the connection, the resync on
            # reconnect puts the mailbox right
            self.log.error("plc slot write failed", seq=seq, error=str(exc))
            self._client.close()
            fut = self._waiters.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result("offline")
            return False

    # --- belt commands and manual valves ---
    async def command(self, code: int | PlcCommand, timeout_s: float | None = None) -> None:
        """Write the command register and wait until the PLC cleared it and a poll shows the result.

        Raises PlcError when offline, on a failed write or if the PLC does not clear it in time.
        """
        code = PlcCommand(code)
        if not self.online:
            raise PlcError(f"command {code.name}: PLC offline")
        timeout = timeout_s if timeout_s is not None else max(1.0, 4 * self.cfg.timeout_s)
        deadline = time.monotonic() + timeout
        await self._client.write_register(self.regs.hr_command, int(code))
        while True:
            (value,) = await self._client.read_holding_registers(self.regs.hr_command, 1)
            if value == 0:
                break
            if time.monotonic() > deadline:
                raise PlcError(f"command {code.name}: PLC did not clear the command register within {timeout:g} s")
            await asyncio.sleep(self.cfg.poll_interval_ms / 1000.0)
        await self._poll_after(time.monotonic(), max(deadline - time.monotonic(), self.cfg.timeout_s))
        self.log.info("plc command done", command=code.name)

    async def set_valve(self, bank: int, valve: int, on: bool) -> None:
        """Switch one valve by hand (the PLC honours it only while the belt is stopped and no fault is active)."""
        if not 0 <= valve < VALVES_PER_BANK or bank < 0:
            raise ValueError(f"no valve {valve} in bank {bank}")
        if not self.online:
            raise PlcError("set_valve: PLC offline")
        await self._client.write_coil(self.regs.coil_valves + bank * VALVES_PER_BANK + valve, on)


def _check_command(cmd: EjectCommand) -> None:
    if not 0 <= cmd.bank <= 0xFFFF:
        raise ValueError(f"bank {cmd.bank} out of range")
    if not 0 < cmd.valve_mask < 1 << 32:
        raise ValueError(f"valve mask {cmd.valve_mask:#x} must be non-zero and fit 32 bits")
    if not 1 <= cmd.open_for <= 0xFFFF:
        raise ValueError(f"open_for {cmd.open_for} counts must be 1..65535")
