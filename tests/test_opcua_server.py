"""The line's OPC UA server, end to end with asyncua's client: security, users and roles, PackML methods,
published values, alarm events, a misbehaving client that must not disturb the service loop, and the
server's own process (lower priority, never blocking the service, its death noticed). Client certificates
as plants expect them: an unknown one refused and kept in rejected/, `sorter opcua trust` taking it from
there; none checked on the demo's None endpoint; no BadInternalError for what a client does. And the same
with an independent stack (node-opcua, tests/nodeclient.py) bringing its own freshly made certificate.

One server (SignAndEncrypt/Sign, no anonymous) serves most tests: its start-up (a spawned process
building the address space) takes seconds, and a real PackMLMachine behind a small command coroutine
stands in for the line service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from sorter.config import OpcUaServerConfig, UserConfig, load_config
from sorter.core.linestate import LineSnapshot
from sorter.core.packml import Command, PackMLMachine, State
from sorter.north.opcua.pki import (
    PkiError,
    find_rejected,
    leaf_der,
    list_certificates,
    load_certificate,
    make_certificate,
    store_rejected,
    thumbprint,
    trust,
    trust_rejected,
)
from sorter.north.opcua.process import CHILD_NICE
from sorter.north.opcua.protocol import coalesce as _coalesce
from sorter.north.opcua.proxy import LineOpcUaServer, OpcUaServerError
from sorter.north.users import authenticate, hash_password, may_configure, may_operate, verify_password
from tests.nodeclient import CLIENT_DIR, arun_node_client, require_node, step
from tests.reclog import RecLog as BaseRecLog

pytestmark = pytest.mark.wire
# every server test shares the module's loop, the one the module-scoped server was started from
in_module_loop = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[1]

NS = "urn:magnet-sorter:line"
CLIENT_URI = "urn:magnet-sorter:test-client"
FRACTIONS = ["ndfeb", "ferrite", "residue"]
PASSWORDS = {"olga": "olga-pw-1", "tom": "tom-pw-2", "vic": "vic-pw-3"}
HOSTS = [socket.gethostname(), "localhost", "127.0.0.1"]
PARENT_PID = os.getpid()


class RecLog(BaseRecLog):
    """With a path, it also reads what the server process logs (LineOpcUaServer._child_log_file: JSON lines)."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path

    def child_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        if self.path is None or not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            level, event = rec.pop("level"), rec.pop("event")
            rec.pop("timestamp", None)
            out.append((level, event, rec))
        return out

    def all_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        with self._lock:
            return [*self.records, *self.child_records()]

    def text(self) -> str:
        """Everything logged, on both sides, as text."""
        with self._lock:
            parent = repr(self.records)
        return parent + (self.path.read_text() if self.path is not None and self.path.exists() else "")


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.server_cert, self.server_key = root / "server-cert.der", root / "server-key.pem"
        self.client_cert, self.client_key = root / "client-cert.der", root / "client-key.pem"
        self.rogue_cert, self.rogue_key = root / "rogue-cert.der", root / "rogue-key.pem"
        self.trust_dir = root / "trusted"
        make_certificate(
            self.server_cert,
            self.server_key,
            common_name="line server",
            application_uri="urn:magnet-sorter:line-server",
            hostnames=HOSTS,
        )
        for cert, key, cn in ((self.client_cert, self.client_key, "scada"), (self.rogue_cert, self.rogue_key, "rogue")):
            make_certificate(cert, key, common_name=cn, application_uri=CLIENT_URI, hostnames=HOSTS)
        trust(self.client_cert, self.trust_dir)


class Line:
    """The service's side: a PackML machine, the command coroutine, snapshots published on every change."""

    def __init__(self) -> None:
        self.server: LineOpcUaServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the server was started from
        self.calls: list[tuple[Command, str, bool]] = []
        self.counts = dict.fromkeys(FRACTIONS, 0)
        self.alarms: list[str] = []
        self.machine = PackMLMachine()

    def fresh(self) -> None:
        self.machine = PackMLMachine()
        self.machine.add_listener(lambda old, new, why: self.publish())
        self.calls.clear()
        self.counts = dict.fromkeys(FRACTIONS, 0)
        self.alarms = []
        self.publish()

    def to_execute(self) -> None:
        """Stopped -> Execute (Reset, Start) as the line would, without a client."""
        for cmd in (Command.RESET, Command.START):
            self.machine.command(cmd, why="test")
            self.machine.complete()

    def snapshot(self) -> LineSnapshot:
        return LineSnapshot(
            state=self.machine.state,
            fraction_counts=dict(self.counts),
            pieces_per_minute=120.0,
            purity={"ndfeb": 0.995, "ferrite": 0.98},
            model_version="test-model-3",
            alarms=list(self.alarms),
        )

    def publish(self) -> None:
        assert self.server is not None
        self.server.publish(self.snapshot())

    async def command(self, cmd: Command, user: str) -> None:
        self.machine.command(cmd, why=user)  # InvalidState goes back to the server: BadInvalidState
        # the command runs in this (the service's) process, on the loop that started the server
        here = os.getpid() == PARENT_PID and asyncio.get_running_loop() is self.loop
        self.calls.append((cmd, user, here and threading.current_thread() is threading.main_thread()))
        await asyncio.sleep(0)
        self.machine.complete()  # this stand-in line finishes every acting state at once


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def users() -> list[UserConfig]:
    roles = {"olga": "operator", "tom": "technician", "vic": "viewer"}
    return [UserConfig(name=n, role=roles[n], password_hash=hash_password(pw)) for n, pw in PASSWORDS.items()]  # type: ignore[arg-type]


def server_config(pki: Pki, **kw: Any) -> OpcUaServerConfig:
    return OpcUaServerConfig(
        endpoint="opc.tcp://127.0.0.1:0",
        certificate=pki.server_cert,
        private_key=pki.server_key,
        trust_dir=pki.trust_dir,
        **kw,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(pki: Pki, users: list[UserConfig], tmp_path_factory: pytest.TempPathFactory) -> Any:
    line = Line()
    log = RecLog(tmp_path_factory.mktemp("log") / "opcua-server.jsonl")
    server = LineOpcUaServer(server_config(pki), users, FRACTIONS, line.command, log=log)
    server._child_log_file = log.path
    line.server = server
    line.loop = asyncio.get_running_loop()
    await server.start()
    yield line, server, log
    await server.stop()


@pytest.fixture
def line(served: Any) -> Line:
    served[0].fresh()
    return served[0]


@pytest.fixture
def server(served: Any) -> LineOpcUaServer:
    return served[1]


@pytest.fixture
def log(served: Any) -> RecLog:
    return served[2]


async def secure_client(
    url: str,
    pki: Pki,
    user: str | None = "olga",
    password: str | None = None,
    *,
    rogue: bool = False,
    mode: str = "SignAndEncrypt",
) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = CLIENT_URI  # must match the URI in the client's certificate
    cert, key = (pki.rogue_cert, pki.rogue_key) if rogue else (pki.client_cert, pki.client_key)
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(cert),
        str(key),
        server_certificate=str(pki.server_cert),
        mode=getattr(ua.MessageSecurityMode, mode),
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password if password is not None else PASSWORDS[user])
    return client


