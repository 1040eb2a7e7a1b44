"""What the line's OPC UA server adds to asyncua's security, and the asyncua internals it takes for that.

Security (docs/opcua-server.md): Basic256Sha256 Sign and SignAndEncrypt endpoints (None only when
configured), client certificates must be in the trust folder (an unknown one is refused and kept in the
rejected folder for an administrator to trust), users from the config with argon2 hashes; viewers read,
operators and technicians may also call the PackML methods.

This is the one module that subclasses or reaches into asyncua's server internals (InternalServer,
InternalSession, UaProcessor, TrustStore, their attributes and call order, the TrustStore's logger name):
it is written against asyncua 2.1 (the project pins >=2.1,<2.2) and is what to re-check on an asyncua
upgrade. tests/test_opcua_server.py shows each hole the session and internal server close. process.py uses
only internal_server(), configure_security() and current_caller(), so the internals stay here.

Every request of a client is served inside _LineProcessor._process_message: an exception there that is not
already an OPC UA status (asyncua's default: BadInternalError with a traceback in its own log) becomes a
logged, specific status (_unexpected_status), so that nothing a client does is answered "internal error".
"""

from __future__ import annotations

import contextvars
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import NotEnoughData, ServiceError
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server import binary_server_asyncio
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager
from cryptography import exceptions as crypto_exceptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import Store

from sorter.config import OpcUaServerConfig, Role, UserConfig
from sorter.north.opcua.pki import (
    CERT_SUFFIXES,
    PkiError,
    leaf_der,
    load_certificate,
    store_rejected,
    subject_text,
    thumbprint,
)
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


@dataclass(frozen=True)
class _Request:
    """Who sent the request being served and on which secure channel: set by _LineProcessor around each request,
    read by the session (CreateSession's certificate check) and the logs. asyncua hands the session neither."""

    peer: str  # host:port of the client
    secure: bool  # the secure channel is signed (Sign / SignAndEncrypt), not the None policy


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("opcua_request", default=None)


def _peer() -> str:
    request = _REQUEST.get()
    return request.peer if request is not None else "?"


