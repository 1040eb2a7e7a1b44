"""The virtual PLC's OPC UA server against asyncua's client on loopback, with a real VirtualPlc and belt.

An asyncua server takes ~2 s to load its standard address space, so the tests share one server per
security mode (module scope); each test starts from a reset PLC (belt stopped, queue empty, faults
cleared, watchdog unarmed) and continues from whatever seq the PLC last accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import argon2
import pytest
import pytest_asyncio
from asyncua import Client, Node, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError
from cryptography.x509.oid import ExtendedKeyUsageOID

from sim.belt import Belt
from sim.config import SimConfig, SimPlcOpcUaConfig
from sim.plc import CMD_RESET, CMD_START, CMD_STOP, ST_RUNNING, ST_WATCHDOG, ExecutedEject, VirtualPlc
from sim.plc_opcua import PlcOpcUaServer
from sorter.config import ModbusMap, PlcOpcUaConfig
from sorter.core.geometry import diff32, wrap32
from sorter.drivers.plc.modbus import ModbusClient
from tests.conftest import wait_until

pytestmark = [pytest.mark.wire, pytest.mark.asyncio(loop_scope="module")]

CPMM = 20.0
SPEED = 2500.0
RATE = CPMM * SPEED  # 50 000 counts/s
NS = "urn:magnet-sorter:plc"
REGS = ModbusMap()
WATCHDOG_MS = 300.0
QUEUE = 4
U16, U32, BOOL = ua.VariantType.UInt16, ua.VariantType.UInt32, ua.VariantType.Boolean


@dataclass
class Rig:
    belt: Belt
    plc: VirtualPlc
    server: PlcOpcUaServer
    fired: list[ExecutedEject] = field(default_factory=list)


async def make_rig(sim_opcua: SimPlcOpcUaConfig, modbus: bool) -> Rig:
    belt = Belt(CPMM, SPEED, encoder_start=1_000_000)
    fired: list[ExecutedEject] = []
    sim = SimConfig(watchdog_ms=WATCHDOG_MS, eject_queue_size=QUEUE)
    plc = VirtualPlc(REGS, belt, sim, banks=2, on_eject=fired.append, scan_s=0.001)
    if modbus:
        await plc.start("127.0.0.1", 0)  # also starts the scan
    server = PlcOpcUaServer(plc, PlcOpcUaConfig(endpoint="opc.tcp://127.0.0.1:0"), sim_opcua)
    await server.start()
    return Rig(belt, plc, server, fired)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared() -> AsyncIterator[Rig]:
    r = await make_rig(SimPlcOpcUaConfig(), modbus=True)
    try:
        yield r
    finally:
        await r.server.stop()
        await r.plc.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def rig(shared: Rig) -> Rig:
    """The shared rig, reset: belt stopped, queue flushed, valves off, faults cleared, watchdog unarmed."""
    plc = shared.plc
    plc.set_estop(True)  # stops the belt, flushes the queue, valves off
    plc.set_estop(False)
    plc.set_air_ok(True)
    plc.command = CMD_RESET
    await wait_until(lambda: plc.command == 0, what="reset executed")
    if not shared.server.reachable:
        await shared.server.set_reachable(True)
    shared.fired.clear()
    return shared


@dataclass
class Line:
    """A client's view of the line object."""

    client: Client
    idx: int
    node: Node

    async def var(self, name: str) -> Node:
        return await self.node.get_child(f"{self.idx}:{name}")

    async def read(self, name: str) -> object:
        return await (await self.var(name)).read_value()

    async def shows(self, name: str, want: Callable[[Any], bool]) -> bool:
        """Whether the variable's value (published by the PLC's scan) satisfies `want` now."""
        return want(await self.read(name))

    async def write_u16(self, name: str, value: int) -> None:
        await (await self.var(name)).write_value(ua.DataValue(ua.Variant(value, U16)))

    async def schedule(self, seq: int, bank: int, mask: int, open_at32: int, open_for: int) -> bool:
        types = (U16, U16, U32, U32, U16)
        args = [ua.Variant(v, t) for v, t in zip((seq, bank, mask, open_at32, open_for), types, strict=True)]
        return bool(await self.node.call_method(f"{self.idx}:ScheduleEject", *args))

    async def set_valve(self, bank: int, valve: int, on: bool) -> bool:
        args = (ua.Variant(bank, U16), ua.Variant(valve, U16), ua.Variant(on, BOOL))
        return bool(await self.node.call_method(f"{self.idx}:SetValve", *args))

    async def command(self, code: int) -> None:
        """Write the command, then wait for the PLC to set it back to 0, like the PC does."""
        await self.write_u16("Command", code)
        await wait_until(lambda: self.shows("Command", lambda v: v == 0), 1.0, "the command register back at 0")

    async def next_seq(self) -> int:
        last = await self.read("LastSeqAccepted")
        assert isinstance(last, int)
        return last % 0xFFFF + 1


