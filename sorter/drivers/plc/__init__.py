"""PLC links: Modbus TCP (`link`) or OPC UA (`opcua_link`), chosen by `plc.protocol`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sorter.config import PlcConfig
from sorter.core.clock import ClockModel
from sorter.drivers.plc.base import PlcLinkBase


def make_plc_link(
    cfg: PlcConfig, clock: ClockModel, *, log: Any = None, now: Callable[[], float] = time.monotonic
) -> PlcLinkBase:
    if cfg.protocol == "opcua":
        from sorter.drivers.plc.opcua_link import OpcUaPlcLink  # asyncua only where it is used

        return OpcUaPlcLink(cfg, clock, log=log, now=now)
    from sorter.drivers.plc.link import PlcLink

    return PlcLink(cfg, clock, log=log, now=now)