class _LineSession(InternalSession):
    """An asyncua session that checks client certificates, tells method handlers its user and is bound to its
    secure channel.

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
        # The client certificate is checked here rather than by asyncua's certificate_validator hook (left
        # unset), because the check depends on the secure channel, which asyncua does not hand the validator:
        # on a None channel the certificate proves nothing (no key signed anything with it) and is not checked
        # against the trust list; clients (UaExpert, Ignition, Kepware, node-opcua) send one there too.
        cert = params.ClientCertificate or None
        request = _REQUEST.get()
        if cert is not None and (request is None or request.secure):  # no request context: checked (fail closed)
            iserver = self.iserver
            assert isinstance(iserver, _LineInternalServer)
            await iserver.client_certificates.check(cert, params.ClientDescription)
        result = await super().create_session(params, sockname)
        self._client_cert = cert
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

    def __init__(self, user_manager: UserManager, cfg: OpcUaServerConfig, log: Any) -> None:
        super().__init__(user_manager=user_manager)
        self._allow_none_security = cfg.allow_none_security
        self.client_certificates = _ClientCertificates(Path(cfg.trust_dir), Path(cfg.rejected_path), log)
        self.log = log

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


class _LineProcessor(UaProcessor):
    """asyncua's per-connection request processor, for the line's server: tells the session which peer and
    secure channel a request came on (_REQUEST), and turns an unexpected exception while serving a request
    into a logged, specific status instead of asyncua's BadInternalError.

    asyncua makes one per connection from the name UaProcessor in its binary_server_asyncio module, with no
    per-server hook: internal_server() points that name here (in the server process). Connections of any
    other asyncua server get asyncua's behaviour unchanged.
    """

    async def _process_message(self, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Any) -> Any:
        iserver = self.iserver
        if not isinstance(iserver, _LineInternalServer):
            return await super()._process_message(typeid, requesthdr, seqhdr, body)
        policy = self._connection.security_policy
        request = _Request(peer=_peer_text(self.name), secure=policy.Mode != ua.MessageSecurityMode.None_)
        token = _REQUEST.set(request)
        try:
            return await super()._process_message(typeid, requesthdr, seqhdr, body)
        except (ServiceError, ua.uaerrors.UaStatusCodeError):  # a status already: asyncua answers with it
            raise
        except Exception as exc:
            service = _service_name(typeid)
            status = _unexpected_status(service, exc)
            user = self.session.user if self.session is not None else None
            fields = {
                "service": service,
                "peer": request.peer,
                "user": getattr(user, "name", None) or "anonymous",
                "status": ua.StatusCode(ua.UInt32(status)).name,
                "error": f"{type(exc).__name__}: {exc}"[:300],
            }
            if status in _CLIENT_FAULTS:  # the client sent something wrong: no traceback needed
                iserver.log.warning("opcua request refused", **fields)
            else:  # a bug here: the traceback says where
                iserver.log.exception("opcua request failed", **fields)
            raise ServiceError(status) from exc
        finally:
            _REQUEST.reset(token)


_DECODING_ERRORS = (NotEnoughData, struct.error, UnicodeDecodeError, OverflowError)
_SIGNATURE_ERRORS = (uacrypto.InvalidSignature, crypto_exceptions.InvalidSignature)
_CLIENT_FAULTS = {
    ua.StatusCodes.BadDecodingError,
    ua.StatusCodes.BadApplicationSignatureInvalid,
    ua.StatusCodes.BadServiceUnsupported,
    ua.StatusCodes.BadIdentityTokenInvalid,
}


def _unexpected_status(service: str, exc: Exception) -> int:
    """The status for an exception that escaped serving a request: what the client did wrong where that is
    known, otherwise a status saying which step failed (never BadInternalError)."""
    if isinstance(exc, _SIGNATURE_ERRORS):  # ActivateSession's client signature does not verify
        return ua.StatusCodes.BadApplicationSignatureInvalid
    if isinstance(exc, _DECODING_ERRORS):
        return ua.StatusCodes.BadDecodingError
    if isinstance(exc, NotImplementedError):  # e.g. BrowseNext, asyncua has no continuation points
        return ua.StatusCodes.BadServiceUnsupported
    if service == "ActivateSession":  # the identity token could not be used
        return ua.StatusCodes.BadIdentityTokenInvalid
    if service == "CreateSession":  # fail closed: no session without the checks having run
        return ua.StatusCodes.BadSecurityChecksFailed
    return ua.StatusCodes.BadUnexpectedError


def _service_name(typeid: ua.NodeId) -> str:
    name = ua.ObjectIdNames.get(typeid.Identifier, str(typeid)) if isinstance(typeid.Identifier, int) else ""
    return (name or str(typeid)).removesuffix("_Encoding_DefaultBinary").removesuffix("Request")


def _peer_text(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return str(peername)


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
            self._log.warning("opcua anonymous login refused", peer=_peer())
            return None
        try:
            user = authenticate(self._users, username, password)
        except Exception:  # a refusal (BadUserAccessDenied), never a server error, whatever the client sent
            self._log.exception("opcua login failed", user=_printable(username), peer=_peer())
            return None
        if user is None:
            self._log.warning("opcua login refused", user=_printable(username), peer=_peer())
            return None
        self._log.info("opcua login", user=user.name, role=user.role, peer=_peer())
        # asyncua's role User: read, browse, subscribe, call; never Admin (which may add or delete nodes)
        return LineUser(role=UserRole.User, name=user.name, line_role=user.role)


def _printable(name: str | None, limit: int = 64) -> str:
    """A client-chosen user name, safe for a log line."""
    text = "" if name is None else str(name)
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("..." if name is not None and len(str(name)) > limit else "")


class _TrustFolder(TrustStore):
    """asyncua's TrustStore over the trust folder, tolerant of what a folder on a plant PC holds.

    asyncua's own load_trust fails on an empty folder (`ValueError: can't create an empty store`, which a
    client saw as BadInternalError on CreateSession) and on any unreadable file; here an empty folder trusts
    nobody and an unreadable file is skipped (logged once). A self-signed application certificate in the
    folder is trusted as itself, whatever its basicConstraints (node-opcua's and most vendors' are not CAs,
    which asyncua's chain verification demands of an issuer); a CA-signed one through its CA's certificate.
    """

    def __init__(self, folder: Path, log: Any) -> None:
        super().__init__([folder], [])
        self._folder = folder
        self._log = log
        self._exact: set[bytes] = set()
        self._warned: dict[Path, float] = {}

    async def load_trust(self) -> None:
        certs: list[x509.Certificate] = []
        try:
            files = sorted(p for p in self._folder.iterdir() if p.suffix.lower() in CERT_SUFFIXES and p.is_file())
        except OSError:
            files = []  # no folder: nobody trusted (process.py refuses to start without one)
        for path in files:
            try:
                certs.append(load_certificate(path))
            except PkiError as exc:
                try:
                    mtime = path.stat().st_mtime
                except OSError:  # gone meanwhile
                    mtime = 0.0
                if self._warned.get(path) != mtime:  # once per version of the file, not at every session
                    self._warned[path] = mtime
                    self._log.warning("opcua trusted certificate unreadable, skipped", file=str(path), error=str(exc))
        self._exact = {c.public_bytes(serialization.Encoding.DER) for c in certs}
        self._trust_store = Store(certs) if certs else None

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        if certificate.public_bytes(serialization.Encoding.DER) in self._exact:
            return True
        return super().is_trusted(certificate)  # False when the folder is empty


class _ClientCertificates:
    """The check of a client's application certificate at CreateSession (secure channels only).

    The validity period, the ApplicationUri (must be the certificate's URI subjectAltName), key usages and
    extendedKeyUsage clientAuth (asyncua's CertificateValidator), then trust: the folder is re-read at every
    check so that a technician adds a SCADA client without restarting the line (sessions are created rarely
    and the folder holds a handful of files). A valid but unknown certificate is refused with
    BadCertificateUntrusted and kept in the rejected folder, from where `sorter opcua trust` moves it.
    """

    def __init__(self, trust_dir: Path, rejected_dir: Path, log: Any) -> None:
        self._trust = _TrustFolder(trust_dir, log)
        options = CertificateValidatorOptions.EXT_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
        self._checks = CertificateValidator(options)
        self._rejected_dir = rejected_dir
        self._log = log

    async def check(self, data: bytes, app: ua.ApplicationDescription | None) -> None:
        """Return if the certificate (DER, possibly followed by its chain) is valid and trusted; otherwise log
        the refusal and raise ServiceError with the status for the client."""
        app = app if app is not None else ua.ApplicationDescription()
        who: dict[str, Any] = {
            "peer": _peer(),
            "application_uri": _printable(app.ApplicationUri, 200),
            "application_name": _printable(getattr(app.ApplicationName, "Text", None), 100),
        }
        try:
            cert = x509.load_der_x509_certificate(leaf_der(bytes(data)))
        except (PkiError, ValueError, TypeError) as exc:
            self._refused(ua.StatusCodes.BadCertificateInvalid, who, reason=f"not a DER certificate: {exc}")
            raise ServiceError(ua.StatusCodes.BadCertificateInvalid) from exc
        who |= {"subject": subject_text(cert), "thumbprint": thumbprint(cert)}
        try:
            await self._checks.validate(cert, app)
            await self._trust.load_trust()
            trusted = self._trust.is_trusted(cert)
        except ServiceError as exc:
            self._refused(exc.code, who)
            raise
        except Exception as exc:  # a certificate asyncua or cryptography cannot digest: refused, not an error
            self._refused(ua.StatusCodes.BadCertificateInvalid, who, reason=f"{type(exc).__name__}: {exc}")
            raise ServiceError(ua.StatusCodes.BadCertificateInvalid) from exc
        if not trusted:
            try:
                path, new = store_rejected(bytes(data), self._rejected_dir)
                who |= {"file": str(path), "first_refusal": new}
            except PkiError as exc:
                who |= {"file": None, "store_error": str(exc)}
            self._refused(ua.StatusCodes.BadCertificateUntrusted, who, action="trust it: sorter opcua trust --list")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    def _refused(self, status: int, who: dict[str, Any], **more: Any) -> None:
        name = ua.StatusCode(ua.UInt32(status)).name
        self._log.warning("opcua client certificate refused", status=name, **who, **more)


def current_caller() -> tuple[str, Role]:
    """The user name ("anonymous" if none) and line role of the session whose Call request is being served.

    Only meaningful inside a method handler awaited by asyncua in the request's task (see _CALLER).
    """
    user = _CALLER.get()
    role: Role = user.line_role if isinstance(user, LineUser) else "viewer"
    return (user.name if user is not None else None) or "anonymous", role


def internal_server(cfg: OpcUaServerConfig, users: list[UserConfig], log: Any) -> InternalServer:
    """asyncua's internal server with the line's sessions, users and connection limits, for Server(iserver=...)."""
    # the TrustStore logs every refused certificate as an exception with a traceback; _ClientCertificates
    # logs one structured line instead
    logging.getLogger("asyncuagds.validate").setLevel(logging.CRITICAL)
    # every connection's processor is asyncua's UaProcessor subclassed (see _LineProcessor: no per-server hook)
    binary_server_asyncio.UaProcessor = _LineProcessor  # type: ignore[misc]

    iserver = _LineInternalServer(_Users(users, cfg.allow_anonymous, log), cfg, log)
    # a line server has a handful of clients: tighter than asyncua's defaults, so that a misbehaving
    # client cannot pile up connections or subscriptions in the server process
    iserver.max_connections = 64
    iserver.max_subscriptions = 256
    iserver.max_pending_activation_seconds = 10.0
    iserver.allow_remote_admin = False
    return iserver


def configure_security(server: Server, cfg: OpcUaServerConfig, log: Any) -> None:
    """The endpoints' security policies and the accepted identity tokens (client certificates: _LineSession)."""
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
    # asyncua's own hook (certificate_validator) stays unset: _LineSession.create_session checks, per channel
    server.iserver.certificate_validator = None
