"""The virtual PLC's OPC UA server (asyncua 2.1), beside its Modbus TCP server.

It serves the state of one VirtualPlc, whose images stay the only truth, so
Modbus and OPC UA clients see the same PLC at the same time:
- EncoderCount is read through a value callback: a Read gets the count at that
  moment, like the Modbus encoder registers. Being never written, it gives a
  subscription only its initial value; poll it with Read.
- the other variables are written from the PLC's scan, and only when they
  change, so subscriptions are notified within a scan or two;
- Heartbeat and Command writes land in the PLC's holding-register images
  (hr_heartbeat, hr_command): the watchdog and the command register behave the
  same for both protocols;
- ScheduleEject hands a command over directly under the mailbox's sequence
  rules (VirtualPlc.schedule_eject); SetValve is a coil write
  (VirtualPlc.set_valve).
Method callbacks are coroutines so asyncua runs them on the event loop, never
on its thread pool concurrently with the scan.

set_reachable(False/True) restarts the OPC UA stack on the same port: every
connection and session is dropped, clients must create new sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import argon2
import structlog
from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509

from sim.config import SimPlcOpcUaConfig
from sim.plc import VirtualPlc
from sorter.config import PlcOpcUaConfig

DEFAULT_PORT = 4840
SPEED_GATE_S = 0.1
APPLICATION_URI = "urn:magnet-sorter:sim:plc"
_VT = ua.VariantType


@dataclass(frozen=True, slots=True)
class _Var:
    name: str  # PlcNodeNames field
    vtype: ua.VariantType
    writable: bool = False  # by clients (Heartbeat, Command)


# published from the scan, in this order (EncoderCount is served apart, on read)
_VARS = (
    _Var("belt_speed", _VT.Float),
    _Var("status", _VT.UInt16),
    _Var("eject_queue_free", _VT.UInt16),
    _Var("ejects_done", _VT.UInt32),
    _Var("ejects_late", _VT.UInt32),
    _Var("last_seq_accepted", _VT.UInt16),
    _Var("heartbeat", _VT.UInt16, writable=True),
    _Var("command", _VT.UInt16, writable=True),
    _Var("chute_counts", _VT.UInt32),  # an array, one per bank (optional on a plant's PLC)
)
_HEARTBEAT = next(i for i, v in enumerate(_VARS) if v.name == "heartbeat")

_SCHEDULE_ARGS = (
    ("Seq", _VT.UInt16, "sequence number: the next after LastSeqAccepted (65535 -> 1, 0 skipped)"),
    ("Bank", _VT.UInt16, "valve bank, 0 = first row downstream"),
    ("ValveMask", _VT.UInt32, "bit v = valve v of the bank"),
    ("OpenAt", _VT.UInt32, "32-bit encoder count at which the valves open"),
    ("OpenFor", _VT.UInt16, "counts the valves stay open"),
)
_VALVE_ARGS = (
    ("Bank", _VT.UInt16, "valve bank"),
    ("Valve", _VT.UInt16, "valve in the bank, 0..31"),
    ("On", _VT.Boolean, "switch it on (true) or off"),
)
_ACCEPTED = (("Accepted", _VT.Boolean, "false: refused, nothing changed"),)


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _argument(name: str, vtype: ua.VariantType, doc: str) -> ua.Argument:
    return ua.Argument(
        Name=name, DataType=ua.NodeId(ua.Int32(vtype.value)), ValueRank=-1, Description=ua.LocalizedText(doc)
    )


def _check_args(args: tuple[Any, ...], spec: tuple[tuple[str, ua.VariantType, str], ...]) -> Any:
    """The arguments' plain values, or the CallMethodResult/StatusCode refusing the call.

    asyncua does not check method arguments against their declaration; a wrong variant type is a
    client bug, answered BadInvalidArgument with BadTypeMismatch on the offending arguments.
    """
    if len(args) < len(spec):
        return _status(ua.StatusCodes.BadArgumentsMissing)
    if len(args) > len(spec):
        return _status(ua.StatusCodes.BadTooManyArguments)
    results = [
        _status(
            ua.StatusCodes.Good if isinstance(a, ua.Variant) and a.VariantType == vt else ua.StatusCodes.BadTypeMismatch
        )
        for a, (_, vt, _) in zip(args, spec, strict=True)
    ]
    if any(not r.is_good() for r in results):
        return ua.CallMethodResult(StatusCode=_status(ua.StatusCodes.BadInvalidArgument), InputArgumentResults=results)
    return [a.Value for a in args]


class _Users:
    """asyncua user manager: anonymous only if allowed; a user name only with the configured password.

    With a trust store, a session is only activated on a channel whose peer certificate it trusts:
    asyncua accepts a security-None channel even when it offers no None endpoint (its fallback when
    no policy matches), and such a channel has no certificate, so the validator never sees one.

    asyncua asks synchronously, on the event loop, while activating a session, so an argon2
    verification (~0.1 s) stalls the PLC scan; the last verified password is remembered (as a
    digest) so that a client reconnecting after a fault does not pay it again.
    """

    def __init__(
        self, anonymous: bool, username: str | None, password_hash: str | None, trust: TrustStore | None = None
    ) -> None:
        self.anonymous = anonymous
        self.username = username
        self.password_hash = password_hash
        self.trust = trust
        self._hasher = argon2.PasswordHasher()
        self._verified: bytes | None = None

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if self.trust is not None and not (
            certificate and self.trust.validate(x509.load_der_x509_certificate(certificate))
        ):
            return None
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        if self.username is None or self.password_hash is None:
            return None
        if not hmac.compare_digest(username.encode(), self.username.encode()):
            return None
        digest = hashlib.sha256((password or "").encode()).digest()
        if self._verified is None or not hmac.compare_digest(digest, self._verified):
            try:
                self._hasher.verify(self.password_hash, password or "")
            except (argon2.exceptions.Argon2Error, argon2.exceptions.InvalidHashError):
                return None
            self._verified = digest
        return User(role=UserRole.User, name=username)


def _application_uri(cert: x509.Certificate) -> str:
    """The URI in the certificate's subject alternative name: an OPC UA server's application URI must match it."""
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            return uris[0]
    return APPLICATION_URI


class PlcOpcUaServer:
    """Serves a VirtualPlc over OPC UA on `opcua.endpoint`'s host and port (docs/simulator.md).

    Port 0 in the endpoint binds a free port (see `port`); the address space is built once, in start().
    """

    def __init__(self, plc: VirtualPlc, opcua: PlcOpcUaConfig, sim: SimPlcOpcUaConfig, *, log: Any = None) -> None:
        url = urlparse(opcua.endpoint)
        if url.scheme != "opc.tcp" or not url.hostname:
            raise ValueError(f"plc.opcua.endpoint must be opc.tcp://host:port, not {opcua.endpoint!r}")
        if sim.security == "sign_encrypt":
            missing = [
                k
                for k in ("certificate", "private_key", "trust_dir", "username", "password_hash")
                if getattr(sim, k) is None
            ]
            if missing:
                raise ValueError(f"simulator.plc_opcua.security sign_encrypt needs {', '.join(missing)}")
        if sim.password_hash is not None:
            try:
                argon2.extract_parameters(sim.password_hash)
            except argon2.exceptions.InvalidHashError as exc:
                raise ValueError("simulator.plc_opcua.password_hash is not an argon2 hash") from exc
        self.plc = plc
        self.cfg = opcua
        self.sim = sim
        self.log = log or structlog.get_logger("sim.plc_opcua")
        self._host = url.hostname
        self._port = url.port if url.port is not None else DEFAULT_PORT
        self._server: Server | None = None
        self._trust: TrustStore | None = None
        self._reachable = False
        self._encoder_id: ua.NodeId | None = None
        self._ids: list[ua.NodeId] = []  # per _VARS
        self._shown: list[Any] = []  # the values the nodes hold, per _VARS
        self._speed = (0.0, -1.0)  # (mm/s, when measured)
        self._pub_task: asyncio.Task[None] | None = None

    # --- lifecycle ---
    @property
    def port(self) -> int:
        """The TCP port served (the real one when the endpoint says port 0)."""
        return self._port

    @property
    def endpoint(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host  # an IPv6 address
        return f"opc.tcp://{host}:{self._port}"

    @property
    def reachable(self) -> bool:
        return self._reachable

    async def start(self) -> None:
        if self._server is not None:
            return
        secure = self.sim.security == "sign_encrypt"
        if secure:
            assert self.sim.trust_dir is not None  # checked in __init__
            self._trust = TrustStore([Path(self.sim.trust_dir)], [])
            await self._trust.load()
        users = _Users(not secure, self.sim.username, self.sim.password_hash, self._trust)
        server = Server(user_manager=users)  # type: ignore[arg-type]  # asyncua's UserManager is duck-typed
        await server.init()  # loads the standard address space (~1 s, on a worker thread)
        server.set_endpoint(self.endpoint)
        server.set_server_name("magnet-sorter virtual PLC")
        if secure:
            assert self.sim.certificate and self.sim.private_key and self._trust  # checked in __init__
            await server.load_certificate(str(self.sim.certificate))
            await server.load_private_key(str(self.sim.private_key))
            await server.set_application_uri(_application_uri(server.iserver.certificate))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.UserNameIdentityToken])
            # trust decides; the client's application URI and key usages are not checked (a simulator)
            options = (
                CertificateValidatorOptions.TIME_RANGE
                | CertificateValidatorOptions.TRUSTED
                | CertificateValidatorOptions.REVOKED
                | CertificateValidatorOptions.PEER_CLIENT
            )
            server.set_certificate_validator(CertificateValidator(options, self._trust))  # type: ignore[arg-type]
        else:
            await server.set_application_uri(APPLICATION_URI)
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            tokens: list[type] = [ua.AnonymousIdentityToken]
            if self.sim.username and self.sim.password_hash:
                tokens.append(ua.UserNameIdentityToken)
            server.set_identity_tokens(tokens)
        await self._build(server)
        try:
            await server.start()
        except OSError as exc:
            raise OSError(f"virtual PLC cannot serve OPC UA on {self.endpoint} (port in use?)") from exc
        self._server = server
        self._port = server.bserver.port if server.bserver else self._port
        self._reachable = True
        self.plc.listeners.append(self._on_scan)
        self.log.info("virtual plc opc ua listening", endpoint=self.endpoint, security=self.sim.security)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with contextlib.suppress(ValueError):
            self.plc.listeners.remove(self._on_scan)
        if self._pub_task is not None:
            self._pub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pub_task
        # the server clock's loop sleeps a second between updates; asyncua's stop would wait for it
        clock = server.iserver.time_task
        if clock is not None:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
            server.iserver.time_task = None
        if self._reachable:
            await server.stop()
        else:
            await server.iserver.stop()
        await self._close_sessions(server)
        self._reachable = False

    async def set_reachable(self, on: bool) -> None:
        """Fault injection: stop the OPC UA stack (connections and sessions dropped; the PLC keeps
        scanning and serving Modbus) or start it again on the same port."""
        server = self._server
        if server is None or server.bserver is None:
            raise RuntimeError("the OPC UA server is not started")
        if on and not self._reachable:
            if self._trust is not None:
                await self._trust.load()  # a restarted PLC rereads its trust list
            try:
                await server.bserver.start()
            except OSError as exc:
                raise OSError(f"virtual PLC cannot serve OPC UA on {self.endpoint} (port in use?)") from exc
            self._reachable = True
            self.log.info("virtual plc opc ua listening", endpoint=self.endpoint)
        elif not on and self._reachable:
            self._reachable = False
            await server.bserver.stop()
            await self._close_sessions(server)
            self.log.info("virtual plc opc ua unreachable", endpoint=self.endpoint)

    @staticmethod
    async def _close_sessions(server: Server) -> None:
        # asyncua keeps a session with subscriptions alive after its connection drops (so that a client can
        # reattach); a restarted PLC has forgotten every session, so close them. No public API lists them.
        sessions = getattr(server.iserver, "_external_sessions", {})
        for session in list(sessions.values()):
            await session.close_session(True)

    # --- address space ---
    async def _build(self, server: Server) -> None:
        cfg, names = self.cfg, self.cfg.nodes
        idx = await server.register_namespace(cfg.namespace)
        parent = server.nodes.objects
        path = ""
        for name in cfg.line_path:
            path = f"{path}.{name}" if path else name
            parent = await parent.add_object(ua.NodeId(ua.String(path), ua.Int16(idx)), ua.QualifiedName(name, idx))

        def nid(name: str) -> ua.NodeId:
            return ua.NodeId(ua.String(f"{path}.{name}"), ua.Int16(idx))

        name = names.encoder_count
        await parent.add_variable(nid(name), ua.QualifiedName(name, idx), 0, _VT.UInt32)
        self._encoder_id = nid(name)
        server.set_attribute_value_callback(self._encoder_id, self._read_encoder)

        self._shown = self._snapshot()
        self._ids = []
        for i, var in enumerate(_VARS):
            name = getattr(names, var.name)
            node = await parent.add_variable(nid(name), ua.QualifiedName(name, idx), self._shown[i], var.vtype)
            self._ids.append(node.nodeid)
            if var.writable:
                await node.set_writable()
                server.set_attribute_value_setter(node.nodeid, self._client_write(i))

        for name, func, inputs in (
            (names.schedule_eject, self._schedule_eject, _SCHEDULE_ARGS),
            (names.set_valve, self._set_valve, _VALVE_ARGS),
        ):
            await parent.add_method(
                nid(name),
                ua.QualifiedName(name, idx),
                func,
                [_argument(*a) for a in inputs],
                [_argument(*a) for a in _ACCEPTED],
            )

    def _read_encoder(self, nodeid: ua.NodeId, attr: ua.AttributeIds) -> ua.DataValue:
        now = ua.DateTime.now(UTC)
        return ua.DataValue(ua.Variant(self.plc.belt.count32(), _VT.UInt32), SourceTimestamp=now, ServerTimestamp=now)

    def _client_write(self, i: int) -> Callable[[Any, ua.AttributeIds, ua.DataValue], None]:
        """asyncua value setter of Heartbeat/Command: the write goes to the PLC's holding-register image."""

        def setter(node: Any, attr: ua.AttributeIds, dv: ua.DataValue) -> None:
            node.attributes[attr].value = dv
            value = dv.Value.Value if dv.Value is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                self._shown[i] = value
                if i == _HEARTBEAT:
                    self.plc.heartbeat = value
                else:  # the only other writable one
                    self.plc.command = value

        return setter

    # --- publishing the scan's changes ---
    def _snapshot(self) -> list[Any]:
        p = self.plc
        return [
            self._belt_speed(),
            p.status_word(),
            p.queue_free,
            p.done_since_boot & 0xFFFFFFFF,
            p.late_since_boot & 0xFFFFFFFF,
            p.last_seq,
            p.heartbeat,
            p.command,
            [n & 0xFFFFFFFF for n in p.chutes_since_boot],
        ]

    def _belt_speed(self) -> float:
        # a PLC measures speed over a gate time (here 100 ms), not per scan: a drifting belt would
        # otherwise change this value, and notify every subscriber, 500 times a second
        now = time.monotonic()
        if now - self._speed[1] >= SPEED_GATE_S:
            self._speed = (round(self.plc.belt.speed_mm_s(), 1), now)
        return self._speed[0]

    def _on_scan(self) -> None:
        # runs in every scan: compare only; the writes go to a task (they are coroutines in asyncua)
        if self._pub_task is None and self._snapshot() != self._shown:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a scan driven by hand outside the loop: the next scan in it publishes
                return
            self._pub_task = loop.create_task(self._publish(), name="plc-opcua-publish")

    async def _publish(self) -> None:
        try:
            server = self._server
            while server is not None:
                snap = self._snapshot()
                changed = [i for i, (v, old) in enumerate(zip(snap, self._shown, strict=True)) if v != old]
                if not changed:
                    return
                now = ua.DateTime.now(UTC)
                for i in changed:
                    self._shown[i] = snap[i]
                    dv = ua.DataValue(ua.Variant(snap[i], _VARS[i].vtype), SourceTimestamp=now, ServerTimestamp=now)
                    await server.write_attribute_value(self._ids[i], dv)
        except Exception:
            self.log.exception("virtual plc opc ua: publishing failed")
        finally:
            self._pub_task = None

    # --- methods ---
    async def _schedule_eject(self, parent: ua.NodeId, *args: Any) -> Any:
        vals = _check_args(args, _SCHEDULE_ARGS)
        if not isinstance(vals, list):
            return vals
        seq, bank, mask, open_at, open_for = vals
        ok = self.plc.schedule_eject(seq, bank, mask, open_at, open_for)
        return [ua.Variant(ok, _VT.Boolean)]

    async def _set_valve(self, parent: ua.NodeId, *args: Any) -> Any:
        vals = _check_args(args, _VALVE_ARGS)
        if not isinstance(vals, list):
            return vals
        bank, valve, on = vals
        try:
            ok = self.plc.set_valve(bank, valve, on)
        except ValueError:
            return _status(ua.StatusCodes.BadOutOfRange)
        return [ua.Variant(ok, _VT.Boolean)]