async def line_node(client: Client) -> tuple[int, Any]:
    idx = await client.get_namespace_index(NS)
    return idx, await client.nodes.objects.get_child(f"{idx}:SortingLine")


async def eventually(read: Any, expected: Any, timeout: float = 5.0) -> Any:
    """Poll until read() == expected (published values reach the server process asynchronously)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await read()
        if value == expected or loop.time() > end:
            return value
        await asyncio.sleep(0.02)


# --- users and certificates ---


def test_passwords_and_roles(users: list[UserConfig]) -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "wrong")
    assert not verify_password("not a hash", "correct horse")
    assert not verify_password(h, None)  # type: ignore[arg-type]
    assert authenticate(users, "olga", PASSWORDS["olga"]) is users[0]
    assert authenticate(users, "olga", "nope") is None
    assert authenticate(users, "nobody", PASSWORDS["olga"]) is None
    assert authenticate(users, None, None) is None
    assert [may_operate(r) for r in ("viewer", "operator", "technician")] == [False, True, True]
    assert [may_configure(r) for r in ("viewer", "operator", "technician")] == [False, False, True]
    with pytest.raises(ValueError):
        hash_password("")


def test_certificate_for_opc_ua(tmp_path: Path) -> None:
    cert_path, key_path = make_certificate(
        tmp_path / "c.der",
        tmp_path / "k.pem",
        common_name="cn",
        application_uri="urn:x:y",
        hostnames=["h1", "10.0.0.5"],
    )
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:x:y"]
    assert san.get_values_for_type(x509.DNSName) == ["h1"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.content_commitment and ku.key_encipherment and ku.data_encipherment
    assert ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    with pytest.raises(PkiError, match="exists"):
        make_certificate(cert_path, key_path, common_name="cn", application_uri="urn:x:y", hostnames=["h1"])
    make_certificate(
        cert_path, key_path, common_name="cn2", application_uri="urn:x:y", hostnames=["h1"], overwrite=True
    )
    assert load_certificate(cert_path).serial_number != cert.serial_number
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    assert trust(cert_path, tmp_path / "t") == tmp_path / "t" / "c.der"


def test_cli_certs_and_hash_password(tmp_path: Path) -> None:
    from sorter.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["opcua", "certs", "--out", str(tmp_path), "--hostname", "line-1.plant.example"])
    assert res.exit_code == 0, res.output
    for name in ("line-server-cert.der", "line-server-key.pem", "client-cert.der", "client-key.pem"):
        assert name in res.output and (tmp_path / name).is_file()
    assert (tmp_path / "trusted" / "client-cert.der").read_bytes() == (tmp_path / "client-cert.der").read_bytes()
    san = load_certificate(tmp_path / "line-server-cert.der").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "line-1.plant.example" in san.value.get_values_for_type(x509.DNSName)
    again = runner.invoke(app, ["opcua", "certs", "--out", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["opcua", "certs", "--out", str(tmp_path), "--force"]).exit_code == 0

    res = runner.invoke(app, ["opcua", "hash-password", "--stdin"], input="s3cret pass\n")
    assert res.exit_code == 0, res.output
    digest = res.output.strip()
    assert digest.startswith("$argon2id$") and "s3cret" not in digest
    assert verify_password(digest, "s3cret pass")
    UserConfig(name="x", role="viewer", password_hash=digest)  # what the config accepts


# --- the server ---


@in_module_loop
async def test_address_space_and_commands(line: Line, server: LineOpcUaServer, pki: Pki, log: RecLog) -> None:
    async with await secure_client(server.endpoint_url, pki, "olga") as client:
        idx, sl = await line_node(client)
        names = {(await c.read_browse_name()).Name for c in await sl.get_children()}
        assert names == {
            "State", "StateCurrent", "Fractions", "PiecesPerMinute", "Purity", "ModelVersion", "ActiveAlarms",
            *(c.value for c in Command),
        }  # fmt: skip
        for child in await sl.get_children():
            assert (await child.read_browse_name()).NamespaceIndex == idx
        state = await sl.get_child(f"{idx}:State")
        current = await sl.get_child(f"{idx}:StateCurrent")
        assert await eventually(state.read_value, "Stopped") == "Stopped"
        assert await current.read_value() == int(State.STOPPED)

        count = await sl.get_child([f"{idx}:Fractions", f"{idx}:ndfeb", f"{idx}:Count"])
        assert (await count.read_data_value()).Value.VariantType == ua.VariantType.UInt64
        assert (await current.read_data_value()).Value.VariantType == ua.VariantType.Int32
        ppm = await sl.get_child(f"{idx}:PiecesPerMinute")
        assert await eventually(ppm.read_value, 120.0) == 120.0
        purity = await sl.get_child([f"{idx}:Purity", f"{idx}:ndfeb"])
        assert await purity.read_value() == pytest.approx(0.995)
        assert await (await sl.get_child(f"{idx}:ModelVersion")).read_value() == "test-model-3"
        alarms = await sl.get_child(f"{idx}:ActiveAlarms")
        assert await alarms.read_value() == [] and await alarms.read_value_rank() == ua.ValueRank.OneDimension
        fractions = await sl.get_child(f"{idx}:Fractions")
        assert {(await c.read_browse_name()).Name for c in await fractions.get_children()} == set(FRACTIONS)

        await sl.call_method(f"{idx}:Reset")
        assert await eventually(state.read_value, "Idle") == "Idle"
        assert await current.read_value() == int(State.IDLE)
        await sl.call_method(f"{idx}:Start")
        assert await eventually(state.read_value, "Execute") == "Execute"
        # the command ran on the service loop (this process, the test's main thread), not in the server process
        assert line.calls == [(Command.RESET, "olga", True), (Command.START, "olga", True)]

        with pytest.raises(ua.uaerrors.BadInvalidState):
            await sl.call_method(f"{idx}:Unsuspend")
        assert line.machine.state is State.EXECUTE and len(line.calls) == 2
        with pytest.raises(ua.uaerrors.BadTooManyArguments):
            await sl.call_method(f"{idx}:Stop", ua.Variant(1, ua.VariantType.Int32))
        # all variables are read-only, for operators too
        with pytest.raises(ua.UaStatusCodeError):
            await state.write_value("Aborted")
        assert await state.read_value() == "Execute"

    results = [(r["user"], r["command"], r["result"]) for r in log.find("opcua command")]
    assert ("olga", "Unsuspend", "BadInvalidState") in results
    assert ("olga", "Start", "Good") in results


@in_module_loop
async def test_roles(line: Line, server: LineOpcUaServer, pki: Pki, log: RecLog) -> None:
    async with await secure_client(server.endpoint_url, pki, "vic") as viewer:
        idx, sl = await line_node(viewer)
        assert await (await sl.get_child(f"{idx}:State")).read_value() == "Stopped"  # a viewer reads
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await sl.call_method(f"{idx}:Reset")
    assert line.machine.state is State.STOPPED and line.calls == []
    assert {"user": "vic", "role": "viewer", "command": "Reset", "result": "BadUserAccessDenied", "detail": None} in (
        log.find("opcua command")
    )
    async with await secure_client(server.endpoint_url, pki, "tom", mode="Sign") as technician:
        idx, sl = await line_node(technician)
        await sl.call_method(f"{idx}:Abort")
    assert line.machine.state is State.ABORTED and line.calls == [(Command.ABORT, "tom", True)]


@in_module_loop
async def test_wrong_password_and_unknown_user_refused(
    line: Line, server: LineOpcUaServer, pki: Pki, log: RecLog
) -> None:
    for user, password in (("olga", "not-olgas"), ("mallory", "whatever-pw")):
        client = await secure_client(server.endpoint_url, pki, user, password)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.connect()
        await client.disconnect()  # tidy up the half-open session
    refused = [r["user"] for r in log.find("opcua login refused")]
    assert "olga" in refused and "mallory" in refused
    text = log.text()
    assert "not-olgas" not in text and "whatever-pw" not in text
    assert all(pw not in text for pw in PASSWORDS.values())
    assert line.calls == []


@in_module_loop
async def test_untrusted_client_certificate_refused(server: LineOpcUaServer, pki: Pki, log: RecLog) -> None:
    client = await secure_client(server.endpoint_url, pki, "olga", rogue=True)
    with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
        await client.connect()
    await client.disconnect()
    rogue = thumbprint(load_certificate(pki.rogue_cert))
    refused = [r for r in log.find("opcua client certificate refused") if r["thumbprint"] == rogue]
    assert refused, log.find("opcua client certificate refused")
    rec = refused[-1]
    assert rec["status"] == "BadCertificateUntrusted" and rec["subject"] == "CN=rogue, O=magnet-sorter"
    assert rec["peer"].startswith("127.0.0.1:") and rec["application_uri"] == CLIENT_URI
    # kept for an administrator: in `rejected` beside the trust folder, as DER
    kept = Path(rec["file"])
    assert kept.parent == pki.root / "rejected" and kept.read_bytes() == pki.rogue_cert.read_bytes()
    assert [c.thumbprint for c in list_certificates(pki.root / "rejected")] == [rogue]


@pytest.mark.parametrize("session_cert", ["trusted", "none"])
@in_module_loop
async def test_session_bound_to_the_channel_certificate(
    server: LineOpcUaServer, pki: Pki, line: Line, session_cert: str
) -> None:
    """A client whose secure channel uses an untrusted key must not get in by naming a trusted certificate
    (which is public) in CreateSession, or none at all: asyncua alone lets both through."""
    client = await secure_client(server.endpoint_url, pki, "olga", rogue=True)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        policy = client.security_policy
        policy.host_certificate = pki.client_cert.read_bytes() if session_cert == "trusted" else None
        policy.asymmetric_cryptography.verify = lambda data, sig: None  # the forged session cannot check the reply
        await client.create_session()
        with pytest.raises(ua.uaerrors.BadSecurityChecksFailed):
            await client.activate_session(username="olga", password=PASSWORDS["olga"])
    finally:
        client.disconnect_socket()
    assert line.calls == []


@in_module_loop
async def test_no_session_on_an_unoffered_none_channel(
    server: LineOpcUaServer, line: Line, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A None secure channel always opens (for GetEndpoints); asyncua alone then lets a session be
    created and activated on it, with the password in plain text."""
    client = Client(server.endpoint_url, timeout=5)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        assert client.security_policy.Mode == ua.MessageSecurityMode.None_
        endpoints = await client.get_endpoints()
        # skip the client's own check that the server offers the channel's policy
        monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: endpoints[-1]))
        await client.create_session()
        with pytest.raises(ua.uaerrors.BadSecurityModeRejected):
            await client.activate_session(username="olga", password=PASSWORDS["olga"])
    finally:
        client.disconnect_socket()
    assert line.calls == []