async def open_line(client: Client) -> Line:
    idx = await client.get_namespace_index(NS)
    return Line(client, idx, await client.nodes.objects.get_child(f"{idx}:Line"))


@pytest_asyncio.fixture(loop_scope="module")
async def line(rig: Rig) -> AsyncIterator[Line]:
    async with Client(rig.server.endpoint, timeout=2) as client:
        yield await open_line(client)


class Beats:
    """Heartbeats over OPC UA every 30 ms while running (arms the watchdog)."""

    def __init__(self, line: Line) -> None:
        self.line = line
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        hb = await self.line.read("Heartbeat")
        assert isinstance(hb, int)
        while True:
            hb = (hb + 1) & 0xFFFF
            await self.line.write_u16("Heartbeat", hb)
            await asyncio.sleep(0.03)

    async def __aenter__(self) -> Beats:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# --- address space ---


async def test_browse_path_namespace_and_types(line: Line) -> None:
    client = line.client
    assert (await client.get_namespace_array())[line.idx] == NS
    assert line.node.nodeid.NamespaceIndex == line.idx
    names = [(await c.read_browse_name(), c) for c in await line.node.get_children()]
    assert {qn.NamespaceIndex for qn, _ in names} == {line.idx}
    by_name: dict[str, Node] = {str(qn.Name): c for qn, c in names}
    types = {
        "EncoderCount": U32,
        "BeltSpeed": ua.VariantType.Float,
        "Status": U16,
        "EjectQueueFree": U16,
        "LastSeqAccepted": U16,
        "EjectsDone": U32,
        "EjectsLate": U32,
        "Heartbeat": U16,
        "Command": U16,
        "ChuteCounts": U32,  # an array, one per bank (optional on a plant's PLC)
    }
    assert set(by_name) == {*types, "ScheduleEject", "SetValve"}
    for name, vt in types.items():
        node = by_name[name]
        assert await node.read_node_class() == ua.NodeClass.Variable
        assert await node.read_data_type_as_variant_type() == vt, name
        writable = ua.AccessLevel.CurrentWrite in await node.get_user_access_level()
        assert writable == (name in ("Heartbeat", "Command")), name
    for name in ("ScheduleEject", "SetValve"):
        assert await by_name[name].read_node_class() == ua.NodeClass.Method
    args = await (await by_name["ScheduleEject"].get_child("0:InputArguments")).read_value()
    assert [(a.Name, a.DataType.Identifier) for a in args] == [
        ("Seq", U16.value),
        ("Bank", U16.value),
        ("ValveMask", U32.value),
        ("OpenAt", U32.value),
        ("OpenFor", U16.value),
    ]
    # the browse path resolves through the server's TranslateBrowsePaths too
    node = await client.nodes.objects.get_child([f"{line.idx}:Line", f"{line.idx}:EncoderCount"])
    assert node.nodeid == by_name["EncoderCount"].nodeid


