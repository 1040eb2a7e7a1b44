"""Probe the PLC over the config's protocol: read and explain its interface, time the link, prove the watchdog,
and (on request, belt stopped) click each valve. Writes nothing to the config.

It talks through the line service's own link (sorter.drivers.plc.make_plc_link), so what
it sees is what the service will see: the same polling, heartbeat, commands and
manual valve writes, over Modbus TCP or OPC UA as `plc.protocol` says.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from hw.common import (
    HwError,
    config_option,
    console,
    help_paragraphs,
    load,
    prompt,
    run_app,
    script_errors,
)
from hw.plc import plc_check, where
from sorter.config import LineConfig
from sorter.core.clock import ClockModel
from sorter.drivers.plc import make_plc_link
from sorter.drivers.plc.base import PlcCommand, PlcError, PlcLinkBase, PlcStatus
from sorter.logs import setup_logging

Result = Literal["PASS", "FAIL", "WARN", "SKIP", "INFO"]
STYLE = {"PASS": "green", "FAIL": "bold red", "WARN": "yellow", "SKIP": "dim", "INFO": "cyan"}
ENCODER_WATCH_S = 0.5  # how long the count is watched to tell whether the belt moves
ARM_HEARTBEATS = 3  # heartbeats sent before the watchdog test, so the PLC's watchdog is armed
SPEC_WATCHDOG_MS = 500  # docs/plc-interface.md section 8


@dataclass(frozen=True)
class Check:
    name: str
    result: Result
    detail: str


class TimingClock(ClockModel):
    """The link's clock model, also keeping each encoder read's round trip: both links time every read."""

    def __init__(self) -> None:
        super().__init__()
        self.rtts_ms: list[float] = []

    def add(self, t_request: float, t_response: float, count32: int) -> int:
        self.rtts_ms.append((t_response - t_request) * 1000.0)
        return super().add(t_request, t_response, count32)


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


class Probe:
    def __init__(self, cfg: LineConfig, link: PlcLinkBase, clock: TimingClock) -> None:
        self.cfg = cfg
        self.plc = cfg.plc
        self.link = link
        self.where = where(cfg.plc)
        self.clock = clock
        self.checks: list[Check] = []

    def add(self, name: str, result: Result, detail: str) -> None:
        self.checks.append(Check(name, result, detail))
        console.print(f"  [{STYLE[result]}]{result}[/] {name}: {detail}")

    @property
    def status(self) -> PlcStatus:
        st = self.link.status
        if not st.online:
            raise HwError(f"lost the PLC at {self.where}: {st.last_error}", plc_check(self.plc))
        return st

    async def until(self, cond: Callable[[PlcStatus], bool], timeout: float) -> PlcStatus | None:
        """The first status meeting cond within timeout (None if none did); raises if the link drops."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status
            if cond(st):
                return st
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.005)

    async def command(self, code: PlcCommand) -> None:
        try:
            await self.link.command(code)
        except PlcError as exc:
            raise HwError(
                f"the PLC at {self.where} did not carry out {code.name}: {exc}", plc_check(self.plc)
            ) from None

    # --- the steps ---
    async def connect(self, timeout: float) -> None:
        console.print(f"connecting to the PLC at {self.where} ...")
        if await self._online(timeout) is None:
            raise HwError(
                f"no PLC answers at {self.where} within {timeout:g} s: {self.link.status.last_error}",
                plc_check(self.plc),
            )
        self.add("connect", "PASS", f"connected to {self.where}")

    async def _online(self, timeout: float) -> PlcStatus | None:
        deadline = time.monotonic() + timeout
        while not self.link.status.online:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        return self.link.status

    async def interface(self) -> None:
        t0, c0 = await self._count()
        await asyncio.sleep(ENCODER_WATCH_S)
        t1, c1 = await self._count()
        st = self.status
        rate = (c1 - c0) / (t1 - t0)
        cpmm = self.cfg.belt.counts_per_mm
        moving = c1 != c0
        c32 = c1 & 0xFFFFFFFF
        motion = (
            f"moving: {rate:.0f} counts/s = {rate / cpmm:.0f} mm/s at belt.counts_per_mm {cpmm:g}"
            if moving
            else f"standing still over {ENCODER_WATCH_S:g} s"
        )
        table = Table(title=f"PLC interface at {self.where}", show_edge=False)
        for col in ("item", "value", "what it means"):
            table.add_column(col)
        rows = [
            ("encoder count", f"{c32} (0x{c32:08X})", f"the belt encoder's 32-bit counter; {motion}"),
            ("belt speed", f"{st.speed_mm_s:.0f} mm/s", "as the PLC measures it (display only)"),
            ("belt running", yes_no(st.belt_running), "status bit 0: the belt drive is on"),
            ("air pressure ok", yes_no(st.air_ok), "status bit 1: the valve manifold's pressure switch"),
            ("e-stop", "OPEN" if st.estop else "closed", "status bit 2: the e-stop circuit (open stops everything)"),
            ("watchdog tripped", yes_no(st.watchdog_tripped), "status bit 3: a PC heartbeat stopped; latched"),
            ("queue overflow", yes_no(st.queue_overflow), "status bit 4: more commands than queue free; latched"),
            ("queue free", str(st.queue_free), "free entries in the PLC's eject queue"),
            ("last accepted seq", str(st.last_seq), "the last eject command the PLC took (0 after power-up)"),
            ("ejects executed", str(st.ejects_done), "commands fired since power-up"),
            ("ejects late", str(st.ejects_late), "commands whose count had passed on arrival (not fired)"),
        ]
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if st.belt_running and not moving:
            self.add("encoder", "FAIL", "the belt runs but the count does not change: encoder wiring, counter input")
        elif moving and not st.belt_running:
            self.add("encoder", "WARN", f"counts while the belt is reported stopped ({motion}): turned by hand?")
        else:
            self.add("encoder", "PASS", f"count {c32}, {motion}")
        if st.estop:
            self.add("e-stop", "WARN", "the e-stop circuit is open: nothing runs or fires until it is released")
        if not st.air_ok:
            self.add("air", "WARN", "no air pressure: valves switch but nothing blows")

    async def _count(self) -> tuple[float, int]:
        deadline = time.monotonic() + 4 * self.plc.timeout_s
        while (latest := self.clock.latest) is None:
            _ = self.status
            if time.monotonic() > deadline:
                raise HwError(f"no encoder count read from the PLC at {self.where}", plc_check(self.plc))
            await asyncio.sleep(0.01)
        return latest

    async def round_trip(self, requests: int) -> None:
        """The link's own encoder reads, each timed from request to answer."""
        rtts = self.clock.rtts_ms
        start = len(rtts)
        deadline = time.monotonic() + requests * self.plc.poll_interval_ms / 1000 * 4 + 2 * self.plc.timeout_s
        with Progress(TextColumn("  timing requests"), BarColumn(), console=console, transient=True) as progress:
            task = progress.add_task("rtt", total=requests)
            while len(rtts) - start < requests and time.monotonic() < deadline:
                _ = self.status
                progress.update(task, completed=len(rtts) - start)
                await asyncio.sleep(0.05)
        samples = sorted(rtts[start : start + requests])
        if len(samples) < 10:
            self.add("round trip", "FAIL", f"only {len(samples)} answered requests in the time of {requests}")
            return
        p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
        detail = (
            f"{len(samples)} requests: min {samples[0]:.1f}, median {statistics.median(samples):.1f}, "
            f"p99 {p99:.1f}, max {samples[-1]:.1f} ms (plc.timeout_s {self.plc.timeout_s * 1000:.0f} ms)"
        )
        if samples[-1] >= self.plc.timeout_s * 1000:
            self.add("round trip", "FAIL", detail + ": answers that slow drop the link")
        elif p99 > self.plc.timeout_s * 500:
            self.add("round trip", "WARN", detail + ": close to the timeout")
        else:
            self.add("round trip", "PASS", detail)

    async def watchdog(self, timeout: float) -> None:
        hb_ms = self.plc.heartbeat_interval_ms
        if self.status.watchdog_tripped:
            # latched since a PC last stopped heartbeating (the line service stopping does that)
            await self.command(PlcCommand.RESET)
            if await self.until(lambda s: not s.watchdog_tripped, 1.0) is None:
                self.add("watchdog", "FAIL", "tripped at connect and RESET does not clear it")
                return
            self.add(
                "watchdog at connect", "INFO", "was tripped (latched from an earlier PC session); reset cleared it"
            )
        await asyncio.sleep(ARM_HEARTBEATS * hb_ms / 1000)  # the first heartbeat changes arm it
        self.link.heartbeat_enabled = False
        t0 = time.monotonic()
        try:
            tripped = await self.until(lambda s: s.watchdog_tripped, timeout)
            t_trip = time.monotonic()
        finally:
            self.link.heartbeat_enabled = True
        if tripped is None:
            self.add(
                "watchdog trip",
                "FAIL",
                f"the PLC did not trip within {timeout:g} s of the heartbeat stopping: it would keep firing "
                "with no PC watching (docs/plc-interface.md section 8)",
            )
            return
        ms = (t_trip - t0) * 1000
        self.add(
            "watchdog trip",
            "PASS",
            f"tripped {ms:.0f} ms after the PC stopped its heartbeat (the PLC's watchdog time: about "
            f"{max(0.0, ms - self.plc.poll_interval_ms):.0f}-{ms + hb_ms:.0f} ms, as the last heartbeat went out up "
            f"to {hb_ms:g} ms before; the interface asks for {SPEC_WATCHDOG_MS} ms)",
        )
        await asyncio.sleep(2 * hb_ms / 1000)
        await self.command(PlcCommand.RESET)
        if await self.until(lambda s: not s.watchdog_tripped, 1.0) is None:
            self.add("watchdog reset", "FAIL", "RESET did not clear the watchdog-tripped bit")
        else:
            self.add("watchdog reset", "PASS", "RESET cleared it; the heartbeat runs again")

    async def valves(self, pulse_ms: float, requested: bool, yes: bool) -> None:
        banks = self.cfg.ejection.banks
        per_bank = self.cfg.ejection.valves_per_bank
        total = len(banks) * per_bank
        if not requested:
            self.add("valves", "SKIP", "not pulsed (--pulse-valves clicks each valve, belt stopped)")
            return
        st = self.status
        blocked = [
            why
            for flag, why in (
                (st.belt_running, "the belt runs: stop it first"),
                (st.estop, "the e-stop is open"),
                (st.watchdog_tripped, "the watchdog is tripped"),
            )
            if flag
        ]
        if blocked:
            self.add("valves", "SKIP", f"not pulsed: {'; '.join(blocked)} (the PLC refuses manual valves then)")
            return
        if not yes and not typer.confirm(
            f"pulse each of the {total} valves for {pulse_ms:g} ms, one by one? keep hands and faces off the nozzles",
            default=False,
        ):
            self.add("valves", "SKIP", "not pulsed: declined")
            return
        refused: list[str] = []
        with Progress(
            TextColumn("  pulsing {task.fields[valve]}"), BarColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task("valves", total=total, valve="")
            for b, bank in enumerate(banks):
                for v in range(per_bank):
                    name = f"{bank.name}{v}"
                    progress.update(task, valve=name)
                    if not await self._pulse(b, v, pulse_ms):
                        refused.append(name)
                    progress.advance(task)
        if refused:
            self.add("valves", "FAIL", f"pulsed {total - len(refused)} of {total}; refused: {', '.join(refused)}")
        else:
            self.add("valves", "PASS", f"pulsed {total} of {total} ({pulse_ms:g} ms each); refused: none")

    async def _pulse(self, bank: int, valve: int, pulse_ms: float) -> bool:
        """One valve on for pulse_ms, then off (always tried); False if the PLC refused it."""
        ok = await self._set_valve(bank, valve, True)
        await asyncio.sleep(pulse_ms / 1000)
        ok = await self._set_valve(bank, valve, False) and ok
        await asyncio.sleep(pulse_ms / 1000)  # a pause between clicks, so each valve is heard on its own
        return ok

    async def _set_valve(self, bank: int, valve: int, on: bool) -> bool:
        try:
            await self.link.set_valve(bank, valve, on)
            return True
        except PlcError:
            _ = self.status  # refused on a live link, or the link is gone: then this raises
            return False

    def summary(self) -> bool:
        table = Table(title="PLC probe summary", show_edge=False)
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for c in self.checks:
            table.add_row(c.name, f"[{STYLE[c.result]}]{c.result}[/]", c.detail)
        console.print(table)
        return not any(c.result == "FAIL" for c in self.checks)


async def run_probe(
    cfg: LineConfig,
    *,
    yes: bool,
    pulse_valves: bool,
    pulse_ms: float,
    requests: int,
    connect_timeout: float,
    watchdog_timeout: float,
) -> bool:
    clock = TimingClock()
    link = make_plc_link(cfg.plc, clock)
    probe = Probe(cfg, link, clock)
    task = asyncio.create_task(link.run())
    try:
        steps: list[Callable[[], Awaitable[None]]] = [
            lambda: probe.connect(connect_timeout),
            probe.interface,
            lambda: probe.round_trip(requests),
            lambda: probe.watchdog(watchdog_timeout),
            lambda: probe.valves(pulse_ms, pulse_valves, yes),
        ]
        for step in steps:
            await step()
    finally:
        await link.stop()
        await task
    ok = probe.summary()
    console.print(
        "when the probe disconnects, its heartbeat stops and the PLC's watchdog trips again (as it should): "
        "the line service resets it when it starts"
    )
    return ok


def main(
    config: Path = config_option("the line config whose PLC to probe"),
    yes: bool = typer.Option(False, "--yes", help="unattended: skip the prompts and the valve confirmation"),
    pulse_valves: bool = typer.Option(False, "--pulse-valves", help="click each valve once (belt stopped)"),
    pulse_ms: float = typer.Option(100.0, "--pulse-ms", min=1.0, help="how long each valve stays open"),
    requests: int = typer.Option(100, "--requests", min=10, help="requests timed for the round trip"),
    connect_timeout: float = typer.Option(5.0, "--connect-timeout", min=0.5, help="seconds to wait for the PLC"),
    watchdog_timeout: float = typer.Option(5.0, "--watchdog-timeout", min=0.5, help="seconds to wait for the trip"),
) -> None:
    """Probe the PLC (plc: in the config, Modbus TCP or OPC UA): read and explain its whole interface, time the
    link's round trip, prove its watchdog trips when the heartbeat stops and clears on reset, and with
    --pulse-valves click each valve once. Writes nothing; exit status 1 if a check failed.

    Prepare: stop the line service (the probe takes its place on the PLC link, heartbeat included); the line
    must not be sorting (the watchdog test makes the PLC fail safe for about a second). For --pulse-valves: the
    belt stopped, the air on, nobody near the nozzles; listen for each valve, A0 first.
    """
    with script_errors():
        cfg = load(config)
        # the probe reports connection trouble itself; the link's and the libraries' own logs would repeat it
        setup_logging("error")
        logging.getLogger("asyncua").setLevel(logging.CRITICAL)
        prompt("Stop the line service (the probe takes its place on the PLC link); the line must not be sorting.", yes)
        ok = asyncio.run(
            run_probe(
                cfg,
                yes=yes,
                pulse_valves=pulse_valves,
                pulse_ms=pulse_ms,
                requests=requests,
                connect_timeout=connect_timeout,
                watchdog_timeout=watchdog_timeout,
            )
        )
    if not ok:
        raise typer.Exit(1)


main.__doc__ = help_paragraphs(main.__doc__)

if __name__ == "__main__":
    run_app(main)