@in_module_loop
async def test_session_cannot_be_taken_over_from_another_channel(server: LineOpcUaServer, pki: Pki, line: Line) -> None:
    """asyncua hands out session tokens 1000, 1001, ... and, on ActivateSession from a new channel, attaches
    the session with that token to the channel before checking anything, and leaves it attached when the
    check fails: a None channel without certificate or password could then call methods as the operator."""
    async with await secure_client(server.endpoint_url, pki, "olga") as victim:
        token = victim.uaclient.protocol.authentication_token  # an attacker would guess it
        attacker = Client(server.endpoint_url, timeout=5)
        await attacker.connect_socket()
        try:
            await attacker.send_hello()
            await attacker.open_secure_channel()
            attacker.uaclient.protocol.authentication_token = token
            params = ua.ActivateSessionParameters(UserIdentityToken=ua.AnonymousIdentityToken(), LocaleIds=["en"])
            with pytest.raises(ua.UaStatusCodeError):
                await attacker.uaclient.activate_session(params)
            idx, sl = await line_node(victim)
            method = await sl.get_child(f"{idx}:Reset")
            reset = ua.CallMethodRequest(ObjectId=sl.nodeid, MethodId=method.nodeid)
            with pytest.raises(ua.UaStatusCodeError):
                await attacker.uaclient.call([reset])
        finally:
            attacker.disconnect_socket()
        assert line.calls == [] and line.machine.state is State.STOPPED
        idx, sl = await line_node(victim)  # the victim's session is unharmed
        assert await (await sl.get_child(f"{idx}:State")).read_value() == "Stopped"


