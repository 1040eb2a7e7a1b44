"""The line's own OPC UA server: state, counts and alarms for SCADA/MES, PackML commands from them.

The server runs in its own thread with its own asyncio loop: a client that floods reads, holds many
subscriptions or sends garbage costs that thread's time, never a turn of the sorting loop. The two
loops meet at two points only:

* `publish(snapshot)` (service loop -> server thread): queues the snapshot and wakes the server
  thread, which writes the values that changed and raises alarm events;
* a PackML method call (server thread -> service loop): forwarded with
  `asyncio.run_coroutine_threadsafe` to the `command` coroutine and awaited there.

Security (docs/opcua-server.md): Basic256Sha256 Sign and SignAndEncrypt endpoints (None only when
configured), client certificates must be in the trust folder, users from the config with argon2
hashes; viewers read, operators and technicians may also call the PackML methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import math
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from asyncua import Node, Server, ua
from asyncua.common.event_objects import BaseEvent
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography import x509

from sorter.config import OpcUaServerConfig, Role, UserConfig
from sorter.linestate import LineSnapshot
from sorter.opcua_pki import PkiError, application_uri, load_certificate
from sorter.packml import Command, InvalidState
from sorter.users import authenticate, may_operate

CommandFn = Callable[[Command, str], Coroutine[Any, Any, object]]  # the result is not used

DEFAULT_APPLICATION_URI = "urn:magnet-sorter:line-server"
COMMAND_TIMEOUT_S = 5.0  # a PackML command only starts a transition; longer means the service loop is stuck
ALARM_SEVERITY = 700
CLEARED_SEVERITY = 100
_PENDING_MAX = 1000  # snapshots queued for the server thread; past this the oldest go (the thread is stuck anyway)


class OpcUaServerError(Exception):
    """The server cannot start; str() says why and what to do."""


@dataclass
class LineUser(User):
    """asyncua's session user plus the line's role (asyncua itself only knows Admin/User/Anonymous)."""

    line_role: Role = "viewer"


# The user of the session whose Call request is being served. asyncua (2.1) hands a method handler only
# the object id and the arguments, not the session; _LineSession.call sets this around the call, and the
# handler, a coroutine awaited in the same task (MethodService._run_method), reads it.
_CALLER: contextvars.ContextVar[User | None] = contextvars.ContextVar("opcua_caller", default=None)
_ANONYMOUS = User(role=UserRole.Anonymous)


class _LineSession(InternalSession):
    """An asyncua session that tells method handlers its user and is bound to its secure channel.

    Subclassing the session (made by _LineInternalServer.create_session) is the narrowest hook asyncua
    offers: the session is the only object that knows both the user (after ActivateSession) and the
    Call request. PermissionRuleset.check_validity sees the user too, but can only refuse the whole
    request with a service fault, without a per-method status or the user's name for the command log.
    """

    _client_cert: bytes | None = None
    allow_none_security = False  # set per server by _LineInternalServer

    async def create_session(
        self, params: ua.CreateSessionParameters, sockname: tuple[str, int] | None = None
    ) -> ua.CreateSessionResult:
        result = await super().create_session(params, sockname)  # runs the certificate validator
        self._client_cert = params.ClientCertificate or None
        return result

    def activate_session(
        self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None
    ) -> ua.ActivateSessionResult:
        # Two checks asyncua 2.1 leaves out (tests/test_opcua_server.py shows both holes):
        # - A None secure channel is always accepted, for discovery (GetEndpoints), whatever endpoints are
        #   offered, and asyncua then lets a session be created and activated on it. Every Basic256Sha256
        #   channel carries the client's certificate; the None policy a connection falls back to when None
        #   is not offered has none (b""), whatever the client sends, so "no channel certificate" is
        #   exactly "an unoffered None channel" (with None offered, its channels may carry one: allowed).
        # - The certificate validated at CreateSession must be the secure channel's (whose key signed this
        #   ActivateSession); otherwise an untrusted key gets in by naming a trusted, public, certificate
        #   (or none) in CreateSession.
        if not peer_certificate:
            if not self.allow_none_security:
                raise ServiceError(ua.StatusCodes.BadSecurityModeRejected)
        elif not (self._client_cert and self._client_cert.startswith(peer_certificate)):
            raise ServiceError(ua.StatusCodes.BadSecurityChecksFailed)
        return super().activate_session(params, peer_certificate)

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        token = _CALLER.set(self.user)
        try:
            return await super().call(params)
        finally:
            _CALLER.reset(token)


class _LineInternalServer(InternalServer):
    def __init__(self, user_manager: UserManager, allow_none_security: bool) -> None:
        super().__init__(user_manager=user_manager)
        self._allow_none_security = allow_none_security

    def create_session(self, name: str, user: User = _ANONYMOUS, external: bool = False) -> InternalSession:
        session = _LineSession(self, self.aspace, self.subscription_service, name, user=user, external=external)
        session.allow_none_security = self._allow_none_security
        return session

    def lookup_external_session(self, auth_token: ua.NodeId) -> InternalSession | None:
        # No moving a session to a new secure channel (OPC UA's reconnect path). asyncua attaches the found
        # session to the new connection *before* ActivateSession is checked, and keeps it there when the
        # check fails; session tokens are sequential numbers, so anyone able to open a channel (a None
        # channel always opens) could take over an operator's session. A client that lost its connection
        # creates a new session instead, which every client does when this is refused.
        return None


class _Users(UserManager):
    """Users from the config (argon2 hashes); anonymous clients are viewers if the config allows them."""

    def __init__(self, users: list[UserConfig], allow_anonymous: bool, log: Any) -> None:
        self._users = list(users)
        self._allow_anonymous = allow_anonymous
        self._log = log

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        # called on the server thread; the argon2 verification (tens of ms) holds up only that thread
        if username is None and password is None:
            if self._allow_anonymous:
                return LineUser(role=UserRole.User, name=None, line_role="viewer")
            self._log.warning("opcua anonymous login refused")
            return None
        user = authenticate(self._users, username, password)
        if user is None:
            self._log.warning("opcua login refused", user=_printable(username))
            return None
        self._log.info("opcua login", user=user.name, role=user.role)
        # asyncua's role User: read, browse, subscribe, call; never Admin (which may add or delete nodes)
        return LineUser(role=UserRole.User, name=user.name, line_role=user.role)


def _printable(name: str | None, limit: int = 64) -> str:
    """A client-chosen user name, safe for a log line."""
    text = "" if name is None else str(name)
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("..." if name is not None and len(str(name)) > limit else "")


class _TrustValidator:
    """asyncua's CertificateValidator over the trust folder, re-read at every CreateSession.

    Re-reading lets a technician add a SCADA client's certificate to the folder without restarting the
    line; sessions are created rarely and the folder holds a handful of files.
    """

    def __init__(self, trust_dir: Path, log: Any) -> None:
        self._store = TrustStore([trust_dir], [])
        options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
        self._validator = CertificateValidator(options, self._store)
        self._log = log

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        await self._store.load_trust()
        try:
            await self._validator.validate(cert, app)
        except ServiceError as exc:
            cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            self._log.warning(
                "opcua client certificate refused",
                subject=str(cn[0].value) if cn else "",
                application_uri=_printable(app.ApplicationUri, 200),
                status=ua.StatusCode(ua.UInt32(exc.code)).name,
            )
            raise


@dataclass
class _Nodes:
    state: Node
    state_current: Node
    ppm: Node
    model_version: Node
    alarms: Node
    counts: dict[str, Node]
    purity: dict[str, Node]


class LineOpcUaServer:
    """The line's OPC UA server, in its own thread; see the module docstring."""

    def __init__(
        self,
        cfg: OpcUaServerConfig,
        users: list[UserConfig],
        fractions: list[str],
        command: CommandFn,
        log: Any = None,
    ) -> None:
        self.cfg = cfg
        self.users = list(users)
        self.fractions = list(dict.fromkeys(fractions))
        self._command = command
        self.log = log if log is not None else structlog.get_logger("opcua_server")
        self._service_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started: concurrent.futures.Future[None] | None = None
        self._stop_requested = threading.Event()
        # deque.append/popleft are atomic: publish() appends from the service loop, the server thread pops
        self._pending: deque[LineSnapshot] = deque(maxlen=_PENDING_MAX)
        # the server thread's loop: set before `_started` resolves, None again once the thread ends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._server: Server | None = None
        self._nodes: _Nodes | None = None
        self._line_id: ua.NodeId | None = None
        self._events: list[Any] = []
        self._written: dict[ua.NodeId, Any] = {}
        self._alarms: list[str] = []
        self._url = cfg.endpoint

    # --- the service loop's side ---

    @property
    def endpoint_url(self) -> str:
        """The URL clients connect to: the configured one with the port really bound (config port 0 picks one)."""
        return self._url

    async def start(self) -> None:
        """Start the server thread and wait until it listens; OpcUaServerError if it cannot."""
        if self._thread is not None:
            raise RuntimeError("the OPC UA server is already running")
        self._service_loop = asyncio.get_running_loop()
        self._stop_requested.clear()
        self._started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, name="opcua-server", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(self._started)
        except BaseException:
            await self.stop()
            raise
        self.log.info(
            "opcua server listening",
            endpoint=self.endpoint_url,
            none_security=self.cfg.allow_none_security,
            anonymous=self.cfg.allow_anonymous,
        )

    async def stop(self) -> None:
        """Close all sessions and the listening socket, and end the server thread."""
        thread = self._thread
        if thread is None:
            return
        self._stop_requested.set()
        self._wake_server()
        await asyncio.to_thread(thread.join)
        self._thread = None
        self.log.info("opcua server stopped")

    def publish(self, snap: LineSnapshot) -> None:
        """Show a new snapshot (thread-safe, never blocks): values that changed, alarm events."""
        self._pending.append(snap)
        self._wake_server()

    def _wake_server(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not started yet: the snapshot waits in the queue
        with contextlib.suppress(RuntimeError):  # the server loop has just closed
            loop.call_soon_threadsafe(wake.set)

    # --- the server thread ---

    def _thread_main(self) -> None:
        assert self._started is not None
        started = self._started
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                self.log.exception("opcua server thread failed")
        finally:
            if not started.done():
                started.set_exception(OpcUaServerError("the OPC UA server stopped while starting"))

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            await self._serve_until_stopped()
        finally:
            self._loop = self._wake = None  # publish() from now on only queues, for a later start()

    async def _serve_until_stopped(self) -> None:
        server = await self._build()
        try:
            await server.start()
        except OSError as exc:
            raise OpcUaServerError(f"cannot listen on {self.cfg.endpoint}: {exc.strerror or exc}") from exc
        self._server = server
        try:
            self._url = self._real_url(server)
            assert self._started is not None
            self._started.set_result(None)
            await self._pump()
        finally:
            self._server = None
            await server.stop()

    async def _pump(self) -> None:
        # every snapshot in order (not just the latest): a state or alarm that lasted one snapshot is still
        # seen by subscriptions and raises its events; unchanged values cost a comparison only
        assert self._wake is not None
        while True:
            while self._pending and not self._stop_requested.is_set():
                snap = self._pending.popleft()
                try:
                    await self._apply(snap)
                except Exception:  # one bad snapshot must not end publishing
                    self.log.exception("opcua publish failed")
            if self._stop_requested.is_set():
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

        # the TrustStore logs every refused certificate as an exception with a traceback; _TrustValidator
        # logs one structured line instead
        logging.getLogger("asyncuagds.validate").setLevel(logging.CRITICAL)

        iserver = _LineInternalServer(_Users(self.users, cfg.allow_anonymous, self.log), cfg.allow_none_security)
        # a line server has a handful of clients: tighter than asyncua's defaults, so that a misbehaving
        # client cannot pile up connections or subscriptions in the server thread
        iserver.max_connections = 64
        iserver.max_subscriptions = 256
        iserver.max_pending_activation_seconds = 10.0
        iserver.allow_remote_admin = False
        server = Server(iserver=iserver)
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

        policies = [
            ua.SecurityPolicyType.Basic256Sha256_Sign,
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        ]
        if cfg.allow_none_security:
            policies.insert(0, ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        tokens: list[type] = [ua.UserNameIdentityToken]
        if cfg.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        server.set_certificate_validator(_TrustValidator(Path(cfg.trust_dir), self.log))

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

    # --- publishing (server thread) ---

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

    # --- PackML methods (server thread) ---

    def _method(self, cmd: Command) -> Callable[..., Awaitable[Any]]:
        # an `async def` so that asyncua awaits it in the request's task (where _CALLER is set) instead
        # of running it in its thread pool
        async def handler(parent: ua.NodeId, *args: Any) -> Any:
            return await self._call(cmd, parent, args)

        return handler

    async def _call(self, cmd: Command, parent: ua.NodeId, args: tuple[Any, ...]) -> Any:
        user = _CALLER.get()
        role: Role = user.line_role if isinstance(user, LineUser) else "viewer"
        who = (user.name if user is not None else None) or "anonymous"
        detail = ""
        if parent != self._line_id:
            status = ua.StatusCodes.BadMethodInvalid
        elif args:
            status = ua.StatusCodes.BadTooManyArguments
        elif not may_operate(role):
            status = ua.StatusCodes.BadUserAccessDenied
        else:
            status, detail = await self._forward(cmd, who)
        result = ua.StatusCode(ua.UInt32(status))
        log = self.log.info if result.is_good() else self.log.warning
        log("opcua command", user=who, role=role, command=cmd.value, result=result.name, detail=detail or None)
        return [] if result.is_good() else result

    async def _forward(self, cmd: Command, who: str) -> tuple[int, str]:
        loop = self._service_loop
        if loop is None or loop.is_closed():
            return ua.StatusCodes.BadServerHalted, "the line service is not running"
        coro = self._command(cmd, who)
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the service loop closed meanwhile
            coro.close()
            return ua.StatusCodes.BadServerHalted, "the line service is not running"
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), COMMAND_TIMEOUT_S)
        except InvalidState as exc:
            return ua.StatusCodes.BadInvalidState, str(exc)
        except TimeoutError:
            fut.cancel()
            return ua.StatusCodes.BadTimeout, f"the line service did not answer within {COMMAND_TIMEOUT_S} s"
        except Exception as exc:
            self.log.exception("opcua command failed", command=cmd.value, user=who)
            return ua.StatusCodes.BadInternalError, f"{type(exc).__name__}: {exc}"
        return ua.StatusCodes.Good, ""


_UNSET = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _base_event(source: ua.NodeId) -> BaseEvent:
    return BaseEvent(sourcenode=source)
