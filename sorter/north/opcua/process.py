"""The OPC UA server process: asyncua's server with the line's address space and PackML methods.

It runs apart from the service (see proxy.py for why), spawned with child_main as its entry point:
it gets a ChildSpec and two pipes (protocol.py), builds the server (security from security.py),
publishes the snapshots the service sends as node values and alarm events, and forwards PackML
method calls to the service, which owns the state machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import os
import signal
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from asyncua import Node, Server, ua
from asyncua.common.event_objects import BaseEvent

from sorter.core.linestate import LineSnapshot
from sorter.core.packml import Command
from sorter.logs import setup_logging
from sorter.north.opcua.pki import DEFAULT_APPLICATION_URI, PkiError, application_uri, load_certificate
from sorter.north.opcua.protocol import COMMAND_TIMEOUT_S, PENDING_MAX, ChildSpec, OpcUaServerError, coalesce
from sorter.north.opcua.security import configure_security, current_caller, internal_server
from sorter.north.users import may_operate

ALARM_SEVERITY = 700
CLEARED_SEVERITY = 100
CHILD_NICE = 10  # the server process's niceness above the service's: SCADA gets the CPU the line leaves


def child_main(spec: ChildSpec, inbox: Connection, outbox: Connection) -> None:
    """The server process's entry point (spawned: a fresh interpreter, nothing inherited but these arguments)."""
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)
    # Ctrl-C and a closed terminal reach the whole process group: the service decides when this process
    # stops (stop(), or its pipe's end-of-file when the service is gone). SIGTERM still ends it.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if spec.log_file is not None:
        setup_logging(spec.log_level, json_logs=True)
        log_file = open(spec.log_file, "a", encoding="utf-8")  # noqa: SIM115 - open as long as the process
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=log_file))
    else:
        setup_logging(spec.log_level, json_logs=spec.json_logs)
    log = structlog.get_logger("opcua_server").bind(**spec.log_context)
    try:
        asyncio.run(_ServerProcess(spec, inbox, outbox, log).run())
    finally:
        inbox.close()
        outbox.close()


@dataclass
class _Nodes:
    state: Node
    state_current: Node
    ppm: Node
    model_version: Node
    alarms: Node
    counts: dict[str, Node]
    purity: dict[str, Node]