# --- values ---


async def test_encoder_count_is_the_count_at_the_read(rig: Rig, line: Line) -> None:
    rig.belt.start()
    for _ in range(5):
        before = rig.belt.count32()
        got = await line.read("EncoderCount")
        after = rig.belt.count32()
        assert isinstance(got, int)
        assert diff32(got, before) >= 0 and diff32(after, got) >= 0  # read between the two, not a scan's copy
    c0, t0 = await line.read("EncoderCount"), time.monotonic()
    await asyncio.sleep(0.1)
    c1, t1 = await line.read("EncoderCount"), time.monotonic()
    assert isinstance(c0, int) and isinstance(c1, int)
    assert diff32(c1, c0) == pytest.approx(RATE * (t1 - t0), rel=0.1)
    speed = await line.read("BeltSpeed")
    assert speed == pytest.approx(SPEED)


async def test_command_write_starts_and_stops_the_belt_and_reads_back_zero(rig: Rig, line: Line) -> None:
    await line.command(CMD_START)
    assert rig.belt.running
    await wait_until(lambda: rig.plc.command == 0)
    status = await line.read("Status")
    assert isinstance(status, int) and status & ST_RUNNING
    await line.command(CMD_STOP)
    assert not rig.belt.running
    await wait_until(lambda: line.shows("Status", lambda v: not v & ST_RUNNING), what="Status: belt stopped")


async def test_subscription_sees_last_seq_and_status_changes(rig: Rig, line: Line) -> None:
    seen: list[tuple[str, object]] = []

    class Handler:
        def datachange_notification(self, node: Node, val: object, data: object) -> None:
            seen.append((names[node.nodeid], val))

    nodes = [await line.var("LastSeqAccepted"), await line.var("Status")]
    names = {nodes[0].nodeid: "seq", nodes[1].nodeid: "status"}
    sub = await line.client.create_subscription(10, Handler())
    await sub.subscribe_data_change(nodes)
    await wait_until(lambda: len(seen) >= 2, what="initial values")
    async with Beats(line):
        await wait_until(lambda: rig.plc._armed, what="armed")
        seq = await line.next_seq()
        assert await line.schedule(seq, 0, 1, wrap32(rig.belt.count() + 100_000), 100)
        await wait_until(lambda: ("seq", seq) in seen, 1.0, "LastSeqAccepted notification")
        rig.belt.start()
        await wait_until(
            lambda: any(k == "status" and isinstance(v, int) and v & ST_RUNNING for k, v in seen),
            1.0,
            "Status notification with the running bit",
        )
    await sub.delete()


# --- ScheduleEject: the mailbox's sequence rules ---


async def test_schedule_eject_sequence_rules(rig: Rig, line: Line) -> None:
    plc = rig.plc
    at = wrap32(rig.belt.count() + 50_000)
    seq, last = await line.next_seq(), plc.last_seq
    assert not await line.schedule(seq, 0, 1, at, 100)  # watchdog not armed yet: nothing executes without a PC
    assert await line.read("LastSeqAccepted") == plc.last_seq == last
    async with Beats(line):
        await wait_until(lambda: plc._armed, what="armed")
        accepted = plc.accepted
        assert not await line.schedule(seq % 0xFFFF + 1, 0, 1, at, 100)  # skips one
        assert await line.schedule(seq, 0, 1, at, 100)
        assert not await line.schedule(seq, 0, 1, at, 100)  # the same again
        assert await line.read("LastSeqAccepted") == seq  # accepted at once, no scan needed
        assert plc.accepted == accepted + 1
        assert plc.queue[-1].seq == seq and plc.queue[-1].open_at32 == at

        plc.last_seq = 65534  # the wrap: 65535, then 1 (0 is skipped)
        assert await line.schedule(65535, 1, 2, at, 100)
        assert not await line.schedule(0, 1, 2, at, 100)
        assert await line.schedule(1, 1, 2, at, 100)
        assert [q.seq for q in plc.queue[-2:]] == [65535, 1]

        # a valve bank the PLC does not have: accepted (the seq moves on) but discarded
        invalid = plc.invalid
        assert await line.schedule(2, 7, 1, at, 100)
        assert plc.invalid == invalid + 1 and plc.last_seq == 2

        with pytest.raises(UaError, match="BadInvalidArgument"):  # Seq as a plain Int64
            await line.node.call_method(f"{line.idx}:ScheduleEject", 3, 0, 1, at, 100)
        with pytest.raises(UaError, match="BadArgumentsMissing"):
            await line.node.call_method(f"{line.idx}:ScheduleEject", ua.Variant(3, U16))
        assert plc.last_seq == 2


