"""The line's own OPC UA server: state, counts and alarms for SCADA/MES, PackML commands from them.

The server runs in its own process (multiprocessing, "spawn"), at a lower OS priority (nice +10),
with its own asyncio loop and its own heap: a client that floods reads, holds many subscriptions
or sends garbage costs that process's CPU time - which the OS gives it only when the sorting loop
does not need it - and never holds the service's GIL. asyncua's address space (~400 000 objects)
lives there too, not in the service's heap. The two processes meet at two pipes only:

* parent -> child: snapshots from `publish(snapshot)`, the results of PackML commands, "stop".
  The service loop never writes to the pipe itself: `publish` puts the snapshot in `_Outbox` (a
  lock held for microseconds) and a sender thread does the (possibly blocking) write. While the
  child does not read (busy, stopped), snapshots pile up in the outbox coalesced: one that shows
  the same state and alarms as the one before it replaces it (counts, rate, purity: only the
  latest matters), so every state and every alarm list still reaches the server in order (alarm
  events for an alarm that came and went meanwhile) and the outbox stays small.
* child -> parent: "ready"/"failed" at start, then PackML command requests (id, command, user).
  The parent reads them with `loop.add_reader` on the pipe (never a blocking read on the service
  loop), runs `command(Command(name), user)` there and sends the result back; the child maps it
  to the method's status code (5 s without an answer: BadTimeout).

If the process dies, the parent sees the pipe's end-of-file, logs `ALARM OPC UA server process
died` once and `listening` turns False; the line keeps sorting, `publish` does nothing.

Security (docs/opcua-server.md): Basic256Sha256 Sign and SignAndEncrypt endpoints (None only when
configured), client certificates must be in the trust folder, users from the config with argon2
hashes; viewers read, operators and technicians may also call the PackML methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
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
from sorter.core.linestate import LineSnapshot
from sorter.core.packml import Command, InvalidState
from sorter.logs import setup_logging
from sorter.north.opcua.pki import PkiError, application_uri, load_certificate
from sorter.north.users import authenticate, may_operate

CommandFn = Callable[[Command, str], Coroutine[Any, Any, object]]  # the result is not used

DEFAULT_APPLICATION_URI = "urn:magnet-sorter:line-server"
COMMAND_TIMEOUT_S = 5.0  # a PackML command only starts a transition; longer means the service loop is stuck
ALARM_SEVERITY = 700
CLEARED_SEVERITY = 100
CHILD_NICE = 10  # the server process's niceness above the service's: SCADA gets the CPU the line leaves
START_TIMEOUT_S = 60.0  # spawn + imports + address space take a few s; far longer means it hangs
STOP_TIMEOUT_S = 10.0  # to close the sessions and the socket; then the process is killed
_PENDING_MAX = 1000  # state/alarm changes waiting for the server process; past this the oldest go (it is stuck)

# what goes through the pipes (tuples of plain values, pickled):
#   parent -> child, a list per write: ("snap", LineSnapshot), ("result", id, kind, detail), ("stop",)
#   child -> parent, one per write: ("ready", url), ("failed", OpcUaServerError), ("cmd", id, command, user)
# result kinds: "ok", "invalid_state", "timeout", "error", "halted"
_Msg = tuple[Any, ...]


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
        # called in the server process; the argon2 verification (tens of ms) holds up only that process
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


class LineOpcUaServer:
    """The line's OPC UA server, in its own process; see the module docstring. Used from the service loop."""

    # tests: the server process writes its log as JSON lines to this file instead of stderr
    _child_log_file: Path | None = None

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
        self._url = cfg.endpoint
        self._outbox = _Outbox()  # snapshots published before start() wait here
        self._proc: BaseProcess | None = None
        self._from_child: Connection | None = None
        self._sender: threading.Thread | None = None
        self._service_loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[str] | None = None
        self._listening = False
        self._stopping = False
        self._commands: set[asyncio.Task[None]] = set()

    @property
    def endpoint_url(self) -> str:
        """The URL clients connect to: the configured one with the port really bound (config port 0 picks one)."""
        return self._url

    @property
    def listening(self) -> bool:
        """True from a successful start() until stop() or the server process's death."""
        return self._listening

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the server process and wait until it listens; OpcUaServerError if it cannot."""
        if self._proc is not None:
            raise RuntimeError("the OPC UA server is already running")
        loop = self._service_loop = asyncio.get_running_loop()
        self._stopping = False
        level, json_logs, context = _log_settings(self.log)
        spec = _ChildSpec(
            cfg=self.cfg,
            users=self.users,
            fractions=self.fractions,
            log_level=level,
            json_logs=json_logs,
            log_context=context,
            log_file=str(self._child_log_file) if self._child_log_file is not None else None,
        )
        # spawn, not fork: the service has threads (onnxruntime, cameras) whose locks a fork would copy held
        ctx = multiprocessing.get_context("spawn")
        child_in, to_child = ctx.Pipe(duplex=False)
        from_child, child_out = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(spec, child_in, child_out), name="opcua-server", daemon=True)
        try:
            proc.start()
        except BaseException:
            to_child.close()
            from_child.close()
            raise
        finally:
            # the child has its own copies now; closing ours lets each side see the other's end-of-file
            child_in.close()
            child_out.close()
        self._proc, self._from_child = proc, from_child
        self._ready = loop.create_future()
        loop.add_reader(from_child.fileno(), self._on_child_message)
        self._sender = threading.Thread(
            target=_send_loop, args=(to_child, self._outbox, self.log), name="opcua-sender", daemon=True
        )
        self._sender.start()
        try:
            url = await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise OpcUaServerError(f"the OPC UA server process did not start within {START_TIMEOUT_S:.0f} s") from None
        except BaseException:
            await self.stop()
            raise
        self._url = url
        self._listening = True
        self.log.info(
            "opcua server listening",
            endpoint=self.endpoint_url,
            none_security=self.cfg.allow_none_security,
            anonymous=self.cfg.allow_anonymous,
            pid=proc.pid,
        )

    async def stop(self) -> None:
        """Close all sessions and the listening socket, and end the server process (killed if it hangs)."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        self._listening = False
        self._outbox.put(("stop",))
        self._outbox.close()  # the sender thread writes what is queued, "stop" last, and ends
        self._drop_reader()
        await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
        if proc.exitcode is None:
            self.log.warning("opcua server process did not stop; killing it", pid=proc.pid)
            proc.kill()
            await asyncio.to_thread(proc.join, 5.0)
        if self._sender is not None:  # its write fails at once now that the reading end is gone
            await asyncio.to_thread(self._sender.join, 5.0)
            self._sender = None
        if self._ready is not None and self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # raised by start() already, if any
        self._ready = None
        with contextlib.suppress(ValueError):  # closed already
            proc.close()
        self._proc = None
        self._outbox = _Outbox()  # for a later start(); publish() meanwhile only queues
        self.log.info("opcua server stopped")

    def publish(self, snap: LineSnapshot) -> None:
        """Show a new snapshot: values that changed, alarm events. Never blocks, never raises (see _Outbox)."""
        try:
            self._outbox.add_snapshot(snap)
        except Exception:  # the line must go on whatever happens here
            with contextlib.suppress(Exception):
                self.log.exception("opcua publish failed")

    # --- the child's messages, on the service loop ---

    def _on_child_message(self, *_: Any) -> None:
        conn = self._from_child
        if conn is None:
            return
        try:
            while conn.poll():  # only whole, small messages come this way: recv() returns at once
                self._handle(conn.recv())
        except (EOFError, OSError):
            self._child_gone()
        except Exception:
            self.log.exception("opcua server message not understood")

    def _handle(self, msg: _Msg) -> None:
        kind = msg[0]
        if kind == "cmd":
            _, req_id, name, user = msg
            task = asyncio.get_running_loop().create_task(self._run_command(req_id, name, user))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)
        elif kind in ("ready", "failed") and self._ready is not None and not self._ready.done():
            if kind == "ready":
                self._ready.set_result(str(msg[1]))
            else:
                exc = msg[1]
                self._ready.set_exception(exc if isinstance(exc, OpcUaServerError) else OpcUaServerError(str(exc)))

    async def _run_command(self, req_id: int, name: str, user: str) -> None:
        kind, detail = "ok", ""
        try:
            cmd = Command(name)
            await asyncio.wait_for(self._command(cmd, user), COMMAND_TIMEOUT_S)
        except InvalidState as exc:
            kind, detail = "invalid_state", str(exc)
        except TimeoutError:
            kind, detail = "timeout", f"the line service did not answer within {COMMAND_TIMEOUT_S} s"
        except Exception as exc:
            self.log.exception("opcua command failed", command=name, user=user)
            kind, detail = "error", f"{type(exc).__name__}: {exc}"
        self._outbox.put(("result", req_id, kind, detail))

    def _drop_reader(self) -> None:
        conn, self._from_child = self._from_child, None
        if conn is None:
            return
        loop = self._service_loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(conn.fileno())
        conn.close()

    def _child_gone(self) -> None:
        """The child's pipe reached end-of-file: the server process has ended (or is ending)."""
        was_listening = self._listening
        self._listening = False
        self._outbox.close()  # publish() is a no-op from now on
        self._drop_reader()
        proc = self._proc
        if self._ready is not None and not self._ready.done():
            code = proc.exitcode if proc is not None else None
            self._ready.set_exception(
                OpcUaServerError(f"the OPC UA server process ended while starting (exit code {code})")
            )
        if was_listening and not self._stopping and proc is not None:
            task = asyncio.get_running_loop().create_task(self._report_death(proc))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _report_death(self, proc: BaseProcess) -> None:
        # reap it (exitcode polls waitpid without blocking) and say how it ended, once
        pid = proc.pid
        for _ in range(50):
            if self._proc is not proc or proc.exitcode is not None:
                break
            await asyncio.sleep(0.02)
        code = None
        with contextlib.suppress(ValueError):  # stop() closed it meanwhile
            code = proc.exitcode
        self.log.error(
            "ALARM OPC UA server process died",
            pid=pid,
            exitcode=code,
            action="SCADA cannot see or command the line; restart the service to bring the server back",
        )


