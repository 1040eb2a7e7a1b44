"""What the line's OPC UA server adds to asyncua's security, and the asyncua internals it takes for that.

Security (docs/opcua-server.md): Basic256Sha256 Sign and SignAndEncrypt endpoints (None only when
configured), client certificates must be in the trust folder, users from the config with argon2
hashes; viewers read, operators and technicians may also call the PackML methods.

This is the one module that subclasses or reaches into asyncua's server internals (InternalServer,
InternalSession, their attributes and call order, the TrustStore's logger name): it is written
against asyncua 2.1 (the project pins >=2.1,<2.2) and is what to re-check on an asyncua upgrade.
tests/test_opcua_server.py shows each hole the session and internal server close. process.py uses
only internal_server(), configure_security() and current_caller(), so the internals stay here.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography import x509

from sorter.config import OpcUaServerConfig, Role, UserConfig
from sorter.north.users import authenticate


@dataclass
class LineUser(User):
    """asyncua's session user plus the line's role (asyncua itself only knows Admin/User/Anonymous)."""

    line_role: Role = "viewer"


# The user of the session whose Call request is being served. asyncua (2.1) hands a method handler only
# the object id and the arguments, not the session; _LineSession.call sets this around the call, and the
# handler, a coroutine awaited in the same task (MethodService._run_method), reads it (current_caller).
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
        # startswith: a client may send its certificate chain, leaf first, in CreateSession
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
    """The internal server is where asyncua makes sessions and finds one for a reconnecting client: the hooks."""

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


def current_caller() -> tuple[str, Role]:
    """The user name ("anonymous" if none) and line role of the session whose Call request is being served.

    Only meaningful inside a method handler awaited by asyncua in the request's task (see _CALLER).
    """
    user = _CALLER.get()
    role: Role = user.line_role if isinstance(user, LineUser) else "viewer"
    return (user.name if user is not None else None) or "anonymous", role


def internal_server(cfg: OpcUaServerConfig, users: list[UserConfig], log: Any) -> InternalServer:
    """asyncua's internal server with the line's sessions, users and connection limits, for Server(iserver=...)."""
    # the TrustStore logs every refused certificate as an exception with a traceback; _TrustValidator
    # logs one structured line instead
    logging.getLogger("asyncuagds.validate").setLevel(logging.CRITICAL)

    iserver = _LineInternalServer(_Users(users, cfg.allow_anonymous, log), cfg.allow_none_security)
    # a line server has a handful of clients: tighter than asyncua's defaults, so that a misbehaving
    # client cannot pile up connections or subscriptions in the server process
    iserver.max_connections = 64
    iserver.max_subscriptions = 256
    iserver.max_pending_activation_seconds = 10.0
    iserver.allow_remote_admin = False
    return iserver


def configure_security(server: Server, cfg: OpcUaServerConfig, log: Any) -> None:
    """The endpoints' security policies, the accepted identity tokens and the client certificate check."""
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
    server.set_certificate_validator(_TrustValidator(Path(cfg.trust_dir), log))