async def test_schedule_eject_refused_when_the_queue_is_full(rig: Rig, line: Line) -> None:
    plc = rig.plc
    at = wrap32(rig.belt.count() + 50_000)  # the belt stands: they stay queued
    async with Beats(line):
        await wait_until(lambda: plc._armed, what="armed")
        seq = await line.next_seq()
        for i in range(QUEUE):
            assert await line.schedule((seq + i - 1) % 0xFFFF + 1, 0, 1, at, 100)
        await wait_until(lambda: plc.queue_free == 0)
        nxt = (seq + QUEUE - 1) % 0xFFFF + 1
        assert not await line.schedule(nxt, 0, 1, at, 100)
        assert plc.last_seq == (nxt - 2) % 0xFFFF + 1
        assert not plc.overflow  # a refused call is answered, not latched like a mailbox overflow
        await wait_until(lambda: line.shows("EjectQueueFree", lambda v: v == 0), what="EjectQueueFree 0")


async def test_scheduled_command_fires_at_its_count(rig: Rig, line: Line) -> None:
    plc, belt = rig.plc, rig.belt
    async with Beats(line):
        await wait_until(lambda: plc._armed, what="armed")
        await line.command(CMD_START)
        done0, late0 = plc.executed, plc.late
        seq = await line.next_seq()
        open_at = belt.count() + round(0.15 * RATE)
        assert await line.schedule(seq, 1, 0x8000_0003, wrap32(open_at), 400)
        late_seq = seq % 0xFFFF + 1
        assert await line.schedule(late_seq, 0, 1, wrap32(belt.count() - 1000), 400)  # already passed
        assert plc.late == late0 + 1
        await wait_until(lambda: plc.executed == done0 + 1, what="the command fired")
        ex = rig.fired[-1]
        assert (ex.seq, ex.bank, ex.valve_mask, ex.open_for) == (seq, 1, 0x8000_0003, 400)
        assert ex.open_at == open_at  # unwrapped, exact
        assert abs(belt.count(ex.t_fire) - open_at) <= 1
        await wait_until(lambda: line.shows("EjectsDone", lambda v: v == plc.executed), what="EjectsDone")
        await wait_until(lambda: line.shows("EjectsLate", lambda v: v == plc.late), what="EjectsLate")


async def test_watchdog_trips_when_heartbeats_stop(rig: Rig, line: Line) -> None:
    plc = rig.plc
    async with Beats(line):
        await wait_until(lambda: plc._armed, what="armed")
        await asyncio.sleep(WATCHDOG_MS / 1000 * 1.5)  # longer than the watchdog: the beats keep it happy
        assert not plc.watchdog_tripped
        seq = await line.next_seq()
        assert await line.schedule(seq, 0, 1, wrap32(rig.belt.count() + 50_000), 100)
    t_stop = time.monotonic()
    await wait_until(lambda: plc.watchdog_tripped, WATCHDOG_MS / 1000 + 0.5, "the watchdog trip")
    assert time.monotonic() - t_stop >= WATCHDOG_MS / 1000 * 0.8
    assert plc.queue == []  # flushed
    await wait_until(lambda: line.shows("Status", lambda v: v & ST_WATCHDOG), what="Status: watchdog tripped")
    assert not await line.schedule(seq % 0xFFFF + 1, 0, 1, wrap32(rig.belt.count() + 50_000), 100)
    await line.command(CMD_RESET)
    assert not plc.watchdog_tripped
    await wait_until(lambda: line.shows("Status", lambda v: not v & ST_WATCHDOG), what="Status: watchdog clear")


