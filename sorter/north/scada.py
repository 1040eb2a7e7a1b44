"""The line's OPC UA server for SCADA as a side service of the line: started, fed, stopped and alarmed with it.

The server itself (sorter/north/opcua/) runs in a process of its own; this is the line's view of it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from sorter.config import OpcUaServerConfig, UserConfig
from sorter.core.alarms import Condition
from sorter.core.linestate import LineStats
from sorter.core.packml import Command, State
from sorter.north.opcua.protocol import OpcUaServerError
from sorter.north.opcua.proxy import LineOpcUaServer


class ScadaServer:
    name = "opcua_server"

    def __init__(
        self,
        cfg: OpcUaServerConfig,
        users: list[UserConfig],
        fractions: list[str],
        command: Callable[[Command, str], Coroutine[Any, Any, State]],
        *,
        log: Any,
    ) -> None:
        self.server = LineOpcUaServer(cfg, users, fractions, command, log=log)
        self.log = log
        self.error: str | None = None  # why it did not start
        self._started = False

    @property
    def listening(self) -> bool:
        return self.server.listening

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    async def start(self) -> None:
        """Start the server process (a few s: asyncua builds its address space); OpcUaServerError if it cannot."""
        try:
            await self.server.start()
        except OpcUaServerError as exc:
            self.error = str(exc)
            raise
        self.error = None
        self._started = True

    async def stop(self) -> None:
        self._started = False
        await self.server.stop()

    def publish(self, stats: LineStats) -> None:
        self.server.publish(stats.snapshot)

    def condition(self) -> Condition | None:
        if self.error is not None:
            return Condition("opcua_server_down", self.error, "fix the OPC UA server's config; restart")
        if self._started and not self.server.listening:
            return Condition(
                "opcua_server_down", "the OPC UA server process ended", "SCADA is blind: restart the service"
            )
        return None