@in_module_loop
async def test_endpoints_without_none_or_anonymous(server: LineOpcUaServer, pki: Pki) -> None:
    endpoints = await Client(server.endpoint_url).connect_and_get_server_endpoints()
    offered = {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode) for e in endpoints}
    assert offered == {
        ("Basic256Sha256", ua.MessageSecurityMode.Sign),
        ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt),
    }
    tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
    assert tokens == {ua.UserTokenType.UserName}
    plain = Client(server.endpoint_url, timeout=5)
    with pytest.raises(Exception):  # noqa: B017 - refused one way or another, but refused
        await plain.connect()
    await plain.disconnect()
    anonymous = await secure_client(server.endpoint_url, pki, user=None)
    with pytest.raises(ua.UaStatusCodeError):
        await anonymous.connect()
    await anonymous.disconnect()


@in_module_loop
async def test_none_endpoint_and_anonymous_viewer_when_allowed(pki: Pki, users: list[UserConfig]) -> None:
    line = Line()
    server = LineOpcUaServer(
        server_config(pki, allow_none_security=True, allow_anonymous=True), users, FRACTIONS, line.command
    )
    line.server = server
    await server.start()
    try:
        line.fresh()
        endpoints = await Client(server.endpoint_url).connect_and_get_server_endpoints()
        assert ua.MessageSecurityMode.None_ in {e.SecurityMode for e in endpoints}
        async with Client(server.endpoint_url, timeout=10) as anon:  # no certificate, no user
            idx, sl = await line_node(anon)
            assert await eventually((await sl.get_child(f"{idx}:State")).read_value, "Stopped") == "Stopped"
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await sl.call_method(f"{idx}:Reset")
        assert line.calls == [] and line.machine.state is State.STOPPED
    finally:
        await server.stop()


@in_module_loop
async def test_subscription_sees_count_increases(line: Line, server: LineOpcUaServer, pki: Pki) -> None:
    seen: list[int] = []
    changed = asyncio.Event()

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            seen.append(val)
            changed.set()

    async with await secure_client(server.endpoint_url, pki, "vic") as client:
        idx, sl = await line_node(client)
        count = await sl.get_child([f"{idx}:Fractions", f"{idx}:ndfeb", f"{idx}:Count"])
        sub = await client.create_subscription(20, Handler())
        await sub.subscribe_data_change(count)
        for n in (1, 2, 3):
            line.counts["ndfeb"] = n
            line.publish()
            await asyncio.sleep(0.06)
        async with asyncio.timeout(5):
            while not seen or seen[-1] != 3:
                changed.clear()
                await changed.wait()
        await sub.delete()
    assert seen[0] == 0 and seen == sorted(seen) and len(set(seen)) >= 2


@in_module_loop
async def test_alarm_events(line: Line, server: LineOpcUaServer, pki: Pki) -> None:
    events: dict[str, asyncio.Queue[Any]] = {"line": asyncio.Queue(), "server": asyncio.Queue()}

    class Handler:
        def __init__(self, q: asyncio.Queue[Any]) -> None:
            self.q = q

        def event_notification(self, event: Any) -> None:
            self.q.put_nowait(event)

    async with await secure_client(server.endpoint_url, pki, "vic") as client:
        _, sl = await line_node(client)
        sub_line = await client.create_subscription(20, Handler(events["line"]))
        await sub_line.subscribe_events(sl, ua.ObjectIds.BaseEventType)
        sub_server = await client.create_subscription(20, Handler(events["server"]))
        await sub_server.subscribe_events(client.nodes.server, ua.ObjectIds.BaseEventType)

        line.alarms = ["plc: link down"]
        line.publish()
        for q in events.values():
            ev = await asyncio.wait_for(q.get(), 5)
            assert (ev.Message.Text, ev.Severity) == ("plc: link down", 700)
            assert ev.SourceNode == sl.nodeid
        line.alarms = []
        line.publish()
        for q in events.values():
            ev = await asyncio.wait_for(q.get(), 5)
            assert (ev.Message.Text, ev.Severity) == ("cleared: plc: link down", 100)
        await sub_line.delete()
        await sub_server.delete()


@in_module_loop
async def test_flood_and_garbage_do_not_break_the_service_loop(line: Line, server: LineOpcUaServer, pki: Pki) -> None:
    """A client reading as fast as it can, in its own thread, plus raw garbage on the socket, while the
    service loop ticks a timer, publishes and takes a command. Only "nothing breaks" is asserted."""
    stop = threading.Event()
    flood_reads: list[int] = []
    flood_errors: list[BaseException] = []

    def flood() -> None:
        async def main() -> None:
            async with await secure_client(server.endpoint_url, pki, "vic") as client:
                idx, sl = await line_node(client)
                state = await sl.get_child(f"{idx}:State")
                n = 0
                while not stop.is_set():
                    await state.read_value()
                    n += 1
                flood_reads.append(n)

        try:
            asyncio.run(main())
        except BaseException as exc:
            flood_errors.append(exc)

    ticks = 0

    async def timer() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    async def garbage() -> None:
        host, port = "127.0.0.1", int(server.endpoint_url.rsplit(":", 1)[1])
        payloads = [
            os.urandom(512),
            b"HELF" + (12).to_bytes(4, "little") + b"\xff" * 4,  # a Hello too short for its fields
            b"MSGF" + (40).to_bytes(4, "little") + os.urandom(32),  # a message on no secure channel
            b"OPNF" + (0xFFFFFFF).to_bytes(4, "little"),  # claims a quarter-gigabyte body
        ]
        for data in payloads:
            _, writer = await asyncio.open_connection(host, port)
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            with contextlib.suppress(OSError):  # the server hanging up on garbage is fine
                await writer.wait_closed()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    timer_task = asyncio.create_task(timer())
    try:
        await garbage()
        async with await secure_client(server.endpoint_url, pki, "olga") as client:
            idx, sl = await line_node(client)
            for n in range(10):
                line.counts["ferrite"] = n
                line.publish()
                await asyncio.sleep(0.02)
            await sl.call_method(f"{idx}:Reset")
            state = await sl.get_child(f"{idx}:State")
            assert await eventually(state.read_value, "Idle") == "Idle"
            count = await sl.get_child([f"{idx}:Fractions", f"{idx}:ferrite", f"{idx}:Count"])
            assert await eventually(count.read_value, 9) == 9
    finally:
        stop.set()
        await timer_task
        await asyncio.to_thread(thread.join, 15)
    assert not flood_errors, flood_errors
    assert flood_reads and flood_reads[0] > 0
    assert ticks > 0
    assert line.calls == [(Command.RESET, "olga", True)]