class _Outbox:
    """What the service has for the server process, until the sender thread writes it to the pipe.

    Snapshots are coalesced (_coalesce): while the pipe is full they collapse to one per state/alarm
    change. Results and "stop" are kept as they are. Once closed (stop, or the process died) it takes nothing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._snaps: deque[LineSnapshot] = deque(maxlen=_PENDING_MAX)
        self._msgs: list[_Msg] = []
        self._closed = False

    def add_snapshot(self, snap: LineSnapshot) -> None:
        with self._cond:
            if not self._closed:
                _coalesce(self._snaps, snap)
                self._cond.notify()

    def put(self, msg: _Msg) -> None:
        with self._cond:
            if not self._closed:
                self._msgs.append(msg)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def take(self) -> tuple[list[_Msg], bool]:
        """Wait for something to send; returns it all and whether the outbox is closed (nothing more comes)."""
        with self._cond:
            while not (self._snaps or self._msgs or self._closed):
                self._cond.wait()
            batch: list[_Msg] = [("snap", s) for s in self._snaps]
            batch += self._msgs
            self._snaps.clear()
            self._msgs = []
            return batch, self._closed


def _coalesce(pending: deque[LineSnapshot], snap: LineSnapshot) -> None:
    """Queue a snapshot; it replaces the last queued one if that shows the same state and alarms.

    Values are written only as they are at the latest snapshot anyway; what must not be lost is a state
    or alarm list that lasted a single snapshot (subscriptions on State, alarm events).
    """
    if pending and pending[-1].state == snap.state and pending[-1].alarms == snap.alarms:
        pending[-1] = snap
    else:
        pending.append(snap)  # a full deque drops the oldest


def _send_loop(conn: Connection, outbox: _Outbox, log: Any) -> None:
    """The sender thread: outbox -> pipe. Only this thread ever blocks on a full pipe, never the service loop."""
    try:
        while True:
            batch, closed = outbox.take()
            if batch:
                try:
                    data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:  # one bad snapshot must not end publishing
                    log.exception("opcua publish failed")
                else:
                    conn.send_bytes(data)
            if closed:
                return
    except OSError:  # the server process is gone: the parent sees it on the other pipe
        outbox.close()
    finally:
        conn.close()


def _log_settings(log: Any) -> tuple[str, bool, dict[str, Any]]:
    """The service's structlog level and format, and the logger's bound context, for the server process.

    A spawned process starts with structlog unconfigured; it configures itself the same way
    (sorter.logs.setup_logging) and binds the same context (e.g. part=opcua), so its lines look like the
    service's own on the same stderr.
    """
    config = structlog.get_config()
    level = "info"
    get_level = getattr(config.get("wrapper_class"), "get_effective_level", None)
    if callable(get_level):
        with contextlib.suppress(Exception):
            name = str(logging.getLevelName(int(get_level(None))))
            if name in logging.getLevelNamesMapping():
                level = name.lower()
    json_logs = any(isinstance(p, structlog.processors.JSONRenderer) for p in config.get("processors", []))
    try:
        bound = dict(structlog.get_context(log))
    except Exception:  # not a structlog logger
        bound = {}
    context = {k: v for k, v in bound.items() if v is None or isinstance(v, str | int | float | bool)}
    return level, json_logs, context


# --- the server process ---


@dataclass(frozen=True)
class _ChildSpec:
    cfg: OpcUaServerConfig
    users: list[UserConfig]
    fractions: list[str]
    log_level: str = "info"
    json_logs: bool = False
    log_context: dict[str, Any] = field(default_factory=dict)
    log_file: str | None = None


def _child_main(spec: _ChildSpec, inbox: Connection, outbox: Connection) -> None:
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

    def __init__(self, spec: _ChildSpec, inbox: Connection, outbox: Connection, log: Any) -> None:
        self.cfg = spec.cfg
        self.users = list(spec.users)
        self.fractions = list(spec.fractions)
        self.log = log
        self._inbox = inbox
        self._outbox = outbox
        self._pending: deque[LineSnapshot] = deque(maxlen=_PENDING_MAX)
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
                        _coalesce(self._pending, msg[1])
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
        # the snapshots in order (coalesced as _coalesce says): a state or alarm that lasted one snapshot is
        # still seen by subscriptions and raises its events; unchanged values cost a comparison only
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

        # the TrustStore logs every refused certificate as an exception with a traceback; _TrustValidator
        # logs one structured line instead
        logging.getLogger("asyncuagds.validate").setLevel(logging.CRITICAL)

        iserver = _LineInternalServer(_Users(self.users, cfg.allow_anonymous, self.log), cfg.allow_none_security)
        # a line server has a handful of clients: tighter than asyncua's defaults, so that a misbehaving
        # client cannot pile up connections or subscriptions in the server process
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


_UNSET = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _base_event(source: ua.NodeId) -> BaseEvent:
    return BaseEvent(sourcenode=source)
