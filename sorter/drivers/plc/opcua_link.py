"""The PLC link over OPC UA (`plc.protocol: opcua`): same semantics as the Modbus link.

Per session (docs/plc-interface.md, OPC UA address space):
- status values (Status, EjectQueueFree, LastSeqAccepted, EjectsDone,
  EjectsLate, BeltSpeed) come by subscription, not polling;
- the encoder is *read* every `poll_interval_ms` all the same: a clock-sync
  measurement needs the PC times just before and after the PLC sampled the
  counter, which a notification does not carry (its arrival is delayed by the
  publishing cycle). These reads double as the link's liveness check;
- the heartbeat is written every `heartbeat_interval_ms`;
- ScheduleEject answers Accepted at once, so a command's fate is known from the
  call itself; the sequence rules are the Modbus mailbox's, kept by the same
  Mailbox, resynchronised from LastSeqAccepted on every (re)connect.
The session is re-created (and re-subscribed) from scratch after any failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sorter.config import PlcConfig
from sorter.core.clock import ClockModel
from sorter.core.geometry import wrap32
from sorter.core.messages import EjectCommand, Outcome
from sorter.drivers.plc.base import (
    EjectResult,
    PlcCommand,
    PlcError,
    PlcLinkBase,
    check_command,
    check_valve,
    plc_restarted,
    status_from_bits,
)
from sorter.drivers.plc.mailbox import Mailbox
from sorter.drivers.plc.opcua import OpcUaPlcClient, boolean, u16, u32

SUBSCRIBED = ["status", "eject_queue_free", "last_seq_accepted", "ejects_done", "ejects_late", "belt_speed"]
U32 = 1 << 32


class OpcUaPlcLink(PlcLinkBase):
    def __init__(
        self, cfg: PlcConfig, clock: ClockModel, *, log: Any = None, now: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(cfg, clock, log=log, where=cfg.opcua.endpoint, now=now)
        self.mailbox = Mailbox(16)  # only the seq rules matter here: calls are answered one at a time
        self._client = OpcUaPlcClient(cfg.opcua, cfg.timeout_s)
        self._values: dict[str, Any] = {}
        self._send_lock = asyncio.Lock()
        self._hb_value = 0
        self._rtt_ms = 0.0
        self._t_polled = 0.0
        # EjectsDone/EjectsLate restart from 0 when the PLC does: totals carry over sessions
        self._base: dict[str, int] = {}
        self._carried = {"ejects_done": 0, "ejects_late": 0}

    # --- the protocol session ---
    async def _connect(self) -> None:
        await self._client.connect()

    async def _close(self) -> None:
        await self._client.close()

    async def _session(self) -> None:
        c = self._client
        for key in ("ejects_done", "ejects_late"):
            self._carried[key] = self._total(key)
        self._base.clear()
        before, self._values = self._values, await c.read_many(SUBSCRIBED)
        self._check_restart(before)
        self.mailbox.resync(int(self._values["last_seq_accepted"]))  # the PLC's word is the only truth
        await self._sync_clock()
        self._update(online=True)
        await c.subscribe(SUBSCRIBED, self._on_change, self.cfg.opcua.publishing_interval_ms)
        self.log.info("plc connected", protocol="opcua", last_seq=self.mailbox.last_accepted, alarms=self.status.alarms)
        await self._until_stopped(self._clock_loop(), self._heartbeat_loop(), self._watch_lost())

    def _check_restart(self, before: dict[str, Any]) -> None:
        """Raise a PLC restart seen on (re)connecting: its OPC UA server goes down with it, so a restart is
        always seen here (a session never survives one). The totals carry over either way (`_total`)."""
        now = self._values
        last_seq = int(now["last_seq_accepted"])
        counters = tuple(
            (int(before[k]) if before.get(k) is not None else None, int(now[k])) for k in ("ejects_done", "ejects_late")
        )
        why = plc_restarted(self.mailbox.last_accepted, last_seq, counters, modulus=U32)
        if why is not None:
            self._noticed_restart(why, self.mailbox.last_accepted, last_seq, self.mailbox.pending)

    def _on_change(self, key: str, value: Any) -> None:
        self._values[key] = value
        if self.online:
            self._update()

    def _total(self, key: str) -> int:
        raw = self._values.get(key)
        if raw is None:
            return self._carried[key]
        base = self._base.setdefault(key, int(raw))
        return self._carried[key] + (int(raw) - base) % U32

    def _update(self, *, online: bool = False) -> None:
        v, prev = self._values, self._status
        self._publish(
            status_from_bits(
                int(v["status"]),
                online=online or prev.online,
                queue_free=int(v["eject_queue_free"]),
                last_seq=int(v["last_seq_accepted"]),
                ejects_done=self._total("ejects_done"),
                ejects_late=self._total("ejects_late"),
                speed_mm_s=float(v["belt_speed"]),
                rtt_ms=self._rtt_ms,
                last_error=prev.last_error,
                t_polled=self._t_polled,
            )
        )

    async def _sync_clock(self) -> None:
        count, t_req, t_resp = await self._client.read_timed("encoder_count")
        self.clock.add(t_req, t_resp, int(count))
        self._rtt_ms, self._t_polled = (t_resp - t_req) * 1000.0, t_resp
        self._tap_poll(t_req, t_resp, int(count))

    async def _clock_loop(self) -> None:
        async def step() -> None:
            await self._sync_clock()
            self._update()  # fresh rtt and t_polled even when nothing subscribed has changed

        await self._every_poll(step)

    async def _heartbeat_loop(self) -> None:
        interval = self.cfg.heartbeat_interval_ms / 1000.0
        while True:
            if self.heartbeat_enabled:
                self._hb_value = (self._hb_value + 1) & 0xFFFF
                await self._client.write("heartbeat", u16(self._hb_value))
            await asyncio.sleep(interval)

    async def _watch_lost(self) -> None:
        await self._client.lost.wait()
        raise PlcError(f"PLC at {self.cfg.opcua.endpoint} ended the subscription")

    # --- eject commands ---
    def _can_send(self) -> bool:
        st = self._status
        return st.queue_free > 0 and not st.watchdog_tripped and not st.estop

    async def send(self, cmd: EjectCommand, min_lead_s: float, max_wait_s: float | None = None) -> EjectResult:
        """Call ScheduleEject and return its outcome (the same outcomes as the Modbus link's send)."""
        check_command(cmd)
        give_up = self._now() + (self.cfg.timeout_s if max_wait_s is None else max_wait_s)
        async with self._send_lock:  # FIFO, and the seq rules need one call at a time
            while True:
                if not self.online or not self.clock.ready:
                    return EjectResult(None, Outcome.OFFLINE, None, None)
                if self._expired(cmd, min_lead_s):
                    return EjectResult(None, Outcome.EXPIRED, None, None)
                if self._can_send():
                    seq, _ = self.mailbox.reserve()
                    t_sent = self._now()
                    try:
                        accepted = await asyncio.shield(self._schedule(seq, cmd))
                    except PlcError as exc:
                        # the PLC may or may not have taken it: the reconnect's resync settles the seq
                        self.log.error("plc ScheduleEject failed", seq=seq, error=str(exc))
                        self.mailbox.resync(self.mailbox.last_accepted)
                        await self._client.close()
                        return EjectResult(seq, Outcome.OFFLINE, t_sent, None)
                    if accepted:
                        self.mailbox.on_accepted(seq)
                        return EjectResult(seq, Outcome.ACCEPTED, t_sent, self._now())
                    self.mailbox.resync(self.mailbox.last_accepted)  # refused: the seq is free again
                    self.log.debug("plc refused ScheduleEject, waiting", seq=seq, status=self._status.alarms)
                left = give_up - self._now()
                if left <= 0:
                    return EjectResult(None, Outcome.TIMEOUT, None, None)
                await self._wait_tick(min(left, self.cfg.timeout_s))

    async def _schedule(self, seq: int, cmd: EjectCommand) -> bool:
        out = await self._client.call(
            "schedule_eject", u16(seq), u16(cmd.bank), u32(cmd.valve_mask), u32(wrap32(cmd.open_at)), u16(cmd.open_for)
        )
        return bool(out)

    # --- belt commands and manual valves ---
    async def command(self, code: int | PlcCommand, timeout_s: float | None = None) -> None:
        """Write Command and wait until the PLC has cleared it; the status is fresh on return."""
        code = PlcCommand(code)
        if not self.online:
            raise PlcError(f"command {code.name}: PLC offline")
        timeout = timeout_s if timeout_s is not None else max(1.0, 4 * self.cfg.timeout_s)
        deadline = self._now() + timeout
        await self._client.write("command", u16(int(code)))
        while await self._client.read("command") != 0:
            if self._now() > deadline:
                raise PlcError(f"command {code.name}: PLC did not clear Command within {timeout:g} s")
            await asyncio.sleep(self.cfg.poll_interval_ms / 1000.0)
        # don't wait for the next notification: callers look at belt_running right away
        self._values.update(await self._client.read_many(SUBSCRIBED))
        self._update()
        self.log.info("plc command done", command=code.name)

    async def set_valve(self, bank: int, valve: int, on: bool) -> None:
        """Switch one valve by hand (the PLC honours it only while the belt is stopped and no fault is active)."""
        check_valve(bank, valve)
        if not self.online:
            raise PlcError("set_valve: PLC offline")
        if not await self._client.call("set_valve", u16(bank), u16(valve), boolean(on)):
            raise PlcError(f"set_valve bank {bank} valve {valve}: refused (belt running or a fault active)")

    async def read_chute_counts(self, banks: int) -> list[int]:
        """The ChuteCounts array (UInt32 per bank, wrapping at 2**32)."""
        if not self.online:
            raise PlcError("read chute counters: PLC offline")
        value = await self._client.read("chute_counts")
        counts = [int(v) for v in value] if isinstance(value, list | tuple) else []
        if len(counts) < banks:
            raise PlcError(f"{self.cfg.opcua.nodes.chute_counts} holds {len(counts)} counters, expected {banks}")
        return counts[:banks]
