"""The line's PLC for commissioning, through the service's own link (`sorter.drivers.plc.make_plc_link`).

The link heartbeats and reconnects exactly as it does for the line service; a PLC that is absent,
busy or answering garbage becomes one `HwError` naming it and what to check, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

from hw.common import HwError
from sorter.config import LineConfig, PlcConfig
from sorter.core.clock import ClockModel
from sorter.drivers.plc import make_plc_link
from sorter.drivers.plc.base import PlcCommand, PlcError, PlcLinkBase

_POLL_S = 0.05


def where(plc: PlcConfig) -> str:
    return f"{plc.opcua.endpoint} (OPC UA)" if plc.protocol == "opcua" else f"{plc.host}:{plc.port} (Modbus TCP)"


def describe_plc(cfg: PlcConfig) -> str:
    return f"PLC at {where(cfg)}"


def plc_check(plc: PlcConfig) -> str:
    """What a technician should check when the PLC cannot be reached or refuses."""
    if plc.protocol == "opcua":
        return (
            "is the PLC powered and reachable on the network? plc.opcua.endpoint (host, port 4840 by default); "
            "is its OPC UA server enabled? does plc.opcua.security match what it demands, and does it trust "
            "this PC's certificate?"
        )
    return (
        f"is the PLC powered and on this network (ping {plc.host})? plc.host and plc.port (502 on most PLCs); "
        "is its Modbus TCP server enabled? does a firewall block the port? is another client holding its "
        "connections (it must allow 2)?"
    )


@contextlib.asynccontextmanager
async def connected_plc(cfg: LineConfig, wait_s: float | None = None) -> AsyncIterator[PlcLinkBase]:
    """A running link to the line's PLC with its encoder clock locked; HwError if it cannot be had."""
    link = make_plc_link(cfg.plc, ClockModel(), log=structlog.get_logger("hw.plc"))
    task = asyncio.create_task(link.run(), name="hw-plc-link")
    try:
        deadline = time.monotonic() + (wait_s or max(3.0, 6 * cfg.plc.timeout_s))
        while not (link.online and link.clock.ready):
            if task.done() or time.monotonic() > deadline:
                why = link.status.last_error or "no answer"
                raise HwError(f"{describe_plc(cfg.plc)} not reachable: {why}", plc_check(cfg.plc))
            await asyncio.sleep(_POLL_S)
        yield link
    finally:
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def plc_command(cfg: LineConfig, link: PlcLinkBase, code: PlcCommand) -> None:
    try:
        await link.command(code)
    except PlcError as exc:
        raise HwError(f"{describe_plc(cfg.plc)}: {code.name.lower()} failed: {exc}", plc_check(cfg.plc)) from None


async def run_belt(cfg: LineConfig, link: PlcLinkBase, timeout_s: float = 5.0) -> None:
    """Start the belt through the PLC (after a reset, as the line's Starting does: an earlier session may
    have left the watchdog tripped) and wait until it says the belt runs."""
    await plc_command(cfg, link, PlcCommand.RESET)
    await plc_command(cfg, link, PlcCommand.START_BELT)
    deadline = time.monotonic() + timeout_s
    while not link.status.belt_running:
        st = link.status
        if time.monotonic() > deadline or st.estop:
            why = "the e-stop is active" if st.estop else f"the belt does not run {timeout_s:g} s after the start"
            raise HwError(f"{describe_plc(cfg.plc)}: {why}", "release the e-stop; check the belt drive and its enable")
        await asyncio.sleep(_POLL_S)


async def stop_belt(link: PlcLinkBase) -> None:
    """Stop the belt if the PLC can still be told (best effort: used on the way out, also after errors)."""
    if link.online:
        with contextlib.suppress(PlcError, TimeoutError):
            await asyncio.wait_for(link.command(PlcCommand.STOP_BELT), 3.0)