@in_module_loop
async def test_start_errors_are_clear(pki: Pki, users: list[UserConfig], tmp_path: Path) -> None:
    async def noop(cmd: Command, user: str) -> None:
        return None

    missing = OpcUaServerConfig(
        endpoint="opc.tcp://127.0.0.1:0",
        certificate=tmp_path / "nope.der",
        private_key=tmp_path / "nope.pem",
        trust_dir=pki.trust_dir,
    )
    with pytest.raises(OpcUaServerError, match="sorter opcua certs"):
        await LineOpcUaServer(missing, users, FRACTIONS, noop).start()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = server_config(pki).model_copy(update={"endpoint": f"opc.tcp://127.0.0.1:{port}"})
        srv = LineOpcUaServer(cfg, users, FRACTIONS, noop)
        with pytest.raises(OpcUaServerError, match="cannot listen"):
            await srv.start()
        await srv.stop()  # harmless after a failed start


# --- the server's own process ---


def test_coalesce_keeps_every_state_and_alarm_list() -> None:
    pending: deque[LineSnapshot] = deque(maxlen=4)

    def snap(state: State, n: int, alarms: list[str] | None = None) -> LineSnapshot:
        return LineSnapshot(state=state, fraction_counts={"ndfeb": n}, alarms=alarms or [])

    for s in (
        snap(State.EXECUTE, 1),
        snap(State.EXECUTE, 2),  # replaces 1: only the count changed
        snap(State.EXECUTE, 3, ["a"]),  # an alarm that lasts one snapshot
        snap(State.EXECUTE, 4),
        snap(State.HELD, 5),  # a state that lasts one snapshot
        snap(State.EXECUTE, 6),
        snap(State.EXECUTE, 7),
    ):
        _coalesce(pending, s)
    # 4 kept (maxlen): the oldest went; each alarm list and state shown, with the latest counts
    assert [(p.state, p.fraction_counts["ndfeb"], p.alarms) for p in pending] == [
        (State.EXECUTE, 3, ["a"]),
        (State.EXECUTE, 4, []),
        (State.HELD, 5, []),
        (State.EXECUTE, 7, []),
    ]


@in_module_loop
async def test_server_runs_in_its_own_lower_priority_process(server: LineOpcUaServer) -> None:
    pid = server.pid
    assert server.listening and pid is not None and pid != os.getpid()
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(mine + CHILD_NICE, 19)
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a fresh interpreter (spawn), not a fork of the service
        assert b"--multiprocessing-fork" in cmdline.read_bytes().split(b"\0")


@in_module_loop
async def test_publish_never_blocks_while_the_server_process_does_not_read(
    line: Line, server: LineOpcUaServer, pki: Pki
) -> None:
    """The server process stopped (SIGSTOP) while the service publishes far more than a pipe holds:
    publish() still returns at once; once it runs again the latest values and every alarm event arrive."""
    events: asyncio.Queue[Any] = asyncio.Queue()

    class Handler:
        def event_notification(self, event: Any) -> None:
            events.put_nowait(event)

    async with await secure_client(server.endpoint_url, pki, "vic") as client:
        idx, sl = await line_node(client)
        count = await sl.get_child([f"{idx}:Fractions", f"{idx}:ferrite", f"{idx}:Count"])
        sub = await client.create_subscription(20, Handler())
        await sub.subscribe_events(sl, ua.ObjectIds.BaseEventType)
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        # should publish() ever block, this lets the process (and the test) go on after 10 s
        watchdog = threading.Timer(10.0, lambda: os.kill(pid, signal.SIGCONT))
        watchdog.start()
        worst = 0.0
        try:
            for n in range(1, 101):  # 100 snapshots of ~20 kB, 5 ms apart: 2 MB, a pipe holds 64 kB
                line.counts["ferrite"] = n
                line.alarms = ["belt: slipping"] if n == 50 else []  # an alarm lasting one snapshot
                snap = line.snapshot()
                big = LineSnapshot(**{**{f: getattr(snap, f) for f in snap.__slots__}, "model_version": "m" * 20_000})
                t0 = time.perf_counter()
                server.publish(big)
                worst = max(worst, time.perf_counter() - t0)
                await asyncio.sleep(0.005)
            # the sender thread is stuck on the full pipe; what is left waits, coalesced, in the outbox
            assert 1 <= len(server._outbox._snaps) <= 3
        finally:
            watchdog.cancel()
            os.kill(pid, signal.SIGCONT)
        assert worst < 0.5, worst  # blocked, it would have waited for the watchdog (10 s); the margin is for load
        assert await eventually(count.read_value, 100, timeout=15) == 100
        texts = [(await asyncio.wait_for(events.get(), 10)).Message.Text for _ in range(2)]
        assert texts == ["belt: slipping", "cleared: belt: slipping"]
        await sub.delete()


@in_module_loop
async def test_command_failure_in_the_service(line: Line, server: LineOpcUaServer, pki: Pki, log: RecLog) -> None:
    async def broken(cmd: Command, user: str) -> None:
        raise RuntimeError("record store gone")

    command, server._command = server._command, broken
    try:
        async with await secure_client(server.endpoint_url, pki, "olga") as client:
            idx, sl = await line_node(client)
            with pytest.raises(ua.uaerrors.BadInternalError):
                await sl.call_method(f"{idx}:Reset")
    finally:
        server._command = command
    assert {"command": "Reset", "user": "olga"} in log.find("opcua command failed")  # logged by the service
    assert any(
        r["result"] == "BadInternalError" and "record store gone" in r["detail"] for r in log.find("opcua command")
    )


@in_module_loop
async def test_killed_server_process_is_noticed(pki: Pki, users: list[UserConfig]) -> None:
    line = Line()
    log = RecLog()
    server = LineOpcUaServer(server_config(pki), users, FRACTIONS, line.command, log=log)
    line.server = server
    line.loop = asyncio.get_running_loop()
    assert not server.listening
    await server.start()
    try:
        line.fresh()
        pid = server.pid
        assert server.listening and pid is not None
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            while server.listening:
                await asyncio.sleep(0.01)
        for _ in range(3):
            line.publish()  # a no-op now, never an exception
        async with asyncio.timeout(5):
            while not log.find("ALARM OPC UA server process died"):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        died = log.find("ALARM OPC UA server process died")
        assert len(died) == 1 and died[0]["pid"] == pid and died[0]["exitcode"] == -signal.SIGKILL
        with pytest.raises(ChildProcessError):  # reaped: no zombie left
            os.waitpid(pid, os.WNOHANG)
    finally:
        await server.stop()
    assert not server.listening and server.pid is None
    assert len(log.find("ALARM OPC UA server process died")) == 1


