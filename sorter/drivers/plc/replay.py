"""The PLC during a replay (`sorter replay`): a register transport answering from a recording.

The PLC link (sorter/drivers/plc/link.py) runs unchanged on top of it, in virtual time. What it models:
- the encoder polls: the link's timed poll (the one that feeds the clock model) gets the recorded polls
  back one after the other, each at its recorded response time and with its recorded request and response
  times and count, so that the replay's clock model is fitted on the very samples the live one was (a
  recorded poll more than a poll interval older than the request is skipped: the replay's link is not
  behind, it polls when the live one did); any other read at time t reads the count interpolated linearly
  between the two recorded polls around t (each taken at the middle of its request and response); before
  the first and after the last recorded poll the belt stands at the first / last count;
- belt speed and the status word (belt running, air, e-stop, watchdog, overflow): those of the last recorded
  poll at or before t (the first one before the recording's first poll);
- the mailbox: a command written into its slot is accepted at once, in seq order, and kept in `commands`
  (the replay's outcome for it: accepted); queue free is always the whole mailbox;
- the command register (start, stop, reset) is cleared at once; heartbeats and valve coils are stored.

What it does not model: the PLC refusing or being late with a command (a full queue, a fault that came up
because of the replay's own commands), e-stops or watchdog trips the replay would cause, executing the
ejections (`ejects_done` counts accepted commands whose open count the recorded belt has passed; none is
ever late), chute counters (always 0). Status changes come from the recording, not from the replay's
commands: a replay's start command does not start a belt that the recording shows standing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sorter.config import PlcConfig
from sorter.core.geometry import unwrap, wrap32
from sorter.drivers.plc.base import PlcError

ONE_WAY_S = 0.0004  # a request, or its answer, on the PLC's Ethernet (the same as the lockstep simulation's)


@dataclass(frozen=True)
class ReplayCommand:
    t: float  # when the replay's link wrote it (virtual time)
    seq: int
    bank: int
    valve_mask: int
    open_at32: int
    open_for: int


class ReplayPlc:
    """sorter's RegisterClient, answering from the recorded encoder polls (docs/recording.md)."""

    def __init__(self, cfg: PlcConfig, polls: Sequence[dict[str, Any]], now: Callable[[], float]) -> None:
        if not polls:
            raise PlcError("the recording has no encoder polls: nothing to drive the replay's clock model")
        self.cfg = cfg
        self.regs = cfg.registers
        self._now = now
        rows = sorted(polls, key=lambda p: p["t_request"] + p["t_response"])
        self._t = np.array([(p["t_request"] + p["t_response"]) / 2 for p in rows])
        counts = [int(rows[0]["count32"])]
        for p in rows[1:]:  # the recorded 32-bit counts, unwrapped along the track
            counts.append(unwrap(int(p["count32"]), counts[-1]))
        self._count = np.array(counts, dtype=np.float64)
        self._speed = [round(p["speed_mm_s"]) for p in rows]
        self._status = [int(p["status"]) for p in rows]
        self._rows = rows
        self._next = 0  # the next recorded poll to play back
        self._interval = cfg.poll_interval_ms / 1000
        self.polls_played = 0
        self._connected = False
        self.last_seq = 0
        self.slots: dict[int, list[int]] = {}
        self.commands: list[ReplayCommand] = []
        self.belt_commands: list[tuple[float, int]] = []
        self.holding: dict[int, int] = {}
        self.coils: dict[int, bool] = {}

    # --- the recorded plant at time t ---
    def count_at(self, t: float) -> int:
        return round(float(np.interp(t, self._t, self._count)))

    def _index(self, t: float) -> int:
        """The last recorded poll at or before t (the first before the recording's first poll)."""
        return max(0, int(np.searchsorted(self._t, t, side="right")) - 1)

    def input_registers(self, t: float) -> dict[int, int]:
        r = self.regs
        i = self._index(t)
        now_count = self.count_at(t)
        count32 = wrap32(now_count)
        done = sum(1 for c in self.commands if unwrap(c.open_at32, now_count) <= now_count)
        out = {
            r.ir_encoder: count32 >> 16,
            r.ir_encoder + 1: count32 & 0xFFFF,
            r.ir_speed: self._speed[i] & 0xFFFF,
            r.ir_status: self._status[i],
            r.ir_queue_free: r.slot_count,
            r.ir_last_seq: self.last_seq,
            r.ir_ejects_done: done & 0xFFFF,
            r.ir_ejects_late: 0,
        }
        return out  # any other input register (the chute counters) reads 0

    # --- the mailbox: accepted at once, in seq order ---
    def _accept(self) -> None:
        r = self.regs
        while True:
            expected = self.last_seq + 1 if self.last_seq < 0xFFFF else 1
            words = self.slots.get(expected % r.slot_count)
            if words is None or words[0] != expected:
                return
            self.last_seq = expected
            mask, at32 = (words[2] << 16) | words[3], (words[4] << 16) | words[5]
            self.commands.append(ReplayCommand(self._now(), expected, words[1], mask, at32, words[6]))

    # --- RegisterClient ---
    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        await asyncio.sleep(2 * ONE_WAY_S)
        self._connected = True

    def close(self) -> None:
        self._connected = False

    async def _travel(self) -> None:
        if not self._connected:
            raise PlcError("replay PLC: not connected")
        await asyncio.sleep(ONE_WAY_S)

    async def read_input_registers_timed(self, address: int, count: int) -> tuple[list[int], float, float]:
        t_call = self._now()
        rows = self._rows
        while self._next < len(rows) and rows[self._next]["t_response"] < t_call - self._interval:
            self._next += 1
        if self._next >= len(rows):  # past the recording: the belt stands at its last count
            regs = await self.read_input_registers(address, count)
            return regs, t_call, self._now()
        row = rows[self._next]
        self._next += 1
        await self._travel()
        if row["t_response"] > self._now():
            await asyncio.sleep(row["t_response"] - self._now())
        self._accept()
        r = self.regs
        image = self.input_registers(self._now())
        count32 = int(row["count32"])
        image[r.ir_encoder], image[r.ir_encoder + 1] = count32 >> 16, count32 & 0xFFFF
        self.polls_played += 1
        return [image.get(address + k, 0) for k in range(count)], float(row["t_request"]), float(row["t_response"])

    async def read_input_registers(self, address: int, count: int) -> list[int]:
        await self._travel()
        self._accept()
        image = self.input_registers(self._now())
        await asyncio.sleep(ONE_WAY_S)
        return [image.get(address + k, 0) for k in range(count)]

    async def read_holding_registers(self, address: int, count: int) -> list[int]:
        await self._travel()
        await asyncio.sleep(ONE_WAY_S)
        # the command register reads 0: the replay PLC takes a belt command at once
        return [0 if a == self.regs.hr_command else self.holding.get(a, 0) for a in range(address, address + count)]

    async def write_register(self, address: int, value: int) -> None:
        await self._travel()
        if address == self.regs.hr_command:
            self.belt_commands.append((self._now(), value))
        else:
            self.holding[address] = value
        await asyncio.sleep(ONE_WAY_S)

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        await self._travel()
        r = self.regs
        first, last = r.hr_slots, r.hr_slots + r.slot_count * r.slot_stride
        if first <= address < last and (address - first) % r.slot_stride == 0 and len(values) >= 7:
            self.slots[(address - first) // r.slot_stride] = [int(v) for v in values[:7]]
            self._accept()  # a PLC scan right after the write
        else:
            for k, v in enumerate(values):
                self.holding[address + k] = int(v)
        await asyncio.sleep(ONE_WAY_S)

    async def write_coil(self, address: int, on: bool) -> None:
        await self._travel()
        self.coils[address] = on
        await asyncio.sleep(ONE_WAY_S)

    async def read_coils(self, address: int, count: int) -> list[bool]:
        await self._travel()
        await asyncio.sleep(ONE_WAY_S)
        return [self.coils.get(address + k, False) for k in range(count)]
