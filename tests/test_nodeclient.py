"""The node-opcua test client (tests/opcua_node) against a small asyncua server made here.

The server below is scaffolding that proves the harness (security, user names, status codes, subscriptions,
events); the line's own OPC UA server is tested through the same harness elsewhere.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Server, ua
from asyncua.crypto.permission_rules import PermissionRuleset, User, UserRole
from asyncua.server.user_managers import UserManager

from tests import nodeclient
from tests.nodeclient import arun_node_client, make_certificate, require_node, run_node_client, step

pytestmark = [pytest.mark.wire, pytest.mark.timeout(120)]
# one asyncua server (2 s to start) for the module: the async tests share its event loop
on_server_loop = pytest.mark.asyncio(loop_scope="module")

NS = "urn:magnet-sorter:test:harness"
SERVER_URI = "urn:magnet-sorter:test:server"
CLIENT_URI = "urn:magnet-sorter:test:node-client"
USERS = {"operator": "op-secret", "viewer": "view-secret"}


class _Users(UserManager):
    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None):
        if username in USERS and password == USERS[username]:
            return User(role=UserRole.User, name=username)
        return None


class _ViewerCannotCall(PermissionRuleset):
    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        if user is None:
            return True
        if action_type_id == ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary):
            return user.name != "viewer"
        return True


@dataclass
class Harness:
    url: str
    client_cert: Path
    client_key: Path
    server_cert: Path

    def script(self, steps: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
        script: dict[str, Any] = {
            "endpoint": self.url,
            "securityMode": "SignAndEncrypt",
            "securityPolicy": "Basic256Sha256",
            "certificate": str(self.client_cert),
            "privateKey": str(self.client_key),
            "applicationUri": CLIENT_URI,
            "userName": "operator",
            "password": USERS["operator"],
            "namespace": NS,
            "maxRetry": 0,
            "steps": steps,
        }
        script.update(overrides)
        return script


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    server_cert, server_key = make_certificate(d / "server.der", d / "server_key.pem", application_uri=SERVER_URI)
    client_cert, client_key = make_certificate(d / "client.der", d / "client_key.pem", application_uri=CLIENT_URI)
    return {"server_cert": server_cert, "server_key": server_key, "client_cert": client_cert, "client_key": client_key}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def harness(pki: dict[str, Path]) -> AsyncIterator[Harness]:
    require_node()
    server = Server(user_manager=_Users())
    await server.init()
    url = f"opc.tcp://127.0.0.1:{_free_port()}/harness"
    server.set_endpoint(url)
    server.set_server_name("node-client harness")
    await server.set_application_uri(SERVER_URI)
    server.set_security_policy(
        [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt], permission_ruleset=_ViewerCannotCall()
    )
    server.set_identity_tokens([ua.UserNameIdentityToken])
    await server.load_certificate(str(pki["server_cert"]))
    await server.load_private_key(str(pki["server_key"]))

    idx = await server.register_namespace(NS)
    line = await server.nodes.objects.add_object(idx, "SortingLine")
    await line.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
    state = await line.add_variable(idx, "State", "Idle")
    fractions = await line.add_object(idx, "Fractions")
    ndfeb = await fractions.add_object(idx, "ndfeb")
    await fractions.add_object(idx, "ferrite")
    count = await ndfeb.add_variable(idx, "Count", 0)  # a Python int: Int64 on the wire
    events = await server.get_event_generator(ua.ObjectIds.BaseEventType, line)

    async def start(parent: ua.NodeId) -> ua.StatusCode | list[ua.Variant]:
        if await state.read_value() != "Idle":
            return ua.StatusCode(ua.StatusCodes.BadInvalidState)
        await state.write_value("Execute")
        events.event.Message = ua.LocalizedText("line started")
        events.event.Severity = 300
        await events.trigger()
        return [ua.Variant("Execute", ua.VariantType.String)]

    async def stop(parent: ua.NodeId) -> ua.StatusCode | list[ua.Variant]:
        await state.write_value("Idle")
        return []

    async def add(parent: ua.NodeId, a: ua.Variant, b: ua.Variant) -> list[ua.Variant]:
        assert a.VariantType == b.VariantType == ua.VariantType.UInt32  # typed from the method's InputArguments
        return [ua.Variant(a.Value + b.Value, ua.VariantType.UInt32)]

    await line.add_method(idx, "Start", start, [], [ua.VariantType.String])
    await line.add_method(idx, "Stop", stop, [], [])
    await line.add_method(idx, "Add", add, [ua.VariantType.UInt32, ua.VariantType.UInt32], [ua.VariantType.UInt32])

    async def produce() -> None:
        while True:
            await asyncio.sleep(0.1)
            if await state.read_value() == "Execute":
                await count.write_value(await count.read_value() + 1)

    async with server:
        producer = asyncio.create_task(produce())
        try:
            yield Harness(url, pki["client_cert"], pki["client_key"], pki["server_cert"])
        finally:
            producer.cancel()


@on_server_loop
async def test_signandencrypt_session_browse_read_call_subscribe_events(harness: Harness) -> None:
    result = await arun_node_client(
        harness.script(
            [
                {"op": "call", "path": ["SortingLine"], "method": "Stop"},  # Idle, whatever ran before
                {"op": "browse", "path": ["SortingLine"]},
                {"op": "browse", "path": ["SortingLine", "Fractions"]},
                {"op": "read", "path": ["SortingLine", "State"]},
                {
                    "op": "subscribe",
                    "path": ["SortingLine", "Fractions", "ndfeb", "Count"],
                    "seconds": 2.5,
                    "background": True,
                },
                {"op": "events", "path": ["SortingLine"], "seconds": 2, "background": True},
                {"op": "sleep", "seconds": 0.3},
                {"op": "call", "path": ["SortingLine"], "method": "Start", "args": []},
                {"op": "wait_value", "path": ["SortingLine", "State"], "equals": "Execute", "timeout": 5},
                {"op": "call", "path": ["SortingLine"], "method": "Start"},
                {"op": "call", "path": ["SortingLine"], "method": "Add", "args": [2, 40]},
                {"op": "read", "path": ["0:Server", "0:ServerStatus", "0:State"]},
                {"op": "read", "path": ["SortingLine", "NoSuchNode"]},
            ]
        ),
        timeout=40,
    )
    assert result["connected"], result
    assert "does not match the client applicationUri" not in result["stderr"]  # certificate SAN URI == applicationUri
    assert result["securityMode"] == "SignAndEncrypt"
    assert result["securityPolicy"] == "Basic256Sha256"

    assert {"State", "Fractions", "Start", "Stop"} <= set(step(result, 1)["children"])
    assert sorted(step(result, 2)["children"]) == ["ferrite", "ndfeb"]
    read = step(result, 3)
    assert (read["value"], read["statusCode"], read["dataType"]) == ("Idle", "Good", "String")

    start = step(result, 7)
    assert (start["statusCode"], start["outputArguments"]) == ("Good", ["Execute"])
    assert step(result, 8)["ok"] and step(result, 8)["value"] == "Execute"
    assert step(result, 9)["statusCode"] == "BadInvalidState"
    assert step(result, 10)["outputArguments"] == [42]
    assert step(result, 11)["value"] == 0  # ServerState.Running, an enumeration read as its number
    missing = step(result, 12)
    assert not missing["ok"] and missing["statusCode"].startswith("Bad")

    counts = [v["value"] for v in step(result, 4)["values"]]
    assert all(isinstance(c, int) for c in counts) and counts[-1] - counts[0] >= 3, counts
    assert counts == sorted(counts)
    messages = [(e["Message"], e["Severity"]) for e in step(result, 5)["events"]]
    assert ("line started", 300) in messages


@on_server_loop
async def test_wrong_password_is_reported_not_raised(harness: Harness) -> None:
    result = await arun_node_client(harness.script([{"op": "sleep", "seconds": 0}], password="wrong"), timeout=30)
    assert result["connected"] is False
    assert result["error"] in ("BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid"), result
    assert result["results"] == []


@on_server_loop
async def test_service_fault_user_access_denied(harness: Harness) -> None:
    script = harness.script(
        [{"op": "read", "path": ["SortingLine", "State"]}, {"op": "call", "path": ["SortingLine"], "method": "Start"}],
        userName="viewer",
        password=USERS["viewer"],
    )
    result = await arun_node_client(script, timeout=30)
    assert step(result, 0)["statusCode"] == "Good"
    assert step(result, 1)["statusCode"] == "BadUserAccessDenied"


@on_server_loop
async def test_security_mode_not_offered(harness: Harness) -> None:
    result = await arun_node_client(harness.script([], securityMode="None", securityPolicy="None"), timeout=30)
    assert result["connected"] is False
    assert result["error"], result


@on_server_loop
async def test_untrusted_server_certificate_is_refused(harness: Harness, tmp_path: Path) -> None:
    other, _ = make_certificate(tmp_path / "other.der", tmp_path / "other_key.pem", application_uri="urn:other")
    base = {"acceptServerCertificate": False}
    refused = await arun_node_client(harness.script([], **base, trustServerCertificate=str(other)), timeout=30)
    assert refused["connected"] is False
    trusted = await arun_node_client(
        harness.script([], **base, trustServerCertificate=str(harness.server_cert)), timeout=30
    )
    assert trusted["connected"] is True, trusted


def test_sync_runner_reports_unreachable_server_quickly() -> None:
    require_node()
    script = {"endpoint": f"opc.tcp://127.0.0.1:{_free_port()}/nothing", "maxRetry": 0, "steps": []}
    result = run_node_client(script, timeout=30)
    assert result["connected"] is False
    assert result["elapsed"] < 15
    assert result["error"]


def test_missing_client_fails_in_ci_and_skips_locally(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nodeclient, "CLIENT_DIR", tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make test"):
        require_node()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="make test"):
        require_node()