# --- client certificates as plants expect them: trusted/, rejected/, `sorter opcua trust` ---


def test_rejected_folder_keeps_each_refused_certificate_once(tmp_path: Path) -> None:
    certs = []
    for n in range(4):
        cert, _ = make_certificate(
            tmp_path / f"c{n}.der",
            tmp_path / f"k{n}.pem",
            common_name=f"scada {n}/x",
            application_uri="urn:c",
            hostnames=["h"],
        )
        certs.append(cert.read_bytes())
    rejected = tmp_path / "rejected"
    path, new = store_rejected(certs[0], rejected)
    assert new and path.parent == rejected and path.suffix == ".der"
    assert path.name == f"scada-0-x_{thumbprint(load_certificate(path))}.der"  # a safe name whatever the CN says
    os.utime(path, (1_000_000, 1_000_000))  # first refused long ago
    again, new = store_rejected(certs[0] + certs[1], rejected)  # the same leaf, sent with a chain behind it
    assert again == path and not new and path.stat().st_mtime == 1_000_000  # not rewritten: "first seen" stays
    for data in certs[1:]:
        store_rejected(data, rejected, keep=3)
    kept = list_certificates(rejected)
    assert len(kept) == 3 and path not in [c.path for c in kept]  # the oldest went
    with pytest.raises(PkiError):
        store_rejected(b"\x30\x82\x01", rejected)
    assert leaf_der(certs[2] + certs[3]) == certs[2]
    for junk in (b"", b"\x02\x01\x00", b"\x30\x84\xff\xff\xff\xff"):
        with pytest.raises(PkiError):
            leaf_der(junk)


def test_find_and_trust_a_rejected_certificate(tmp_path: Path) -> None:
    a, _ = make_certificate(
        tmp_path / "a.der", tmp_path / "a.pem", common_name="a", application_uri="urn:a", hostnames=["h"]
    )
    rejected, trusted = tmp_path / "rejected", tmp_path / "trusted"
    path, _ = store_rejected(a.read_bytes(), rejected)
    (rejected / "junk.der").write_bytes(b"not a certificate")  # listed by no one, breaks nothing
    thumb = thumbprint(load_certificate(a))
    spaced = ":".join(thumb[i : i + 2] for i in range(0, len(thumb), 2)).upper()
    for wanted in (thumb, thumb[:8], spaced, path.name, path.stem):
        assert find_rejected(rejected, wanted).path == path
    with pytest.raises(PkiError, match="no refused certificate"):
        find_rejected(rejected, "00000000")
    with pytest.raises(PkiError, match="no refused certificate"):
        find_rejected(tmp_path / "nowhere", thumb)
    target = trust_rejected(find_rejected(rejected, thumb), trusted)
    assert target == trusted / path.name and target.read_bytes() == a.read_bytes() and not path.exists()


def test_cli_trust_lists_and_moves_rejected_certificates(tmp_path: Path) -> None:
    from sorter.cli import app

    a, _ = make_certificate(
        tmp_path / "a.der", tmp_path / "a.pem", common_name="scada-a", application_uri="urn:a", hostnames=["h"]
    )
    b, _ = make_certificate(
        tmp_path / "b.der", tmp_path / "b.pem", common_name="mes-b", application_uri="urn:b", hostnames=["h"]
    )
    pki_dir = tmp_path / "pki"
    trusted, rejected = pki_dir / "trusted", pki_dir / "rejected"
    store_rejected(a.read_bytes(), rejected)
    thumb = thumbprint(load_certificate(a))
    runner = CliRunner()
    folders = ["--trust-dir", str(trusted)]  # rejected/ beside it by default

    listed = runner.invoke(app, ["opcua", "trust", "--list", *folders])
    assert listed.exit_code == 0, listed.output
    assert f"refused client certificates in {rejected}: 1" in listed.stdout
    line = next(x for x in listed.stdout.splitlines() if thumb in x)
    assert (
        "CN=scada-a, O=magnet-sorter" in line and "urn:a" in line and "first seen 20" in line and str(rejected) in line
    )
    assert f"trusted client certificates in {trusted}: none" in listed.stdout

    took = runner.invoke(app, ["opcua", "trust", thumb[:10].upper(), *folders])
    assert took.exit_code == 0, took.output
    assert "moved from" in took.stdout and not list(rejected.glob("*.der"))
    assert [c.thumbprint for c in list_certificates(trusted)] == [thumb]

    copied = runner.invoke(app, ["opcua", "trust", str(b), *folders])  # a file from elsewhere: copied, as before
    assert copied.exit_code == 0, copied.output
    assert (trusted / "b.der").read_bytes() == b.read_bytes() and b.exists()

    missing = runner.invoke(app, ["opcua", "trust", "deadbeef00", *folders])
    assert missing.exit_code == 2 and "no refused certificate" in missing.stderr
    nothing = runner.invoke(app, ["opcua", "trust", *folders])
    assert nothing.exit_code == 2 and "--list" in nothing.stderr


def test_cli_trust_takes_the_folders_from_the_config(tmp_path: Path) -> None:
    from sorter.cli import app

    text = (ROOT / "config" / "line.example.yaml").read_text()
    config = tmp_path / "etc" / "line.yaml"
    config.parent.mkdir()
    config.write_text(text.replace("trust_dir: ../pki/trusted", "trust_dir: pki/ok\n  rejected_dir: pki/refused"))
    a, _ = make_certificate(
        tmp_path / "a.der", tmp_path / "a.pem", common_name="a", application_uri="urn:a", hostnames=["h"]
    )
    store_rejected(a.read_bytes(), tmp_path / "etc" / "pki" / "refused")
    res = CliRunner().invoke(app, ["opcua", "trust", thumbprint(load_certificate(a)), "-c", str(config)])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "etc" / "pki" / "ok").glob("*.der"))) == 1


@contextlib.asynccontextmanager
async def line_server(
    cfg: OpcUaServerConfig, users: list[UserConfig], log_dir: Path
) -> AsyncIterator[tuple[Line, LineOpcUaServer, RecLog]]:
    """A server of its own for a test (another configuration than the module's), its log readable."""
    line = Line()
    log = RecLog(log_dir / "opcua-server.jsonl")
    server = LineOpcUaServer(cfg, users, FRACTIONS, line.command, log=log)
    server._child_log_file = log.path
    line.server = server
    line.loop = asyncio.get_running_loop()
    await server.start()
    try:
        line.fresh()
        yield line, server, log
    finally:
        await server.stop()


