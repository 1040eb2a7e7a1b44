"""The Sparkplug B edge node against a real mosquitto on loopback, read by a subscriber that decodes the
payloads with its own code (sim/spb_decode.py), not the product's protobuf classes."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from sim.plantenv import Broker, mosquitto_missing
from sim.spb_decode import Payload, decode_payload, encode_rebirth
from sorter.config import SparkplugConfig
from sorter.core.packml import State
from sorter.north.edge import EdgeNode
from tests.conftest import skip_or_fail_in_ci, wait_until, wait_until_blocking
from tests.test_metrics import make_stats

pytestmark = pytest.mark.wire

USERS = {"line": "s3cret", "host": "h0st"}
GROUP = "plant-test"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if (why := mosquitto_missing()) is not None:
        skip_or_fail_in_ci(why)
    b = Broker(tmp_path / "mqtt", users=USERS)
    b.start()
    yield b
    b.stop()


class Host:
    """A Sparkplug host application of sorts: every message of the group, decoded by sim/spb_decode."""

    def __init__(self, port: int) -> None:
        self.msgs: list[tuple[str, Payload]] = []
        self._lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-host")
        self.c.username_pw_set("host", USERS["host"])
        self.c.on_message = lambda c, u, m: self._add(m.topic, m.payload)
        self.c.connect("127.0.0.1", port, keepalive=5)
        self.c.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
        self.c.loop_start()

    def _add(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.msgs.append((topic, decode_payload(payload)))

    def of(self, kind: str) -> list[Payload]:
        with self._lock:
            return [p for t, p in self.msgs if t.split("/")[2] == kind]

    def command_rebirth(self, node: str) -> None:
        self.c.publish(f"spBv1.0/{GROUP}/NCMD/{node}", encode_rebirth(), qos=0)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def spb_cfg(port: int, **kw: object) -> SparkplugConfig:
    base: dict[str, object] = dict(
        port=port,
        group_id=GROUP,
        username="line",
        password=USERS["line"],
        keepalive_s=2,
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
        offline_alarm_s=0.5,
    )
    return SparkplugConfig(**(base | kw))  # type: ignore[arg-type]


async def test_birth_data_rebirth_and_death(broker: Broker) -> None:
    host = Host(broker.port)
    node = EdgeNode(spb_cfg(broker.port), "line-7", log=structlog.get_logger())
    node.publish(make_stats(line="line-7"))
    await node.start()
    try:
        await wait_until(lambda: len(host.of("NBIRTH")) == 1, 5, "NBIRTH")
        birth = host.of("NBIRTH")[0]
        v = birth.values()
        assert birth.seq == 0 and v["bdSeq"] == 0 and v["Node Control/Rebirth"] is False
        assert v["Line/State"] == "Execute" and v["Line/State Code"] == 6
        assert v["Fractions/ndfeb/Pieces"] == 20 and v["Fractions/residue/Pieces"] == 16
        assert v["Fractions/ferrite_smco/Purity Estimate"] is None  # NaN: no piece yet, sent as null
        assert v["Fractions/ndfeb/Purity Estimate"] == pytest.approx(0.99)
        assert v["Belt/Speed mm_s"] == 2500.0 and v["PLC/Online"] is True
        assert v["Cameras/cam1/Online"] is False and v["Cameras/cam0/Frames Dropped"] == 21
        assert v["Decision/Latency p99 ms"] == 180.0 and v["Model/Version"] == "m-1"
        assert v["Line/Pieces"] == 40
        assert all(m.timestamp is None or m.timestamp > 1.7e12 for m in birth.metrics)

        # only what changed goes out, in order, seq counting on from the birth
        node.publish(make_stats(line="line-7", state=State.HELD))
        node.publish(make_stats(line="line-7", state=State.HELD, fraction_counts={"ndfeb": 21, "residue": 16}))
        await wait_until(lambda: len(host.of("NDATA")) == 2, 5, "two NDATA")
        d1, d2 = host.of("NDATA")
        assert (d1.seq, d2.seq) == (1, 2)
        assert d1.values() == {"Line/State": "Held", "Line/State Code": 11}
        assert d2.values() == {"Fractions/ndfeb/Pieces": 21}
        # the same stats again: nothing to say
        node.publish(make_stats(line="line-7", state=State.HELD, fraction_counts={"ndfeb": 21, "residue": 16}))

        host.command_rebirth("line-7")
        await wait_until(lambda: len(host.of("NBIRTH")) == 2, 5, "rebirth")
        again = host.of("NBIRTH")[1]
        assert again.seq == 0 and again.values()["bdSeq"] == 0  # same session, same bdSeq
        assert again.values()["Fractions/ndfeb/Pieces"] == 21 and again.values()["Line/State"] == "Held"
        assert len(host.of("NDATA")) == 2
        assert node.condition() is None
    finally:
        await node.stop()
    await wait_until(lambda: len(host.of("NDEATH")) == 1, 5, "NDEATH at a clean stop")
    assert host.of("NDEATH")[0].values() == {"bdSeq": 0} and host.of("NDEATH")[0].seq is None
    host.close()


async def test_wrong_password_is_an_alarm_not_a_crash(broker: Broker) -> None:
    node = EdgeNode(spb_cfg(broker.port, password="wrong"), "line-8", log=structlog.get_logger())
    node.publish(make_stats(line="line-8"))
    await node.start()
    try:
        await wait_until(lambda: node.condition() is not None, 5, "sparkplug_offline alarm")
        cond = node.condition()
        assert cond is not None and cond.name == "sparkplug_offline"
        assert "refused" in cond.cause, cond.cause
        assert not node.born
    finally:
        await node.stop()


async def test_store_and_forward_across_a_broker_outage(broker: Broker) -> None:
    host = Host(broker.port)
    node = EdgeNode(spb_cfg(broker.port, buffer_max=3), "line-9", log=structlog.get_logger())
    node.publish(make_stats(line="line-9"))
    await node.start()
    try:
        await wait_until(lambda: len(host.of("NBIRTH")) == 1, 5, "NBIRTH")
        host.close()
        broker.stop()
        await wait_until(lambda: not node.born, 5, "the node notices the broker is gone")
        t_out = time.time() * 1000
        for n in range(21, 26):  # five changes, three kept: the two oldest are dropped and alarmed
            counts = {"ndfeb": n, "ferrite_smco": 0, "residue": 16}
            node.publish(make_stats(line="line-9", t=time.monotonic(), fraction_counts=counts))
            await asyncio.sleep(0.01)
        await wait_until(lambda: node.buffer.dropped == 2, 5, "buffer full")
        cond = node.condition()
        assert cond is not None and cond.name == "sparkplug_buffer_full"
        t_back = time.time() * 1000
        broker.start()
        host = Host(broker.port)
        await wait_until(lambda: len(host.of("NBIRTH")) >= 1 and len(host.of("NDATA")) >= 1, 10, "back")
        birth = host.of("NBIRTH")[0]
        assert birth.values()["bdSeq"] == 1  # the next session: refused attempts sent no CONNECT, no number
        assert birth.values()["Fractions/ndfeb/Pieces"] == 25  # the birth is the present
        hist = host.of("NDATA")[0]
        assert hist.seq == 1
        assert all(m.is_historical for m in hist.metrics)
        assert [m.value for m in hist.metrics if m.name == "Fractions/ndfeb/Pieces"] == [23, 24, 25]
        stamps = [m.timestamp for m in hist.metrics]
        # each at the time the line built its stats (LineStats.t, monotonic, mapped to wall time)
        assert all(s is not None and t_out - 5 <= s <= t_back for s in stamps), (t_out, t_back, stamps)
        assert stamps == sorted(stamps)
        assert stamps[-1] - stamps[0] >= 15
        await wait_until(lambda: node.condition() is None, 5, "alarms clear once drained")
        # live again: a change goes out at once, not historical
        node.publish(make_stats(line="line-9", state=State.SUSPENDED, fraction_counts={"ndfeb": 25, "residue": 16}))
        await wait_until(lambda: len(host.of("NDATA")) >= 2, 5, "live NDATA")
        live = host.of("NDATA")[-1]
        assert live.values(live_only=True) == {"Line/State": "Suspended", "Line/State Code": 5}
    finally:
        await node.stop()
        host.close()


def test_ndeath_when_the_line_service_is_killed(broker: Broker, tmp_path: Path) -> None:
    """`sorter run` of a line whose PLC and cameras are not there (it starts, alarms and waits for them), its
    edge node born on the broker; SIGKILL: the broker publishes the will, the NDEATH of that session."""
    import yaml

    root = Path(__file__).parent.parent
    raw = yaml.safe_load((root / "config" / "sim.yaml").read_text())
    raw.pop("simulator")
    raw |= {"line": "line-k", "hmi": None, "opcua_server": None, "magnetometer": None}
    raw["classifier"]["model"] = str(root / "models" / "sorter-cnn.onnx")
    raw["records"]["path"] = str(tmp_path / "records.sqlite")
    raw["plc"]["port"] = 1  # nothing there: the service holds its line and retries
    for cam in raw["cameras"]:
        cam["source"]["address"] = "127.0.0.1:1"
    raw["sparkplug"] = spb_cfg(broker.port).model_dump(mode="json")
    cfg = tmp_path / "line.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    host = Host(broker.port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sorter", "run", "--config", str(cfg), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_blocking(lambda: len(host.of("NBIRTH")) == 1 or proc.poll() is not None, 30, "NBIRTH")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        birth = host.of("NBIRTH")[0].values()
        assert birth["Line/Name"] == "line-k" and birth["PLC/Online"] is False
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        # the broker sends the will once keep-alive x1.5 (3 s) has passed without a word
        took = wait_until_blocking(lambda: len(host.of("NDEATH")) == 1, 8, "NDEATH from the will")
        assert host.of("NDEATH")[0].values() == {"bdSeq": birth["bdSeq"]}
        assert took < 6
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        host.close()


def test_payload_fields_are_what_the_spec_numbers_say() -> None:
    """The product's encoder and the independent decoder agree on a hand-checked payload (no broker)."""
    from sorter.north.sparkplug import DOUBLE, INT64, MetricValue, encode

    raw = encode([("a", MetricValue(INT64, -5), 123), ("b", MetricValue(DOUBLE, None), None)], timestamp_ms=7, seq=3)
    p = decode_payload(raw)
    assert (p.timestamp, p.seq) == (7, 3)
    assert dataclasses.astuple(p.metrics[0])[:4] == ("a", None, 123, 4) and p.metrics[0].value == -5
    assert p.metrics[1].is_null and p.metrics[1].datatype == 10 and p.metrics[1].value is None