async def test_set_valve_only_while_the_belt_stands(rig: Rig, line: Line) -> None:
    plc = rig.plc
    assert await line.set_valve(1, 5, True)
    assert plc.coil(1, 5)
    assert plc.coil_log[-1][1:] == (REGS.coil_valves + 32 + 5, True)
    assert await line.set_valve(1, 5, False)
    assert not plc.coil(1, 5)
    with pytest.raises(UaError, match="BadOutOfRange"):
        await line.set_valve(2, 0, True)  # the rig has two banks
    rig.belt.start()
    assert not await line.set_valve(0, 0, True)
    assert not plc.coil(0, 0)


# --- one PLC, two protocols ---


async def test_modbus_and_opcua_share_the_registers(rig: Rig, line: Line) -> None:
    mb = ModbusClient("127.0.0.1", rig.plc.port)
    await mb.connect()
    try:
        await line.write_u16("Heartbeat", 4242)
        assert await mb.read_holding_registers(REGS.hr_heartbeat, 1) == [4242]
        await mb.write_register(REGS.hr_heartbeat, 777)
        await wait_until(lambda: rig.plc.heartbeat == 777)
        await wait_until(lambda: line.shows("Heartbeat", lambda v: v == 777), what="Heartbeat published by the scan")
        await mb.write_register(REGS.hr_command, CMD_START)
        await wait_until(lambda: rig.belt.running, what="belt started over Modbus")
        await wait_until(lambda: line.shows("Command", lambda v: v == 0), what="Command back at 0")
        assert rig.plc.watchdog_tripped is False
    finally:
        mb.close()


# --- fault injection ---


async def test_set_reachable_restarts_on_the_same_port(rig: Rig) -> None:
    server = rig.server
    port = server.port
    client = Client(server.endpoint, timeout=1)
    await client.connect()
    try:
        line = await open_line(client)
        await line.read("Status")
        sub = await client.create_subscription(10, None)
        await sub.subscribe_data_change([await line.var("Status")])
        subscriptions = server._server.iserver.subscription_service.subscriptions  # type: ignore[union-attr]
        assert subscriptions
        await server.set_reachable(False)
        assert not server.reachable
        assert not subscriptions  # a restarted PLC has forgotten sessions and their subscriptions
        with pytest.raises((ConnectionError, OSError, asyncio.TimeoutError, UaError)):
            await line.read("Status")
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await server.set_reachable(True)
        assert server.port == port and server.reachable
        async with Client(server.endpoint, timeout=2) as fresh:
            assert await (await open_line(fresh)).read("Command") == 0
    finally:
        await client.disconnect()  # of a dead connection: must not hang
    assert rig.plc.reachable  # Modbus was never affected


# --- sign_encrypt ---


async def test_bad_security_config_is_refused_at_construction(rig: Rig) -> None:
    with pytest.raises(ValueError, match="needs certificate, private_key, trust_dir, username, password_hash"):
        PlcOpcUaServer(rig.plc, PlcOpcUaConfig(), SimPlcOpcUaConfig(security="sign_encrypt"))
    with pytest.raises(ValueError, match="not an argon2 hash"):
        PlcOpcUaServer(rig.plc, PlcOpcUaConfig(), SimPlcOpcUaConfig(username="u", password_hash="s3cret"))
    with pytest.raises(ValueError, match="must be opc"):
        PlcOpcUaServer(rig.plc, PlcOpcUaConfig(endpoint="http://127.0.0.1:4840"), SimPlcOpcUaConfig())