@in_module_loop
async def test_empty_trust_folder_trusts_nobody_then_trust_takes_the_refused_client(
    pki: Pki, users: list[UserConfig], tmp_path: Path
) -> None:
    """The reported bug: an empty trust folder made asyncua raise `can't create an empty store`, which the
    client saw as BadInternalError on CreateSession. Empty means nobody is trusted yet."""
    from sorter.cli import app

    trusted = tmp_path / "pki" / "trusted"
    trusted.mkdir(parents=True)
    cfg = server_config(pki).model_copy(update={"trust_dir": trusted})
    async with line_server(cfg, users, tmp_path) as (line, server, log):
        client = await secure_client(server.endpoint_url, pki, "olga")
        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            await client.connect()
        await client.disconnect()
        listed = CliRunner().invoke(app, ["opcua", "trust", "--list", "--trust-dir", str(trusted)])
        thumb = thumbprint(load_certificate(pki.client_cert))
        assert thumb in listed.stdout, listed.output
        took = CliRunner().invoke(app, ["opcua", "trust", thumb, "--trust-dir", str(trusted)])
        assert took.exit_code == 0, took.output
        (trusted / "notes.pem").write_text("a file that is no certificate")  # skipped, logged once
        async with await secure_client(server.endpoint_url, pki, "olga") as client:  # no restart needed
            idx, sl = await line_node(client)
            await sl.call_method(f"{idx}:Reset")
        async with await secure_client(server.endpoint_url, pki, "vic") as client:  # the folder re-read again
            idx, sl = await line_node(client)
            assert await eventually((await sl.get_child(f"{idx}:State")).read_value, "Idle") == "Idle"
        assert line.calls == [(Command.RESET, "olga", True)]
    assert "BadInternalError" not in log.text() and "empty store" not in log.text()
    skipped = log.find("opcua trusted certificate unreadable, skipped")
    assert len(skipped) == 1 and skipped[0]["file"].endswith("notes.pem")


@in_module_loop
async def test_certificate_chain_in_create_session_is_accepted(server: LineOpcUaServer, pki: Pki, line: Line) -> None:
    """A client may send its certificate followed by its CA chain in CreateSession (asyncua parsed the whole blob
    as one certificate: BadInternalError); the leaf is checked and must be the channel's."""
    client = await secure_client(server.endpoint_url, pki, "olga")
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        policy = client.security_policy
        policy.host_certificate = pki.client_cert.read_bytes() + pki.server_cert.read_bytes()  # leaf + "its CA"
        policy.asymmetric_cryptography.verify = lambda data, sig: None  # the server signed the leaf, not the blob
        await client.create_session()
        await client.activate_session(username="olga", password=PASSWORDS["olga"])
        idx, sl = await line_node(client)
        await sl.call_method(f"{idx}:Reset")
        await client.close_session()
    finally:
        client.disconnect_socket()
    assert line.calls == [(Command.RESET, "olga", True)]


@in_module_loop
async def test_unparseable_client_certificate_is_refused_not_an_internal_error(
    server: LineOpcUaServer, pki: Pki, log: RecLog
) -> None:
    client = await secure_client(server.endpoint_url, pki, "olga")
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        client.security_policy.host_certificate = b"\x30\x03\x02\x01\x00"  # DER, but no certificate
        with pytest.raises(ua.uaerrors.BadCertificateInvalid):
            await client.create_session()
    finally:
        client.disconnect_socket()
    assert any(r["status"] == "BadCertificateInvalid" for r in log.find("opcua client certificate refused"))


@in_module_loop
async def test_bad_client_signature_is_a_specific_status(
    server: LineOpcUaServer, pki: Pki, line: Line, log: RecLog
) -> None:
    """ActivateSession signed with the wrong key: asyncua's verification raises, which it answered with
    BadInternalError; now BadApplicationSignatureInvalid, logged with the peer."""
    client = await secure_client(server.endpoint_url, pki, "olga")
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        await client.create_session()
        crypto = client.security_policy.asymmetric_cryptography
        good = crypto.signature
        crypto.signature = lambda data: bytes(len(good(data)))  # the right length, zeros
        with pytest.raises(ua.uaerrors.BadApplicationSignatureInvalid):
            await client.activate_session(username="olga", password=PASSWORDS["olga"])
    finally:
        client.disconnect_socket()
    assert line.calls == []
    refused = log.find("opcua request refused", service="ActivateSession")
    assert refused and refused[-1]["status"] == "BadApplicationSignatureInvalid" and refused[-1]["peer"]


# --- an independent stack: node-opcua with its own freshly made certificate ---

# What node-opcua's client does when it has no certificate (OPCUAClient.createDefaultCertificate): a self-signed
# application certificate from node-opcua's own PKI code, made here once so that two runs present the same one.
NODE_CERT_JS = """
import os from "node:os";
import path from "node:path";
import { OPCUACertificateManager } from "node-opcua-certificate-manager";
const dir = process.env.NODE_CERT_DIR;
const host = os.hostname();
const cm = new OPCUACertificateManager({ rootFolder: path.join(dir, "pki"), disableFileWatchers: true });
await cm.initialize();
const certificate = path.join(dir, "client_certificate.pem");
await cm.createSelfSignedCertificate({
    applicationUri: `urn:${host}:MagnetSorterNodeTestClient`,
    dns: [host],
    outputFile: certificate,
    subject: `/CN=MagnetSorterNodeTestClient@${host}/O=node-opcua test client`,
    startDate: new Date(),
    validity: 30,
});
await cm.dispose();
console.log(JSON.stringify({ certificate, privateKey: cm.privateKey }));
"""