async def test_a_broker_that_never_answers_is_left_and_retried() -> None:
    """A peer that takes the TCP connection and never answers the CONNECT (a hung broker, a wrong port)."""
    import socket

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        node = EdgeNode(
            spb_cfg(mute.getsockname()[1], keepalive_s=2, offline_alarm_s=0.5), "line-m", log=structlog.get_logger()
        )
        node.publish(make_stats(line="line-m"))
        await node.start()
        try:
            await wait_until(lambda: node.bdseq >= 1, 8, "a second attempt after the unanswered one")
            cond = node.condition()
            assert cond is not None and cond.name == "sparkplug_offline" and "did not a" in cond.cause, cond.cause
            assert not node.born
        finally:
            await node.stop()


async def test_tls_to_the_broker_checks_its_certificate(tmp_path: Path) -> None:
    """TLS with user/password: born with the broker's certificate as CA; refused (alarmed) with another CA."""
    from sorter.north.hmi.tls import make_server_certificate

    if (why := mosquitto_missing()) is not None:
        skip_or_fail_in_ci(why)
    cert, key = tmp_path / "broker.pem", tmp_path / "broker-key.pem"
    make_server_certificate(cert, key, hostnames=["127.0.0.1", "localhost"], common_name="test broker")
    other, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    make_server_certificate(other, other_key, hostnames=["127.0.0.1"], common_name="not the broker")
    b = Broker(tmp_path / "mqtt", users=USERS, tls=(cert, key))
    b.start()
    try:
        good = EdgeNode(spb_cfg(b.port, tls=True, ca_file=cert), "line-t", log=structlog.get_logger())
        bad = EdgeNode(spb_cfg(b.port, tls=True, ca_file=other, client_id="bad"), "line-u", log=structlog.get_logger())
        for n in (good, bad):
            n.publish(make_stats(line=n.node))
            await n.start()
        try:
            await wait_until(lambda: good.born, 10, "born over TLS")
            await wait_until(lambda: bad.condition() is not None, 10, "alarm for an unknown certificate")
            cond = bad.condition()
            assert cond is not None and "CERTIFICATE_VERIFY_FAILED" in cond.cause, cond.cause
            assert not bad.born and good.condition() is None
        finally:
            for n in (good, bad):
                await n.stop()
    finally:
        b.stop()
