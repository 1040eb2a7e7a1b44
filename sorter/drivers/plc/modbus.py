"""A small async Modbus TCP client: the only module of the service that imports pymodbus.

pymodbus changes its API between minor versions (written against 3.16:
`device_id=` keyword, keyword-only `count=`, responses with `isError()`), so
it is kept behind this seam and every failure comes out as one PlcError.

Deliberate choices:
- pymodbus' own reconnect is off (reconnect_delay=0) and retries are 0: the
  PLC link owns reconnect policy and timing, and a retried request would
  arrive late anyway;
- every request has a hard timeout, and a lost connection fails the request
  at once instead of after the timeout (pymodbus leaves it waiting);
- requests are serialised by our own lock, so the time taken just before a
  request is the time it was really sent (the clock model needs that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from sorter.drivers.plc.base import PlcError

__all__ = ["ModbusClient", "PlcError"]

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusClient:
    def __init__(self, host: str, port: int, *, unit_id: int = 1, timeout_s: float = 0.5) -> None:
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()

    def __str__(self) -> str:
        return f"{self.host}:{self.port} unit {self.unit_id}"

    # --- connection ---
    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected and not self._lost.is_set()

    async def connect(self) -> None:
        self.close()
        self._lost = asyncio.Event()
        lost = self._lost  # bound now: a late callback of an old client must not hit a new connection

        def on_connect(up: bool) -> None:
            if not up:
                lost.set()

        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=f"plc {self.host}:{self.port}",
            trace_connect=on_connect,
        )
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise PlcError(f"cannot connect to PLC at {self}: {exc or type(exc).__name__}") from exc
        if not ok:
            client.close()
            raise PlcError(f"cannot connect to PLC at {self}: connection refused or unreachable")
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._lost.set()

    # --- requests ---
    async def _call(self, what: str, request: Callable[[AsyncModbusTcpClient], Awaitable[Any]]) -> Any:
        async with self._lock:
            client = self._client
            if client is None or not self.connected:
                raise PlcError(f"{what}: not connected to PLC at {self}")
            req = asyncio.ensure_future(request(client))
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                done, _ = await asyncio.wait({req, lost}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not req.done():
                    req.cancel()
            if req not in done:
                if lost in done:
                    raise PlcError(f"{what}: connection to PLC at {self} lost")
                raise PlcError(f"{what}: no answer from PLC at {self} within {self.timeout_s:g} s")
            try:
                response = req.result()
            except ModbusException as exc:
                raise PlcError(f"{what}: {exc}") from exc
            if response is None or response.isError():
                code = getattr(response, "exception_code", None)
                name = EXCEPTION_NAMES.get(code or 0, "unknown")
                raise PlcError(f"{what}: PLC at {self} answered exception {code} ({name})", code)
            return response

    async def read_input_registers_timed(self, address: int, count: int) -> tuple[list[int], float, float]:
        """FC4; returns (registers, t_request, t_response) in monotonic seconds."""
        t = [0.0]

        async def req(c: AsyncModbusTcpClient) -> Any:
            t[0] = time.monotonic()  # taken under the lock, right as the request goes out
            return await c.read_input_registers(address, count=count, device_id=self.unit_id)

        response = await self._call(f"read input registers {address}..{address + count - 1}", req)
        t_response = time.monotonic()
        return self._registers(response, count, address), t[0], t_response

    async def read_input_registers(self, address: int, count: int) -> list[int]:
        return (await self.read_input_registers_timed(address, count))[0]

    async def read_holding_registers(self, address: int, count: int) -> list[int]:
        response = await self._call(
            f"read holding registers {address}..{address + count - 1}",
            lambda c: c.read_holding_registers(address, count=count, device_id=self.unit_id),
        )
        return self._registers(response, count, address)

    async def write_register(self, address: int, value: int) -> None:
        _check_u16(value)
        await self._call(
            f"write holding register {address}",
            lambda c: c.write_register(address, value, device_id=self.unit_id),
        )

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        """FC16: all values in one request (the PLC applies them together)."""
        for v in values:
            _check_u16(v)
        await self._call(
            f"write holding registers {address}..{address + len(values) - 1}",
            lambda c: c.write_registers(address, list(values), device_id=self.unit_id),
        )

    async def write_coil(self, address: int, on: bool) -> None:
        await self._call(
            f"write coil {address}",
            lambda c: c.write_coil(address, bool(on), device_id=self.unit_id),
        )

    async def read_coils(self, address: int, count: int) -> list[bool]:
        response = await self._call(
            f"read coils {address}..{address + count - 1}",
            lambda c: c.read_coils(address, count=count, device_id=self.unit_id),
        )
        return [bool(b) for b in response.bits[:count]]

    def _registers(self, response: Any, count: int, address: int) -> list[int]:
        regs = list(response.registers)
        if len(regs) != count:
            raise PlcError(f"PLC at {self} returned {len(regs)} registers from {address}, expected {count}")
        return regs


def _check_u16(value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value {value} does not fit 16 bits")
