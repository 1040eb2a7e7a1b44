"""The virtual PLC: a real Modbus TCP server (pymodbus 3.16) implementing docs/plc-interface.md.

It is the other side of the wire from sorter/plc, written from the interface
document and not from the service's code, so the two cross-check each other.

pymodbus hook: the device is a `SimDevice` with four separate blocks (coils,
discrete inputs, holding, input registers) and an async `action` that
pymodbus calls on every request before it touches its own register copy.
Our register images here are the truth; the action
- copies requested holding/input registers and coils from them into the
  registers pymodbus answers with (so the scan's changes, e.g. the command
  register cleared, are what a client reads),
- applies writes to them (and lets pymodbus keep its copy),
- refuses coil writes with exception 06 (server device busy) unless the belt
  is stopped and no fault is active.
Everything runs on one asyncio loop, so requests and scans never interleave
mid-way: an FC16 slot write is atomic with respect to the scan.

Firing is exact whatever the scan period: a command fires in the first scan at
or past its count, and on_eject gets the commanded count itself (unwrapped)
and the time the belt really reached it.

The same PLC can also serve OPC UA (sim/plc_opcua.py) over these same images:
it writes heartbeat/command through the properties below, hands commands over
with schedule_eject, and learns of changes through `listeners`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from sim.belt import Belt
from sim.config import SimConfig
from sorter.config import ModbusMap
from sorter.core.geometry import diff32, unwrap, wrap32

VALVES_PER_BANK = 32  # coil layout: bank b, valve v -> coil_valves + 32 * b + v
CMD_START, CMD_STOP, CMD_RESET = 1, 2, 3
ST_RUNNING, ST_AIR_OK, ST_ESTOP, ST_WATCHDOG, ST_OVERFLOW = (1 << i for i in range(5))


@dataclass(frozen=True, slots=True)
class ExecutedEject:
    seq: int
    bank: int
    valve_mask: int
    open_at: int  # unwrapped count (belt.count() space) the valves were commanded open at
    open_for: int  # counts
    t_fire: float  # monotonic seconds at which the belt reached open_at


@dataclass(frozen=True, slots=True)
class QueuedEject:
    seq: int
    bank: int
    valve_mask: int
    open_at32: int
    open_for: int


def _next_seq(seq: int) -> int:
    return seq % 0xFFFF + 1


class VirtualPlc:
    """A PLC with a high-speed-counter compare output per queued command, over Modbus TCP.

    Counters `accepted`, `executed`, `late`, `invalid` are plain attributes;
    `coil_log` records honoured coil writes as (t, coil, on). With air
    pressure low, commands still execute (and count) but on_eject is not
    called: the valves open and nothing blows.
    """

    def __init__(
        self,
        regs: ModbusMap,
        belt: Belt,
        sim: SimConfig,
        banks: int = 2,
        on_eject: Callable[[ExecutedEject], None] | None = None,
        *,
        scan_s: float = 0.002,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
    ) -> None:
        if not 1 <= banks <= 4:
            raise ValueError("banks must be 1..4")
        self.regs = regs
        self.belt = belt
        self.banks = banks
        self.on_eject = on_eject
        self.scan_s = scan_s
        self.queue_size = sim.eject_queue_size
        self.watchdog_s = sim.watchdog_ms / 1000.0
        self._clock = clock
        self.log = log or structlog.get_logger("sim.plc")

        r = regs
        slots_end = r.hr_slots + r.slot_stride * r.slot_count
        self._hr = [0] * (max(r.hr_heartbeat, r.hr_command, slots_end - 1) + 1)
        chutes = [r.ir_chute_counts + banks - 1] if r.ir_chute_counts is not None else []
        self._ir = [0] * (max(r.input_addresses + chutes) + 1)
        self._coil_lo = r.coil_valves
        self._coils = [False] * (banks * VALVES_PER_BANK)

        # PLC state
        self.queue: list[QueuedEject] = []
        self.last_seq = 0
        self.accepted = 0
        self.executed = 0
        self.late = 0
        self.invalid = 0  # accepted but discarded: bank out of range
        self.air_ok = True
        self.estop = False
        self.watchdog_tripped = False
        self.overflow = False
        # the chute light barriers: pieces that fell into each bank's chute (docs/plc-interface.md, optional)
        self.chute_counts = [0] * banks
        self._armed = False  # watchdog armed by the first heartbeat change after power-up/reset
        self._hb_last = 0
        self._hb_t = clock()
        self.coil_log: list[tuple[float, int, bool]] = []
        # what the input registers count from: the totals at the last power-up (restart() keeps the run's
        # totals above for the simulator's report, the PLC's registers start again from 0 as a real one's do)
        self._boot_executed, self._boot_late, self._boot_chutes = 0, 0, [0] * banks
        self.restarts = 0
        self.last_fire_t: float | None = None  # monotonic time the belt reached the last fired command's count
        # each fail-safe (watchdog trip, e-stop): when, why, how many queued commands it dropped and when the
        # last command had fired before it - what a fault run measures the fail-safe by
        self.fail_safes: list[dict[str, Any]] = []
        # called (no arguments) after every scan and after state changes made between scans (inputs,
        # schedule_eject), e.g. to push changed values to the OPC UA side; keep them cheap: the scan runs
        # every few milliseconds
        self.listeners: list[Callable[[], None]] = []

        self._server: ModbusTcpServer | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self.scan()

    # --- lifecycle ---
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start scanning and serving on host:port (0 picks a free port; see `port`)."""
        self.start_scan()
        self._host, self._port = host, port
        await self.set_reachable(True)

    def start_scan(self) -> None:
        """Start scanning without serving Modbus TCP (requests then come through `request`)."""
        if self._scan_task is None:
            self._scan_task = asyncio.create_task(self._scan_loop(), name="virtual-plc-scan")

    async def stop(self) -> None:
        await self.set_reachable(False)
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan_task
            self._scan_task = None

    @property
    def port(self) -> int:
        """The TCP port served (the real one when started with port 0)."""
        return self._port

    @property
    def reachable(self) -> bool:
        return self._server is not None

    async def set_reachable(self, on: bool) -> None:
        """Fault injection: take the network side down (the PLC keeps scanning) or bring it back
        on the same host and port."""
        if on and self._server is None:
            server = ModbusTcpServer(self._device(), address=(self._host, self._port))
            try:
                await server.serve_forever(background=True)
            except RuntimeError as exc:  # pymodbus' way of saying the bind failed
                raise OSError(f"virtual PLC cannot listen on {self._host}:{self._port} (port in use?)") from exc
            sockets = getattr(server.transport, "sockets", None) or []
            if sockets:
                self._port = sockets[0].getsockname()[1]
            self._server = server
            self.log.info("virtual plc listening", host=self._host, port=self._port)
        elif not on and self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
            self.log.info("virtual plc unreachable", port=self._port)

    async def restart(self, down_s: float = 2.0) -> None:
        """Fault injection: a power cycle of the PLC. Its network goes down for `down_s` (it boots), and it
        comes back as after power-up: eject queue, last accepted seq, counters and holding registers lost
        (0), watchdog unarmed, valves off, belt stopped (its outputs dropped while it was off)."""
        await self.set_reachable(False)
        self.restarts += 1
        dropped = len(self.queue)
        self.queue.clear()
        self._coils = [False] * len(self._coils)
        self.belt.stop()
        self.last_seq = 0
        self._boot_executed, self._boot_late, self._boot_chutes = self.executed, self.late, list(self.chute_counts)
        self._hr[:] = [0] * len(self._hr)  # in place: the Modbus side reads this very list
        self.watchdog_tripped = self.overflow = False
        self._armed = False
        self._hb_last, self._hb_t = 0, self._clock()
        self._update_inputs()
        self._notify()
        self.log.warning("virtual plc restarting", dropped=dropped, down_s=down_s)
        await asyncio.sleep(down_s)
        await self.set_reachable(True)

    def drop_connections(self) -> int:
        """Fault injection: close every client connection (the listener stays); returns how many."""
        if self._server is None:
            return 0
        conns = list(self._server.active_connections.values())
        for conn in conns:
            conn.close()
        return len(conns)

    def set_estop(self, on: bool) -> None:
        """E-stop input: stops the belt, flushes the queue, valves off; the belt stays stopped after release."""
        self.estop = on
        if on:
            self.belt.stop()
            self._fail_safe("e-stop")
        self._update_inputs()
        self._notify()

    def chute_pulse(self, bank: int) -> None:
        """A piece broke bank `bank`'s chute light barrier (a digital input: counted, never reset)."""
        self.chute_counts[bank] += 1
        self._update_inputs()
        self._notify()

    def set_air_ok(self, ok: bool) -> None:
        self.air_ok = ok
        self._update_inputs()
        self._notify()

    # --- inspection (tests, HMI of the simulator) ---
    def holding(self, address: int, count: int = 1) -> list[int]:
        return self._hr[address : address + count]

    def inputs(self, address: int, count: int = 1) -> list[int]:
        return self._ir[address : address + count]

    def coil(self, bank: int, valve: int) -> bool:
        return self._coils[bank * VALVES_PER_BANK + valve]

    # the heartbeat and command holding registers, for another protocol writing the same images
    @property
    def heartbeat(self) -> int:
        return self._hr[self.regs.hr_heartbeat]

    @heartbeat.setter
    def heartbeat(self, value: int) -> None:
        self._hr[self.regs.hr_heartbeat] = value & 0xFFFF

    @property
    def command(self) -> int:
        return self._hr[self.regs.hr_command]

    @command.setter
    def command(self, value: int) -> None:
        self._hr[self.regs.hr_command] = value & 0xFFFF

    # --- the scan ---
    async def _scan_loop(self) -> None:
        while True:
            try:
                self.scan()
            except Exception:  # a simulator bug must not silently stop the PLC
                self.log.exception("virtual plc scan failed")
            await asyncio.sleep(self.scan_s)

    def scan(self) -> None:
        """One PLC scan: watchdog, command register, mailbox, firing, input registers."""
        now = self._clock()
        r = self.regs
        hb = self._hr[r.hr_heartbeat]
        if hb != self._hb_last:
            self._hb_last, self._hb_t = hb, now
            if not self.watchdog_tripped:
                self._armed = True
        elif self._armed and now - self._hb_t > self.watchdog_s:
            self.watchdog_tripped, self._armed = True, False
            self._fail_safe("watchdog")
        code = self._hr[r.hr_command]
        if code:
            self._execute(code, now)
            self._hr[r.hr_command] = 0
        count = self.belt.count()
        self._accept(count)
        self._fire(count)
        self._update_inputs()
        self._notify()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def _fail_safe(self, why: str) -> None:
        dropped = len(self.queue)
        self.queue.clear()
        self._coils = [False] * len(self._coils)
        self.fail_safes.append({"t": self._clock(), "reason": why, "dropped": dropped, "last_fire_t": self.last_fire_t})
        self.log.warning("virtual plc fail-safe", reason=why, dropped=dropped)

    def _execute(self, code: int, now: float) -> None:
        if code == CMD_START:
            if not self.estop and not self.belt.running:
                self._coils = [False] * len(self._coils)  # manual valve tests end when the belt runs
                self.belt.start()
        elif code == CMD_STOP:
            if self.belt.running:
                self.belt.stop()
        elif code == CMD_RESET:
            self.watchdog_tripped = self.overflow = False
            self._armed = False  # re-armed by the next heartbeat change
            self._hb_t = now
        else:
            self.log.warning("virtual plc: unknown command ignored", code=code)

    def _accept(self, count: int) -> None:
        r = self.regs
        c32 = wrap32(count)
        while True:
            expected = _next_seq(self.last_seq)
            base = r.hr_slots + (expected % r.slot_count) * r.slot_stride
            if self._hr[base] != expected:
                return
            blocked = self._blocked()
            if blocked:
                if blocked == "queue full":
                    self.overflow = True  # the PC wrote more than queue_free allowed
                return  # commands wait in their slot until the PLC may execute them
            bank, mask_hi, mask_lo, at_hi, at_lo, open_for = self._hr[base + 1 : base + 7]
            self._take(expected, bank, (mask_hi << 16) | mask_lo, (at_hi << 16) | at_lo, open_for, c32)

    def _blocked(self) -> str | None:
        """Why the next command cannot be accepted now (None: it can)."""
        if self.watchdog_tripped or not self._armed or self.estop:
            return "not ready"
        if len(self.queue) >= self.queue_size:
            return "queue full"
        return None

    def _take(self, seq: int, bank: int, mask: int, at32: int, open_for: int, c32: int) -> None:
        """Accept the next command (the caller checked seq and _blocked): count it, then queue or discard it."""
        self.last_seq = seq
        self.accepted += 1
        if bank >= self.banks:
            self.invalid += 1
            self.log.warning("virtual plc: command for unknown bank discarded", seq=seq, bank=bank)
        elif diff32(at32, c32) < 0:
            self.late += 1
        else:
            self.queue.append(QueuedEject(seq, bank, mask, at32, open_for))

    def schedule_eject(self, seq: int, bank: int, valve_mask: int, open_at32: int, open_for: int) -> bool:
        """Accept a command handed over directly (OPC UA method) under the mailbox's rules.

        Accepted only if `seq` is the next one after last_seq and the PLC could take it from its slot now;
        then it is accepted at once (counted; late or unknown bank discarded, as from the mailbox).
        Refused (False) changes nothing, not even the overflow bit: the caller learns it from the answer.
        """
        if seq != _next_seq(self.last_seq) or self._blocked():
            return False
        self._take(seq, bank, valve_mask & 0xFFFFFFFF, wrap32(open_at32), open_for, self.belt.count32())
        self._update_inputs()
        self._notify()
        return True

    def valves_locked(self) -> bool:
        """Manual valve writes are refused: the valves are the PLC's while the belt runs or a fault is active."""
        return self.belt.running or self.watchdog_tripped or self.estop

    def set_valve(self, bank: int, valve: int, on: bool) -> bool:
        """Manual valve test (like a coil write): False if refused. ValueError for a valve that does not exist."""
        if not (0 <= bank < self.banks and 0 <= valve < VALVES_PER_BANK):
            raise ValueError(f"no valve {valve} in bank {bank}")
        if self.valves_locked():
            return False
        i = bank * VALVES_PER_BANK + valve
        self._coils[i] = on
        self.coil_log.append((self._clock(), self._coil_lo + i, on))
        return True

    def _fire(self, count: int) -> None:
        if self.watchdog_tripped or self.estop or not self.queue:
            return
        c32 = wrap32(count)
        due = [q for q in self.queue if diff32(q.open_at32, c32) <= 0]
        if not due:
            return
        self.queue = [q for q in self.queue if diff32(q.open_at32, c32) > 0]
        now = self._clock()
        for q in sorted(due, key=lambda q: diff32(q.open_at32, c32)):
            open_at = unwrap(q.open_at32, count)
            t = self.belt.time_at_position(self.belt.position_at_count(open_at))
            t_fire = min(t, now) if t is not None else now  # None: the belt stopped right on it
            self.executed += 1
            self.last_fire_t = t_fire if self.last_fire_t is None else max(self.last_fire_t, t_fire)
            if self.on_eject is not None and self.air_ok:
                ex = ExecutedEject(q.seq, q.bank, q.valve_mask, open_at, q.open_for, t_fire)
                try:
                    self.on_eject(ex)
                except Exception:
                    self.log.exception("on_eject callback failed", seq=q.seq)

    def status_word(self) -> int:
        """The status bits of input register `ir_status` (docs/plc-interface.md section 4)."""
        return (
            (ST_RUNNING if self.belt.running else 0)
            | (ST_AIR_OK if self.air_ok else 0)
            | (ST_ESTOP if self.estop else 0)
            | (ST_WATCHDOG if self.watchdog_tripped else 0)
            | (ST_OVERFLOW if self.overflow else 0)
        )

    @property
    def queue_free(self) -> int:
        return max(self.queue_size - len(self.queue), 0)

    # the PLC's counters as its interfaces show them: since its last power-up (a restart clears them)
    @property
    def done_since_boot(self) -> int:
        return self.executed - self._boot_executed

    @property
    def late_since_boot(self) -> int:
        return self.late - self._boot_late

    @property
    def chutes_since_boot(self) -> list[int]:
        return [n - b for n, b in zip(self.chute_counts, self._boot_chutes, strict=True)]

    def _update_inputs(self) -> None:
        r, ir = self.regs, self._ir
        self._refresh_encoder()
        ir[r.ir_status] = self.status_word()
        ir[r.ir_queue_free] = self.queue_free
        ir[r.ir_last_seq] = self.last_seq
        ir[r.ir_ejects_done] = self.done_since_boot & 0xFFFF
        ir[r.ir_ejects_late] = self.late_since_boot & 0xFFFF
        if r.ir_chute_counts is not None:
            for b, n in enumerate(self.chutes_since_boot):
                ir[r.ir_chute_counts + b] = n & 0xFFFF

    def _refresh_encoder(self) -> None:
        r, ir = self.regs, self._ir
        c32 = self.belt.count32()
        ir[r.ir_encoder], ir[r.ir_encoder + 1] = c32 >> 16, c32 & 0xFFFF
        ir[r.ir_speed] = min(max(round(self.belt.speed_mm_s()), 0), 0xFFFF)

    # --- the pymodbus side ---
    def _device(self) -> SimDevice:
        r = self.regs
        coil_bits = len(self._coils)
        return SimDevice(
            id=r.unit_id,
            simdata=(
                [SimData(self._coil_lo, values=[False] * coil_bits, datatype=DataType.BITS)],
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, count=len(self._hr), values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=len(self._ir), values=0, datatype=DataType.REGISTERS)],
            ),
            action=self.request,
        )

    async def request(
        self,
        func_code: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """One Modbus request against the register images, whatever carried it: pymodbus' per-request hook
        (`registers` is its block, `start` the block's first address), or the lockstep simulation's in-process
        transport. Returns an exception code, or None: done (a read's values are in `registers`)."""
        if func_code in (1, 5, 15):
            return self._on_coils(start, address, count, registers, values)
        if func_code == 4:
            self._refresh_encoder()  # answer with the counter as of this request, not of the last scan
            image = self._ir
        elif func_code in (3, 6, 16, 22, 23):
            image = self._hr
        else:
            return None
        if values is not None:
            image[address : address + len(values)] = [int(v) for v in values]
        else:
            registers[address - start : address - start + count] = image[address : address + count]
        return None

    def _on_coils(
        self, start_word: int, address: int, words: int, registers: list[int], values: list[int] | list[bool] | None
    ) -> ExcCodes | None:
        if values is not None:
            lo, hi = address - self._coil_lo, address - self._coil_lo + len(values)
            if lo < 0 or hi > len(self._coils):
                return ExcCodes.ILLEGAL_ADDRESS
            if self.valves_locked():
                return ExcCodes.DEVICE_BUSY
            now = self._clock()
            for i, v in enumerate(values):
                self._coils[lo + i] = bool(v)
                self.coil_log.append((now, address + i, bool(v)))
            return None
        first_word = address // 16
        for w in range(first_word, first_word + words):
            word = 0
            for b in range(16):
                i = w * 16 + b - self._coil_lo
                if 0 <= i < len(self._coils) and self._coils[i]:
                    word |= 1 << b
            registers[w - start_word] = word
        return None