@dataclass
class Pki:
    server_cert: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    (d / "trusted").mkdir()
    server_auth, client_auth = [ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.CLIENT_AUTH]
    await setup_self_signed_certificate(
        d / "plc-key.pem", d / "plc-cert.der", "urn:test:plc", "localhost", server_auth, {"commonName": "plc"}
    )
    await setup_self_signed_certificate(
        d / "pc-key.pem", d / "trusted/pc-cert.der", "urn:test:pc", "localhost", client_auth, {"commonName": "pc"}
    )
    await setup_self_signed_certificate(
        d / "x-key.pem", d / "x-cert.der", "urn:test:x", "localhost", client_auth, {"commonName": "x"}
    )
    return Pki(d / "plc-cert.der", d / "trusted/pc-cert.der", d / "pc-key.pem", d / "x-cert.der", d / "x-key.pem")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def secure(pki: Pki) -> AsyncIterator[Rig]:
    d = pki.server_cert.parent
    cfg = SimPlcOpcUaConfig(
        security="sign_encrypt",
        certificate=pki.server_cert,
        private_key=d / "plc-key.pem",
        trust_dir=d / "trusted",
        username="sorter",
        password_hash=argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash("s3cret"),
    )
    r = await make_rig(cfg, modbus=False)
    try:
        yield r
    finally:
        await r.server.stop()


async def secure_client(rig: Rig, pki: Pki, cert: Path, key: Path, user: str | None, password: str | None) -> Client:
    client = Client(rig.server.endpoint, timeout=2)
    client.application_uri = "urn:test:pc"
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(cert),
        private_key=str(key),
        server_certificate=str(pki.server_cert),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
    if password is not None:
        client.set_password(password)
    return client


async def test_sign_encrypt_trusted_client_with_password_gets_in(secure: Rig, pki: Pki) -> None:
    endpoints = await secure.server._server.get_endpoints()  # type: ignore[union-attr]
    assert {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode) for e in endpoints} == {
        ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)
    }
    client = await secure_client(secure, pki, pki.client_cert, pki.client_key, "sorter", "s3cret")
    async with client:
        line = await open_line(client)
        await line.write_u16("Heartbeat", 9)  # a user may write
        assert secure.plc.heartbeat == 9
        assert await line.read("LastSeqAccepted") == 0
        assert await line.set_valve(0, 3, True)  # and call
    for _ in range(2):  # again: the verified password is remembered, the argon2 check not repeated
        async with await secure_client(secure, pki, pki.client_cert, pki.client_key, "sorter", "s3cret"):
            pass


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("wrong password", "BadUserAccessDenied"),
        ("unknown user", "BadUserAccessDenied"),
        ("untrusted certificate", "BadCertificateUntrusted"),
        ("anonymous", "BadIdentityTokenRejected"),
        ("no security", "BadUserAccessDenied"),
    ],
)
async def test_sign_encrypt_refuses(
    secure: Rig, pki: Pki, who: str, status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if who == "no security":
        client = Client(secure.server.endpoint, timeout=2)
        client.set_user("sorter")
        client.set_password("s3cret")
        # asyncua's client gives up by itself when the server offers no None endpoint; make it insist,
        # to see that the server refuses a session on a channel without a (trusted) certificate
        monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: eps[0]))
    else:
        cert, key = (
            (pki.stranger_cert, pki.stranger_key)
            if who == "untrusted certificate"
            else (pki.client_cert, pki.client_key)
        )
        user, password = {
            "wrong password": ("sorter", "guess"),
            "unknown user": ("admin", "s3cret"),
            "anonymous": (None, None),
        }.get(who, ("sorter", "s3cret"))
        client = await secure_client(secure, pki, cert, key, user, password)
    with pytest.raises(UaError) as err:
        await client.connect()
    with contextlib.suppress(Exception):
        await client.disconnect()
    assert type(err.value).__name__ == status
