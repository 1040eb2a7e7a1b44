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
  request is the time it was really sent (the clock model needs that);
- an answer must be the answer to *this* request: the transaction id we sent
  (pymodbus takes an answer with id 0 for any request), the function we asked
  (pymodbus takes any function's answer), and for a write the echo of what we
  wrote. A PLC or gateway whose answers are out of step or mixed up fails the
  request (and the link reconnects) instead of feeding the link stale or
  foreign registers, or confirming a write that did not happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

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
    def __init__(
        self,
        host: str,
        port: int,
        *,
        unit_id: int = 1,
        timeout_s: float = 0.5,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = now  # request/response times, on the clock the link's clock model runs on
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()
        self._sent_tid = [0]  # transaction id of the request last sent on the current connection

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

        sent_tid = self._sent_tid = [0]

        def on_pdu(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
            if sending:
                sent_tid[0] = pdu.transaction_id
            return pdu

        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=f"plc {self.host}:{self.port}",
            trace_connect=on_connect,
            trace_pdu=on_pdu,
        )
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise PlcError(f"cannot connect to PLC at {self}: {str(exc) or type(exc).__name__}") from exc
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
    async def _call(
        self,
        what: str,
        function: int,
        request: Callable[[AsyncModbusTcpClient], Awaitable[Any]],
        echo: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Make one request; its answer, checked to be this request's (`echo`: a write's echo is right)."""
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
            if response is not None:
                if response.transaction_id != self._sent_tid[0]:
                    raise PlcError(
                        f"{what}: PLC at {self} answered transaction {response.transaction_id}, "
                        f"not {self._sent_tid[0]} (answers out of step)"
                    )
                if response.function_code & 0x7F != function:
                    raise PlcError(
                        f"{what}: PLC at {self} answered function {response.function_code & 0x7F}, not {function}"
                    )
            if response is None or response.isError():
                code = getattr(response, "exception_code", None)
                name = EXCEPTION_NAMES.get(code or 0, "unknown")
                raise PlcError(f"{what}: PLC at {self} answered exception {code} ({name})", code)
            if echo is not None and not echo(response):
                raise PlcError(f"{what}: PLC at {self} confirmed something else: {response}")
            return response

    async def read_input_registers_timed(self, address: int, count: int) -> tuple[list[int], float, float]:
        """FC4; returns (registers, t_request, t_response) in monotonic seconds."""
        t = [0.0]

        async def req(c: AsyncModbusTcpClient) -> Any:
            t[0] = self._now()  # taken under the lock, right as the request goes out
            return await c.read_input_registers(address, count=count, device_id=self.unit_id)

        response = await self._call(f"read input registers {address}..{address + count - 1}", 4, req)
        t_response = self._now()
        return self._registers(response, count, address), t[0], t_response

    async def read_input_registers(self, address: int, count: int) -> list[int]:
        return (await self.read_input_registers_timed(address, count))[0]

    async def read_holding_registers(self, address: int, count: int) -> list[int]:
        response = await self._call(
            f"read holding registers {address}..{address + count - 1}",
            3,
            lambda c: c.read_holding_registers(address, count=count, device_id=self.unit_id),
        )
        return self._registers(response, count, address)

    async def write_register(self, address: int, value: int) -> None:
        _check_u16(value)
        await self._call(
            f"write holding register {address}",
            6,
            lambda c: c.write_register(address, value, device_id=self.unit_id),
            lambda r: r.address == address and list(r.registers) == [value],
        )

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        """FC16: all values in one request (the PLC applies them together)."""
        for v in values:
            _check_u16(v)
        await self._call(
            f"write holding registers {address}..{address + len(values) - 1}",
            16,
            lambda c: c.write_registers(address, list(values), device_id=self.unit_id),
            lambda r: r.address == address and r.count == len(values),
        )

    async def write_coil(self, address: int, on: bool) -> None:
        await self._call(
            f"write coil {address}",
            5,
            lambda c: c.write_coil(address, bool(on), device_id=self.unit_id),
            lambda r: r.address == address and list(r.bits[:1]) == [bool(on)],
        )

    async def read_coils(self, address: int, count: int) -> list[bool]:
        response = await self._call(
            f"read coils {address}..{address + count - 1}",
            1,
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