class _ServerProcess:
    """asyncua's server with the line's address space, users and hardening; runs in the server process."""

    def __init__(self, spec: ChildSpec, inbox: Connection, outbox: Connection, log: Any) -> None:
        self.cfg = spec.cfg
        self.users = list(spec.users)
        self.fractions = list(spec.fractions)
        self.log = log
        self._inbox = inbox
        self._outbox = outbox
        self._pending: deque[LineSnapshot] = deque(maxlen=PENDING_MAX)
        self._wake = asyncio.Event()
        self._stop = False
        self._replies: dict[int, asyncio.Future[tuple[str, str]]] = {}
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._nodes: _Nodes | None = None
        self._line_id: ua.NodeId | None = None
        self._events: list[Any] = []
        self._written: dict[ua.NodeId, Any] = {}
        self._alarms: list[str] = []

    async def run(self) -> None:
        try:
            server = await self._build()
            try:
                await server.start()
            except OSError as exc:
                raise OpcUaServerError(f"cannot listen on {self.cfg.endpoint}: {exc.strerror or exc}") from exc
        except Exception as exc:
            if not isinstance(exc, OpcUaServerError):
                self.log.exception("opcua server failed to start")
                exc = OpcUaServerError(f"the OPC UA server failed to start: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                self._outbox.send(("failed", OpcUaServerError(str(exc))))
            return
        self._server = server
        loop = asyncio.get_running_loop()
        try:
            # the address space lives as long as this process: keep it out of the cyclic GC's full collections
            gc.freeze()
            self._outbox.send(("ready", self._real_url(server)))
            loop.add_reader(self._inbox.fileno(), self._on_inbox)
            await self._pump()
        except OSError:  # the service is gone
            pass
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._inbox.fileno())
            self._halt_commands()
            self._server = None
            await server.stop()

    def _on_inbox(self) -> None:
        try:
            while self._inbox.poll():
                for msg in self._inbox.recv():
                    kind = msg[0]
                    if kind == "snap":
                        coalesce(self._pending, msg[1])
                    elif kind == "result":
                        fut = self._replies.get(msg[1])
                        if fut is not None and not fut.done():
                            fut.set_result((msg[2], msg[3]))
                    elif kind == "stop":
                        self._stop = True
        except (EOFError, OSError):  # the service has ended: nothing left to serve
            self._stop = True
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._inbox.fileno())
        self._wake.set()

    async def _pump(self) -> None:
        # the snapshots in order (coalesced as protocol.coalesce says): a state or alarm that lasted one
        # snapshot is still seen by subscriptions and raises its events; unchanged values cost a comparison only
        while True:
            while self._pending and not self._stop:
                snap = self._pending.popleft()
                try:
                    await self._apply(snap)
                except Exception:  # one bad snapshot must not end publishing
                    self.log.exception("opcua publish failed")
            if self._stop:
                return
            await self._wake.wait()
            self._wake.clear()

    def _real_url(self, server: Server) -> str:
        url = urlparse(self.cfg.endpoint)
        port = server.bserver.port if server.bserver is not None else url.port
        host = url.hostname or "localhost"
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()  # what a client on the plant network would use
        if ":" in host:
            host = f"[{host}]"
        return url._replace(netloc=f"{host}:{port}").geturl()

    async def _build(self) -> Server:
        cfg = self.cfg
        for path, what in ((cfg.certificate, "certificate"), (cfg.private_key, "private key")):
            if not Path(path).is_file():
                raise OpcUaServerError(
                    f"OPC UA server {what} {path} not found; make one with "
                    f"`sorter opcua certs --out {Path(path).parent}` (opcua_server.certificate / private_key)"
                )
        if not Path(cfg.trust_dir).is_dir():
            raise OpcUaServerError(
                f"OPC UA trust folder {cfg.trust_dir} not found; `sorter opcua certs` makes it, "
                "put client certificates (DER/PEM) there"
            )
        try:
            app_uri = application_uri(load_certificate(cfg.certificate)) or DEFAULT_APPLICATION_URI
        except PkiError as exc:
            raise OpcUaServerError(str(exc)) from exc

        server = Server(iserver=internal_server(cfg, self.users, self.log))
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name("magnet-sorter line")
        server.product_uri = "urn:magnet-sorter"
        server.application_type = ua.ApplicationType.Server
        await server.set_application_uri(app_uri)
        try:
            await server.load_certificate(str(cfg.certificate))
            await server.load_private_key(str(cfg.private_key))
        except Exception as exc:
            raise OpcUaServerError(f"cannot load the OPC UA server certificate or key: {exc}") from exc

        configure_security(server, cfg, self.log)

        await self._build_address_space(server)
        return server

    async def _build_address_space(self, server: Server) -> None:
        idx = await server.register_namespace(self.cfg.namespace)

        def nid(path: str) -> ua.NodeId:
            # string node ids from the browse path: stable across restarts, so SCADA tags may use them
            return ua.NodeId(ua.String(path), ua.Int16(idx))

        def qn(name: str) -> ua.QualifiedName:
            return ua.QualifiedName(name, idx)

        line = await server.nodes.objects.add_object(nid("SortingLine"), qn("SortingLine"))
        self._line_id = line.nodeid
        state = await line.add_variable(nid("SortingLine.State"), qn("State"), "", ua.VariantType.String)
        state_current = await line.add_variable(
            nid("SortingLine.StateCurrent"), qn("StateCurrent"), 0, ua.VariantType.Int32
        )
        for cmd in Command:
            await line.add_method(nid(f"SortingLine.{cmd.value}"), qn(cmd.value), self._method(cmd), [], [])
        fractions = await line.add_folder(nid("SortingLine.Fractions"), qn("Fractions"))
        counts = {}
        for name in self.fractions:
            obj = await fractions.add_object(nid(f"SortingLine.Fractions.{name}"), qn(name))
            counts[name] = await obj.add_variable(
                nid(f"SortingLine.Fractions.{name}.Count"), qn("Count"), 0, ua.VariantType.UInt64
            )
        ppm = await line.add_variable(
            nid("SortingLine.PiecesPerMinute"), qn("PiecesPerMinute"), 0.0, ua.VariantType.Double
        )
        purity_folder = await line.add_folder(nid("SortingLine.Purity"), qn("Purity"))
        purity = {
            name: await purity_folder.add_variable(
                nid(f"SortingLine.Purity.{name}"), qn(name), math.nan, ua.VariantType.Double
            )
            for name in self.fractions
        }
        model = await line.add_variable(nid("SortingLine.ModelVersion"), qn("ModelVersion"), "", ua.VariantType.String)
        alarms = await line.add_variable(
            nid("SortingLine.ActiveAlarms"), qn("ActiveAlarms"), ua.Variant([], ua.VariantType.String)
        )
        await alarms.write_value_rank(ua.ValueRank.OneDimension)
        # ArrayDimensions is UInt32[] (asyncua's write_array_dimensions is annotated for a scalar)
        await alarms.write_attribute(
            ua.AttributeIds.ArrayDimensions, ua.DataValue(ua.Variant([0], ua.VariantType.UInt32))
        )
        self._nodes = _Nodes(state, state_current, ppm, model, alarms, counts, purity)
        self._written = {}
        self._alarms = []

        # alarms are BaseEventType events emitted by SortingLine and, because SCADA systems commonly
        # subscribe to events at the Server object, also by Server (the spec's notifier hierarchy:
        # Server HasNotifier SortingLine)
        await server.nodes.server.add_reference(line.nodeid, ua.ObjectIds.HasNotifier)
        self._events = [
            await server.get_event_generator(ua.ObjectIds.BaseEventType, line.nodeid),
            await server.get_event_generator(_base_event(line.nodeid), ua.ObjectIds.Server),
        ]

    # --- publishing (server process) ---

    async def _apply(self, snap: LineSnapshot) -> None:
        n = self._nodes
        if n is None:
            return
        await self._set(n.state, snap.state.label, ua.VariantType.String)
        await self._set(n.state_current, int(snap.state), ua.VariantType.Int32)
        for name, node in n.counts.items():
            count = snap.fraction_counts.get(name)
            if count is not None:
                await self._set(node, max(int(count), 0), ua.VariantType.UInt64)
        await self._set(n.ppm, float(snap.pieces_per_minute), ua.VariantType.Double)
        for name, node in n.purity.items():
            await self._set(node, float(snap.purity.get(name, math.nan)), ua.VariantType.Double)
        await self._set(n.model_version, snap.model_version, ua.VariantType.String)
        alarms = [str(a) for a in snap.alarms]
        await self._set(n.alarms, alarms, ua.VariantType.String)
        await self._alarm_events(alarms)

    async def _set(self, node: Node, value: Any, vtype: ua.VariantType) -> None:
        old = self._written.get(node.nodeid, _UNSET)
        if old is not _UNSET and _same(old, value):
            return
        assert self._server is not None
        now = ua.DateTime.now(UTC)  # SourceTimestamp: when the line published it, which SCADA historians record
        dv = ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now)
        await self._server.write_attribute_value(node.nodeid, dv)
        self._written[node.nodeid] = value

    async def _alarm_events(self, alarms: list[str]) -> None:
        before = self._alarms
        self._alarms = list(alarms)
        for text in alarms:
            if text not in before:
                await self._event(text, ALARM_SEVERITY)
        for text in before:
            if text not in alarms:
                await self._event(f"cleared: {text}", CLEARED_SEVERITY)

    async def _event(self, message: str, severity: int) -> None:
        for gen in self._events:
            gen.event.Severity = severity
            await gen.trigger(message=message)

    # --- PackML methods (server process) ---

    def _method(self, cmd: Command) -> Callable[..., Awaitable[Any]]:
        # an `async def` so that asyncua awaits it in the request's task (where current_caller() knows
        # the session's user) instead of running it in its thread pool
        async def handler(parent: ua.NodeId, *args: Any) -> Any:
            return await self._call(cmd, parent, args)

        return handler

    async def _call(self, cmd: Command, parent: ua.NodeId, args: tuple[Any, ...]) -> Any:
        who, role = current_caller()
        detail = ""
        try:
            if parent != self._line_id:
                status = ua.StatusCodes.BadMethodInvalid
            elif args:
                status = ua.StatusCodes.BadTooManyArguments
            elif not may_operate(role):
                status = ua.StatusCodes.BadUserAccessDenied
            else:
                status, detail = await self._forward(cmd, who)
        except Exception as exc:  # a bug here: logged with its traceback, the client told "unexpected", not "internal"
            self.log.exception("opcua command failed", user=who, command=cmd.value)
            status, detail = ua.StatusCodes.BadUnexpectedError, f"{type(exc).__name__}: {exc}"
        result = ua.StatusCode(ua.UInt32(status))
        log = self.log.info if result.is_good() else self.log.warning
        log("opcua command", user=who, role=role, command=cmd.value, result=result.name, detail=detail or None)
        return [] if result.is_good() else result

    async def _forward(self, cmd: Command, who: str) -> tuple[int, str]:
        """Have the service run the command (on its loop) and wait for the result."""
        halted = ua.StatusCodes.BadServerHalted, "the line service is not running"
        if self._stop:
            return halted
        req_id = next(self._ids)
        fut: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._replies[req_id] = fut
        try:
            self._outbox.send(("cmd", req_id, cmd.value, who))
            kind, detail = await asyncio.wait_for(fut, COMMAND_TIMEOUT_S)
        except OSError:
            return halted
        except TimeoutError:
            return ua.StatusCodes.BadTimeout, f"the line service did not answer within {COMMAND_TIMEOUT_S} s"
        finally:
            self._replies.pop(req_id, None)
        status = {
            "ok": ua.StatusCodes.Good,
            "invalid_state": ua.StatusCodes.BadInvalidState,
            "timeout": ua.StatusCodes.BadTimeout,
            "halted": ua.StatusCodes.BadServerHalted,
        }.get(kind, ua.StatusCodes.BadInternalError)
        return status, detail

    def _halt_commands(self) -> None:
        for fut in self._replies.values():
            if not fut.done():
                fut.set_result(("halted", "the line service is not running"))


_UNSET = object()  # "never written": None is a value a node could hold


def _same(a: Any, b: Any) -> bool:
    """Whether a write can be skipped: NaN (purity of an empty fraction) equals itself here, and 1 != 1.0."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _base_event(source: ua.NodeId) -> BaseEvent:
    """The Server object's alarm event: emitted there, but its SourceNode still says SortingLine."""
    return BaseEvent(sourcenode=source)