async def node_made_certificate(folder: Path) -> tuple[Path, Path]:
    """A fresh certificate and key made by node-opcua's PKI (not by this project's pki.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e", NODE_CERT_JS,
        cwd=CLIENT_DIR, env={**os.environ, "NODE_CERT_DIR": str(folder)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    made = json.loads(out.decode().strip().splitlines()[-1])
    return Path(made["certificate"]), Path(made["privateKey"])


@in_module_loop
async def test_node_client_on_the_demo_none_endpoint(pki: Pki, tmp_path: Path) -> None:
    """The demo's line server (None offered, anonymous viewers, the demo users, an empty trust folder) and a
    node-opcua client that brings the certificate it makes for itself: it connects on None without its
    certificate being checked, browses, is refused Hold as anonymous; as the demo operator it holds and unholds
    the line, and Start while Held is refused."""
    require_node()
    trusted = tmp_path / "pki" / "trusted"
    trusted.mkdir(parents=True)  # as `sorter demo` leaves it: nobody trusted
    cfg = server_config(pki, allow_none_security=True, allow_anonymous=True).model_copy(update={"trust_dir": trusted})
    demo = load_config(ROOT / "config" / "sim.yaml")
    assert demo.opcua_server is not None and demo.opcua_server.allow_none_security and demo.opcua_server.allow_anonymous
    async with line_server(cfg, demo.users, tmp_path) as (line, server, log):
        line.to_execute()
        base = {"endpoint": server.endpoint_url, "securityMode": "None", "securityPolicy": "None", "namespace": NS}
        state = ["SortingLine", "StateCurrent"]
        anonymous = await arun_node_client(
            {
                **base,
                "steps": [
                    {"op": "browse", "path": ["SortingLine"]},
                    {"op": "wait_value", "path": state, "equals": int(State.EXECUTE), "timeout": 10},
                    {"op": "call", "path": ["SortingLine"], "method": "Hold"},
                ],
            },
            timeout=90,
        )
        assert anonymous["connected"], anonymous
        assert anonymous["securityMode"] == "None"
        assert {"State", "StateCurrent", "Hold", "Unhold", "Start", "Fractions"} <= set(step(anonymous, 0)["children"])
        assert step(anonymous, 1)["ok"], step(anonymous, 1)
        assert step(anonymous, 2)["statusCode"] == "BadUserAccessDenied"
        assert line.calls == []

        operator = await arun_node_client(
            {
                **base,
                "userName": "operator",
                "password": "demo-operator",
                "steps": [
                    {"op": "call", "path": ["SortingLine"], "method": "Hold"},
                    {"op": "wait_value", "path": state, "equals": int(State.HELD), "timeout": 10},
                    {"op": "call", "path": ["SortingLine"], "method": "Start"},
                    {"op": "call", "path": ["SortingLine"], "method": "Unhold"},
                    {"op": "wait_value", "path": state, "equals": int(State.EXECUTE), "timeout": 10},
                    {"op": "read", "path": ["SortingLine", "State"]},
                ],
            },
            timeout=90,
        )
        assert operator["connected"], operator
        assert step(operator, 0)["statusCode"] == "Good"
        held = step(operator, 1)
        assert held["ok"] and held["value"] == 11, held
        assert step(operator, 2)["statusCode"] == "BadInvalidState"
        assert step(operator, 3)["statusCode"] == "Good"
        back = step(operator, 4)
        assert back["ok"] and back["value"] == 6, back
        assert step(operator, 5)["value"] == "Execute"
    assert [(cmd, user) for cmd, user, _ in line.calls] == [(Command.HOLD, "operator"), (Command.UNHOLD, "operator")]
    results = [(r["user"], r["command"], r["result"]) for r in log.find("opcua command")]
    assert results == [
        ("anonymous", "Hold", "BadUserAccessDenied"),
        ("operator", "Hold", "Good"),
        ("operator", "Start", "BadInvalidState"),
        ("operator", "Unhold", "Good"),
    ]
    # the clients' certificates were not checked on None: none refused, none kept
    assert not log.find("opcua client certificate refused")
    assert not (tmp_path / "pki" / "rejected").exists()
    assert "BadInternalError" not in log.text()


@in_module_loop
async def test_node_client_is_refused_on_a_plant_endpoint_until_trusted(
    pki: Pki, users: list[UserConfig], tmp_path: Path
) -> None:
    """A plant-like server (Basic256Sha256 only, named users, nobody trusted yet) and a node-opcua client with a
    certificate node-opcua made: refused as untrusted, its certificate lands in rejected/, `sorter opcua trust`
    takes it from there, then the same client is accepted (no restart)."""
    from sorter.cli import app

    require_node()
    trusted = tmp_path / "pki" / "trusted"
    trusted.mkdir(parents=True)
    rejected = tmp_path / "pki" / "rejected"
    cfg = server_config(pki).model_copy(update={"trust_dir": trusted})
    assert not cfg.allow_none_security and not cfg.allow_anonymous
    cert, key = await node_made_certificate(tmp_path / "node-client")
    thumb = thumbprint(load_certificate(cert))
    async with line_server(cfg, users, tmp_path) as (line, server, log):
        base = {
            "endpoint": server.endpoint_url,
            "securityMode": "SignAndEncrypt",
            "securityPolicy": "Basic256Sha256",
            "certificate": str(cert),
            "privateKey": str(key),
            "userName": "olga",
            "password": PASSWORDS["olga"],
            "namespace": NS,
            "maxRetry": 0,
        }
        refused = await arun_node_client({**base, "steps": [{"op": "browse", "path": ["SortingLine"]}]}, timeout=90)
        assert refused["connected"] is False, refused
        assert refused["error"] in ("BadCertificateUntrusted", "BadSecurityChecksFailed"), refused
        kept = list_certificates(rejected)
        assert [c.thumbprint for c in kept] == [thumb]
        rec = log.find("opcua client certificate refused", thumbprint=thumb)
        assert rec and rec[0]["status"] == "BadCertificateUntrusted" and rec[0]["peer"].startswith("127.0.0.1:")
        assert "MagnetSorterNodeTestClient" in rec[0]["subject"] and rec[0]["file"] == str(kept[0].path)

        listed = CliRunner().invoke(app, ["opcua", "trust", "--list", "--trust-dir", str(trusted)])
        assert thumb in listed.stdout and "MagnetSorterNodeTestClient" in listed.stdout, listed.output
        took = CliRunner().invoke(app, ["opcua", "trust", thumb, "--trust-dir", str(trusted)])
        assert took.exit_code == 0, took.output
        assert list_certificates(rejected) == [] and [c.thumbprint for c in list_certificates(trusted)] == [thumb]

        accepted = await arun_node_client(
            {
                **base,
                "steps": [
                    {"op": "browse", "path": ["SortingLine"]},
                    {"op": "call", "path": ["SortingLine"], "method": "Reset"},
                    {"op": "wait_value", "path": ["SortingLine", "State"], "equals": "Idle", "timeout": 10},
                ],
            },
            timeout=90,
        )
        assert accepted["connected"], accepted
        assert (accepted["securityMode"], accepted["securityPolicy"]) == ("SignAndEncrypt", "Basic256Sha256")
        assert "Reset" in step(accepted, 0)["children"]
        assert step(accepted, 1)["statusCode"] == "Good" and step(accepted, 2)["ok"]
    assert line.calls == [(Command.RESET, "olga", True)]
    assert "BadInternalError" not in log.text()
