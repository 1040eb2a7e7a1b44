"""The Modbus PLC link: one Modbus TCP connection that polls, heartbeats and sends eject commands.

One task (`run`) owns the connection: it connects, polls the input registers
every `poll_interval_ms` in one FC4 read (feeding the clock model with the
request/response times), writes the heartbeat every `heartbeat_interval_ms`,
and on any trouble drops the connection, reports offline and reconnects with
exponential backoff. It never raises for connection trouble.

`send()` writes eject commands into the PLC's mailbox (docs/plc-interface.md)
and completes when a poll shows the PLC accepted them. Everything after a
reconnect is resynchronised from the PLC's "last accepted seq" register,
which is the only truth about what the PLC has taken. A PLC that sits on a
written command although it reports room and no fault has lost the write
(every later seq would wait behind it): that fails the session too, so the
link goes offline (an alarm) and resynchronises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sorter.config import PlcConfig
from sorter.core.clock import ClockModel
from sorter.core.geometry import wrap32
from sorter.core.messages import EjectCommand
from sorter.drivers.plc.base import (
    VALVES_PER_BANK,
    EjectResult,
    Outcome,
    PlcCommand,
    PlcError,
    PlcLinkBase,
    PlcStatus,
    StatusBit,
    check_command,
    check_valve,
    plc_restarted,
    status_from_bits,
)
from sorter.drivers.plc.mailbox import Mailbox, MailboxDesync
from sorter.drivers.plc.modbus import ModbusClient

__all__ = ["EjectResult", "PlcCommand", "PlcLink", "PlcStatus", "StatusBit"]

SLOT_WORDS = 7  # seq, bank, mask hi, mask lo, open-at hi, open-at lo, open-for; the rest of a slot is reserved
# A PLC that reports room and no fault accepts a written command within a scan or two (docs/plc-interface.md
# section 6); one that has not after this many link timeouts (at least MAILBOX_STUCK_MIN_S: a reset disarms the
# watchdog until the next heartbeat) has lost the write, and the link reconnects to resynchronise.
MAILBOX_STUCK_TIMEOUTS = 4
MAILBOX_STUCK_MIN_S = 0.5


class RegisterClient(Protocol):
    """What the link needs of its transport: ModbusClient (Modbus TCP) on a plant and in the real-time demo,
    the virtual PLC's registers reached in-process in the lockstep simulation (sim/lockstep.py)."""

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    def close(self) -> None: ...

    async def read_input_registers_timed(self, address: int, count: int) -> tuple[list[int], float, float]: ...

    async def read_input_registers(self, address: int, count: int) -> list[int]: ...

    async def read_holding_registers(self, address: int, count: int) -> list[int]: ...

    async def write_register(self, address: int, value: int) -> None: ...

    async def write_registers(self, address: int, values: Sequence[int]) -> None: ...

    async def write_coil(self, address: int, on: bool) -> None: ...

    async def read_coils(self, address: int, count: int) -> list[bool]: ...


