"""A small OPC UA client for the PLC: the only module of the PLC link that imports asyncua.

asyncua's API moves between releases (written against 2.1), so it stays
behind this seam and every failure comes out as one PlcError. Deliberate
choices:
- asyncua's own auto-reconnect stays off: the link owns reconnect policy and
  re-creates the session and its subscription itself, like the Modbus link;
- every request has a hard timeout (`timeout_s`); a request that fails for a
  transport reason means the connection is gone;
- nodes are resolved once per connection by browse path in the configured
  namespace, so a PLC with other names needs a config change, not code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from asyncua import Client, Node, ua
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.crypto import security_policies

from sorter.config import PlcOpcUaConfig
from sorter.drivers.plc.base import PlcError

# asyncua logs every dropped connection with a traceback at ERROR/WARNING; the link reports them once itself
for _name in ("asyncua", "asyncua.client", "asyncua.client.ua_client", "asyncua.common.subscription"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

UInt16, UInt32, Boolean = ua.VariantType.UInt16, ua.VariantType.UInt32, ua.VariantType.Boolean

# nodes a PLC may lack (commissioning aids): a connection without them is fine, reading them says so
OPTIONAL_NODES = frozenset({"chute_counts"})

# transport-level failures: the connection is unusable afterwards
_TRANSPORT_ERRORS = (OSError, ConnectionError, TimeoutError, asyncio.TimeoutError, ua.UaError)


def u16(v: int) -> ua.Variant:
    return ua.Variant(int(v), UInt16)


def u32(v: int) -> ua.Variant:
    return ua.Variant(int(v), UInt32)


def boolean(v: bool) -> ua.Variant:
    return ua.Variant(bool(v), Boolean)


class _Handler:
    """asyncua subscription callbacks, turned into (browse name, value) calls."""

    def __init__(self, names: dict[Any, str], on_change: Callable[[str, Any], None], on_lost: Callable[[], None]):
        self.names = names
        self.on_change = on_change
        self.on_lost = on_lost

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        name = self.names.get(node.nodeid)
        if name is not None:
            self.on_change(name, val)

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        # the server tells us the subscription is gone (e.g. session timed out): the session is over
        self.on_lost()


class OpcUaPlcClient:
    """One connection to the PLC's OPC UA server, with the PLC's nodes resolved by name."""

    def __init__(self, cfg: PlcOpcUaConfig, timeout_s: float) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._nodes: dict[str, Node] = {}
        self._line: Node | None = None
        self._sub: Subscription | None = None
        self.lost = asyncio.Event()

    def __str__(self) -> str:
        return self.cfg.endpoint

    # --- connection ---
    async def connect(self) -> None:
        await self.close()
        self.lost = asyncio.Event()
        client = Client(self.cfg.endpoint, timeout=self.timeout_s)
        client.session_timeout = round(self.cfg.session_timeout_s * 1000)
        try:
            await self._configure_security(client)
            await asyncio.wait_for(client.connect(), 4 * self.timeout_s + 2.0)
        except PlcError:
            raise
        except Exception as exc:  # asyncua raises many kinds here (refused, bad identity, untrusted cert, ...)
            with contextlib.suppress(Exception):
                client.disconnect_socket()
            raise PlcError(f"cannot connect to PLC at {self}: {_describe(exc)}") from exc
        self._client = client
        try:
            await self._resolve(client)
        except PlcError:
            await self.close()
            raise

    async def _configure_security(self, client: Client) -> None:
        sec = self.cfg.security
        if sec.username is not None and sec.password_env is not None:
            password = os.environ.get(sec.password_env)
            if password is None:
                raise PlcError(
                    f"PLC user {sec.username!r}: environment variable {sec.password_env} (its password) is not set"
                )
            client.set_user(sec.username)
            client.set_password(password)
        if sec.policy == "None":
            return
        assert sec.certificate is not None and sec.private_key is not None  # checked by the config
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            certificate=str(sec.certificate),
            private_key=str(sec.private_key),
            server_certificate=str(sec.server_certificate) if sec.server_certificate else None,
            mode=getattr(ua.MessageSecurityMode, sec.mode),
        )

    async def _resolve(self, client: Client) -> None:
        cfg = self.cfg
        try:
            idx = await self._timed(client.get_namespace_index(cfg.namespace))
        except (ValueError, PlcError) as exc:
            raise PlcError(f"PLC at {self} has no namespace {cfg.namespace!r}") from exc
        path = [f"{idx}:{p}" for p in cfg.line_path]
        try:
            self._line = await self._timed(client.nodes.objects.get_child(path))
            for key, browse_name in cfg.nodes.model_dump().items():
                try:
                    self._nodes[key] = await self._timed(self._line.get_child(f"{idx}:{browse_name}"))
                except ua.UaStatusCodeError:
                    if key not in OPTIONAL_NODES:
                        raise
        except ua.UaStatusCodeError as exc:
            raise PlcError(
                f"PLC at {self}: {'/'.join(['Objects', *cfg.line_path])} lacks a node the config names "
                f"(plc.opcua.line_path / plc.opcua.nodes): {_describe(exc)}"
            ) from exc

    async def close(self) -> None:
        client, self._client, self._sub = self._client, None, None
        self._nodes.clear()
        self.lost.set()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), self.timeout_s)
            with contextlib.suppress(Exception):
                client.disconnect_socket()

    # --- requests ---
    async def _timed(self, aw: Any) -> Any:
        if self.lost.is_set() and self._client is not None:
            raise PlcError(f"connection to PLC at {self} lost")
        try:
            return await asyncio.wait_for(aw, self.timeout_s)
        except TimeoutError as exc:
            raise PlcError(f"no answer from PLC at {self} within {self.timeout_s:g} s") from exc
        except ua.UaStatusCodeError:
            raise  # the PLC answered: the caller decides what a Bad status means
        except _TRANSPORT_ERRORS as exc:
            raise PlcError(f"connection to PLC at {self} lost: {_describe(exc)}") from exc

    def _node(self, key: str) -> Node:
        node = self._nodes.get(key)
        if node is None and key in OPTIONAL_NODES and self._client is not None:
            name = getattr(self.cfg.nodes, key)
            raise PlcError(f"the PLC at {self} has no node {'/'.join([*self.cfg.line_path, name])} (plc.opcua.nodes)")
        if node is None:
            raise PlcError(f"{key}: not connected to PLC at {self}")
        return node

    async def read(self, key: str) -> Any:
        return (await self.read_timed(key))[0]

    async def read_timed(self, key: str) -> tuple[Any, float, float]:
        """Read one variable; returns (value, t_request, t_response) in monotonic seconds."""
        node = self._node(key)
        t_req = time.monotonic()
        try:
            value = await self._timed(node.read_value())
        except ua.UaStatusCodeError as exc:
            raise PlcError(f"read {key}: PLC at {self} answered {_describe(exc)}") from exc
        return value, t_req, time.monotonic()

    async def read_many(self, keys: list[str]) -> dict[str, Any]:
        assert self._client is not None
        try:
            values = await self._timed(self._client.read_values([self._node(k) for k in keys]))
        except ua.UaStatusCodeError as exc:
            raise PlcError(f"read {keys}: PLC at {self} answered {_describe(exc)}") from exc
        return dict(zip(keys, values, strict=True))

    async def write(self, key: str, value: ua.Variant) -> None:
        node = self._node(key)
        try:
            await self._timed(node.write_value(ua.DataValue(value)))
        except ua.UaStatusCodeError as exc:
            raise PlcError(f"write {key}: PLC at {self} answered {_describe(exc)}") from exc

    async def call(self, key: str, *args: ua.Variant) -> Any:
        """Call a method of the line object; returns its output (one value) or raises PlcError."""
        method = self._node(key)
        assert self._line is not None
        try:
            return await self._timed(self._line.call_method(method.nodeid, *args))
        except ua.UaStatusCodeError as exc:
            raise PlcError(f"call {key}: PLC at {self} answered {_describe(exc)}") from exc

    async def subscribe(self, keys: list[str], on_change: Callable[[str, Any], None], publishing_ms: float) -> None:
        """Data-change subscription on the given variables; on_change(key, value) on the loop."""
        assert self._client is not None
        nodes = [self._node(k) for k in keys]
        handler = _Handler({n.nodeid: k for n, k in zip(nodes, keys, strict=True)}, on_change, self.lost.set)
        try:
            self._sub = await self._timed(self._client.create_subscription(publishing_ms, handler))
            await self._timed(self._sub.subscribe_data_change(nodes))
        except ua.UaStatusCodeError as exc:
            raise PlcError(f"subscribe: PLC at {self} answered {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ua.UaStatusCodeError):
        return ua.StatusCode(exc.code).name
    return str(exc) or type(exc).__name__