class PlcLink(PlcLinkBase):
    def __init__(
        self,
        cfg: PlcConfig,
        clock: ClockModel,
        *,
        log: Any = None,
        now: Callable[[], float] = time.monotonic,
        client: RegisterClient | None = None,
    ) -> None:
        super().__init__(cfg, clock, log=log, where=f"{cfg.host}:{cfg.port}", now=now)
        self.regs = r = cfg.registers
        self.mailbox = Mailbox(r.slot_count)
        self._client: RegisterClient = client or ModbusClient(
            cfg.host, cfg.port, unit_id=r.unit_id, timeout_s=cfg.timeout_s, now=now
        )
        addrs = r.input_addresses
        self._ir_lo = min(addrs)
        self._ir_count = max(addrs) - self._ir_lo + 1
        if self._ir_count > 125:
            raise ValueError(f"plc.registers: input registers span {self._ir_count} (> 125, one FC4 read)")
        self._send_lock = asyncio.Lock()
        self._waiters: dict[int, asyncio.Future[float | Outcome]] = {}
        self._hb_value = 0
        self._raw_done: int | None = None
        self._raw_late: int | None = None
        self._done_total = 0
        self._late_total = 0
        self._t_poll_request = 0.0
        self._stuck_s = max(MAILBOX_STUCK_TIMEOUTS * cfg.timeout_s, MAILBOX_STUCK_MIN_S)
        self._waiting_since: float | None = None  # since when the PLC could take a pending seq and has not

    # --- the protocol session ---
    async def _connect(self) -> None:
        await self._client.connect()

    async def _close(self) -> None:
        self._client.close()

    async def _session(self) -> None:
        regs, t_req, t_resp = await self._client.read_input_registers_timed(self._ir_lo, self._ir_count)
        self._check_restart(regs)  # a PLC that was power-cycled while the link was down
        # the PLC's register 5 is the only truth about what it has taken
        self.mailbox.resync(regs[self.regs.ir_last_seq - self._ir_lo])
        self._waiting_since = None
        self._apply_poll(regs, t_req, t_resp, online=True)
        self.log.info("plc connected", last_seq=self.mailbox.last_accepted, alarms=self._status.alarms)
        await self._until_stopped(self._poll_loop(), self._heartbeat_loop())

    def _went_offline(self) -> None:
        # a command written but not seen accepted has an unknown fate; the resync on
        # reconnect makes the mailbox right again
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(Outcome.OFFLINE)
        self._waiters.clear()

    # --- polling and heartbeat ---
    async def _poll_loop(self) -> None:
        async def step() -> None:
            regs, t_req, t_resp = await self._client.read_input_registers_timed(self._ir_lo, self._ir_count)
            self._apply_poll(regs, t_req, t_resp)

        await self._every_poll(step)

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

        count32 = (reg(r.ir_encoder) << 16) | reg(r.ir_encoder + 1)
        self.clock.add(t_req, t_resp, count32)
        self._check_restart(regs)  # a restart the connection survived (a gateway in between keeps it up)
        last_seq = reg(r.ir_last_seq)
        try:
            accepted = self.mailbox.on_accepted(last_seq)
        except MailboxDesync as exc:
            self.log.error("plc mailbox desync, resynchronising", error=str(exc))
            self.mailbox.resync(last_seq)
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_result(Outcome.TIMEOUT)
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
        self._t_poll_request = t_req
        self._publish(
            status_from_bits(
                reg(r.ir_status),
                online=online or prev.online,
                queue_free=reg(r.ir_queue_free),
                last_seq=last_seq,
                ejects_done=self._done_total,
                ejects_late=self._late_total,
                speed_mm_s=float(reg(r.ir_speed)),
                rtt_ms=(t_resp - t_req) * 1000.0,
                last_error=prev.last_error,
                t_polled=t_resp,
            )
        )
        self._tap_poll(t_req, t_resp, count32)
        self._check_mailbox_moves(bool(accepted), t_resp)

    def _check_restart(self, regs: list[int]) -> None:
        """Notice a PLC restart from its registers and resynchronise with it.

        The restart lost its eject queue (commands it had accepted will not fire: their pieces ride into the
        default fraction), its last accepted seq and its counters. The mailbox starts again from the PLC's
        seq, commands waiting for acceptance end `offline` (the PLC never took them), and the running
        totals go on from the new counter values instead of counting the step back as a wrap.
        """
        r = self.regs
        last_seq = regs[r.ir_last_seq - self._ir_lo]
        done, late = regs[r.ir_ejects_done - self._ir_lo], regs[r.ir_ejects_late - self._ir_lo]
        why = plc_restarted(self.mailbox.last_accepted, last_seq, ((self._raw_done, done), (self._raw_late, late)))
        if why is None:
            return
        self._noticed_restart(why, self.mailbox.last_accepted, last_seq, self.mailbox.pending)
        self.mailbox.resync(last_seq)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(Outcome.OFFLINE)
        self._waiters.clear()
        self._raw_done, self._raw_late = done, late
        self._waiting_since = None

    def _check_mailbox_moves(self, progress: bool, t: float) -> None:
        """Raise PlcError if the PLC sits on a written command although nothing stops it taking it.

        A write the PLC confirmed but did not keep (a PLC or gateway fault) would otherwise block every
        later seq behind it for good, with the link online and every command timing out unseen.
        """
        st = self._status
        if not self.mailbox.pending or st.estop or st.watchdog_tripped or st.queue_free == 0:
            self._waiting_since = None
        elif progress or self._waiting_since is None:
            self._waiting_since = t
        elif t - self._waiting_since > self._stuck_s:
            raise PlcError(
                f"the PLC has not accepted seq {self.mailbox.pending_seqs[0]} for {t - self._waiting_since:.1f} s "
                f"although it has room and no fault: its mailbox is out of step with the PC's, "
                f"reconnecting to resynchronise from its last accepted seq"
            )

    async def _poll_after(self, t: float, timeout: float) -> None:
        """Wait for a poll whose request left after PC time t (so it shows what happened before t)."""
        deadline = self._now() + timeout
        while self._t_poll_request <= t:
            if not self.online:
                raise PlcError("PLC went offline")
            left = deadline - self._now()
            if left <= 0:
                raise PlcError(f"no poll of the PLC within {timeout:g} s")
            await self._wait_tick(left)

    # --- eject commands ---
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
        check_command(cmd)
        give_up = self._now() + (self.cfg.timeout_s if max_wait_s is None else max_wait_s)
        async with self._send_lock:  # FIFO: commands go out in the order send() was called
            while True:
                if not self.online or not self.clock.ready:
                    return EjectResult(None, Outcome.OFFLINE, None, None)
                if self._expired(cmd, min_lead_s):
                    return EjectResult(None, Outcome.EXPIRED, None, None)
                if self._can_write():
                    break
                left = give_up - self._now()
                if left <= 0:
                    return EjectResult(None, Outcome.TIMEOUT, None, None)
                await self._wait_tick(min(left, self.cfg.timeout_s))
            seq, slot = self.mailbox.reserve()
            fut: asyncio.Future[float | Outcome] = asyncio.get_running_loop().create_future()
            self._waiters[seq] = fut
            t_sent = self._now()
            # shielded: once a seq is reserved its slot write must finish even if the caller
            # gives up, or the PLC would wait for that seq forever
            write = asyncio.ensure_future(self._write_slot(seq, slot, cmd))
            if not await asyncio.shield(write):
                return EjectResult(seq, Outcome.OFFLINE, t_sent, None)
        try:
            got = await asyncio.wait_for(asyncio.shield(fut), self.cfg.timeout_s)
        except TimeoutError:
            self._waiters.pop(seq, None)
            return EjectResult(seq, Outcome.TIMEOUT, t_sent, None)
        if isinstance(got, float):
            return EjectResult(seq, Outcome.ACCEPTED, t_sent, got)
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
                fut.set_result(Outcome.OFFLINE)
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
        deadline = self._now() + timeout
        await self._client.write_register(self.regs.hr_command, int(code))
        while True:
            (value,) = await self._client.read_holding_registers(self.regs.hr_command, 1)
            if value == 0:
                break
            if self._now() > deadline:
                raise PlcError(f"command {code.name}: PLC did not clear the command register within {timeout:g} s")
            await asyncio.sleep(self.cfg.poll_interval_ms / 1000.0)
        await self._poll_after(self._now(), max(deadline - self._now(), self.cfg.timeout_s))
        self.log.info("plc command done", command=code.name)

    async def set_valve(self, bank: int, valve: int, on: bool) -> None:
        """Switch one valve by hand (the PLC honours it only while the belt is stopped and no fault is active)."""
        check_valve(bank, valve)
        if not self.online:
            raise PlcError("set_valve: PLC offline")
        await self._client.write_coil(self.regs.coil_valves + bank * VALVES_PER_BANK + valve, on)

    async def read_chute_counts(self, banks: int) -> list[int]:
        """The chute light-barrier counters (16-bit, wrapping) at input registers ir_chute_counts..."""
        first = self.regs.ir_chute_counts
        if first is None:
            raise PlcError("the config says the PLC has no chute counters (plc.registers.ir_chute_counts is null)")
        if not self.online:
            raise PlcError("read chute counters: PLC offline")
        try:
            return await self._client.read_input_registers(first, banks)
        except PlcError as exc:
            if exc.code == 2:  # illegal data address: the PLC program has no such registers
                raise PlcError(
                    f"the PLC has no chute counters at input registers {first}..{first + banks - 1} "
                    "(plc.registers.ir_chute_counts)",
                    exc.code,
                ) from exc
            raise
