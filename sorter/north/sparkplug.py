"""Sparkplug B over MQTT: the one module that imports paho-mqtt and the Sparkplug protobuf payload.

The edge node (sorter/north/edge.py) sees only what is here: metric values with their Sparkplug
datatype, payload encoding and decoding, topics, and `MqttSession`, a paho client owned by exactly one
thread (the edge node's worker), which calls `loop()` itself: nothing here starts a thread of its own,
so the session never touches the service's loop and an API change of paho touches this file only.

The payload schema is sorter/north/spb/sparkplug_b.proto (the Tahu field numbers), compiled to
sparkplug_b_pb2.py at dev time (docs/plant-data.md says why and how).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion

from sorter.config import SparkplugConfig
from sorter.north.spb import sparkplug_b_pb2 as pb

NAMESPACE = "spBv1.0"

# Sparkplug datatypes used here (sparkplug_b.proto, DataType)
INT32 = pb.Int32
INT64 = pb.Int64
UINT64 = pb.UInt64
DOUBLE = pb.Double
BOOLEAN = pb.Boolean
STRING = pb.String

REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"

Scalar = int | float | bool | str


class SparkplugError(Exception):
    """The broker cannot be reached, refused the connection, or a payload cannot be decoded."""


@dataclass(frozen=True, slots=True)
class MetricValue:
    datatype: int
    value: Scalar | None  # None (and a float NaN): sent as is_null

    @classmethod
    def of(cls, datatype: int, value: Scalar | None) -> MetricValue:
        if isinstance(value, float) and math.isnan(value):
            value = None  # NaN is never equal to itself: as null, an unchanged unknown is not sent again
        return cls(datatype, value)


@dataclass(frozen=True, slots=True)
class DecodedMetric:
    name: str
    value: MetricValue
    timestamp_ms: int | None
    historical: bool


def topic(group_id: str, kind: str, edge_node_id: str, device: str | None = None) -> str:
    """spBv1.0/<group>/<NBIRTH|NDATA|NDEATH|NCMD|...>/<edge node>[/<device>]"""
    parts = [NAMESPACE, group_id, kind, edge_node_id]
    if device is not None:
        parts.append(device)
    return "/".join(parts)


def _set_value(m: Any, v: MetricValue) -> None:
    m.datatype = v.datatype
    if v.value is None:
        m.is_null = True
    elif v.datatype == BOOLEAN:
        m.boolean_value = bool(v.value)
    elif v.datatype in (INT64, UINT64):
        # unsigned 64-bit on the wire; a signed Int64 travels as its two's complement (the spec's rule)
        m.long_value = int(v.value) & 0xFFFFFFFFFFFFFFFF
    elif v.datatype == INT32:
        m.int_value = int(v.value) & 0xFFFFFFFF
    elif v.datatype == DOUBLE:
        m.double_value = float(v.value)
    elif v.datatype == STRING:
        m.string_value = str(v.value)
    else:
        raise ValueError(f"datatype {v.datatype} is not used by this edge node")


def encode(
    metrics: Iterable[tuple[str, MetricValue, int | None]],
    *,
    timestamp_ms: int,
    seq: int | None,
    historical: bool = False,
) -> bytes:
    """A payload of (name, value, metric timestamp or None) metrics; seq None for NDEATH."""
    p = pb.Payload()
    p.timestamp = timestamp_ms
    if seq is not None:
        p.seq = seq
    for name, v, ts in metrics:
        m = p.metrics.add()
        m.name = name
        if ts is not None:
            m.timestamp = ts
        if historical:
            m.is_historical = True
        _set_value(m, v)
    return p.SerializeToString()


def decode(data: bytes) -> tuple[int | None, list[DecodedMetric]]:
    """(seq, metrics) of a payload; SparkplugError if it is not one."""
    p = pb.Payload()
    try:
        p.ParseFromString(data)
    except DecodeError as exc:
        raise SparkplugError(f"not a Sparkplug B payload: {exc}") from None
    out = []
    for m in p.metrics:
        kind = m.WhichOneof("value")
        value: Scalar | None = None if m.is_null or kind is None else getattr(m, kind)
        if m.datatype == INT64 and isinstance(value, int) and value >= 1 << 63:
            value -= 1 << 64
        out.append(
            DecodedMetric(
                m.name,
                MetricValue(m.datatype, value),
                m.timestamp if m.HasField("timestamp") else None,
                m.is_historical,
            )
        )
    return (p.seq if p.HasField("seq") else None), out


class MqttSession:
    """One MQTT connection, driven by its owner's thread through `loop()` (MQTT 3.1.1, clean session, as
    Sparkplug 3.0 asks). `on_message(topic, payload)` and `on_connected()` are called from `loop()`."""

    def __init__(
        self,
        cfg: SparkplugConfig,
        client_id: str,
        *,
        on_message: Callable[[str, bytes], None],
        on_connected: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.error: str | None = None  # why the last connection failed or ended
        self._on_message = on_message
        self._on_connected = on_connected
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        self._client.connect_timeout = 5.0
        if cfg.username is not None:
            self._client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            if cfg.certificate is not None and cfg.private_key is not None:
                ctx.load_cert_chain(str(cfg.certificate), str(cfg.private_key))
            self._client.tls_set_context(ctx)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self.connected = False  # the broker accepted the session (CONNACK success)
        self._socket_open = False
        self._failed = False  # this attempt's error is known (a later, vaguer one must not replace it)

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.cfg.tls else 'mqtt'}://{self.cfg.host}:{self.cfg.port}"

    def connect(self, will_topic: str, will_payload: bytes) -> None:
        """Open the connection with this will (the NDEATH); the broker's answer comes through `loop()`."""
        self._failed = False
        self._client.will_clear()
        # the will is QoS 1 and not retained (Sparkplug 3.0): the broker delivers it once the line is gone
        self._client.will_set(will_topic, will_payload, qos=1, retain=False)
        try:
            self._client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.fail(f"cannot reach the MQTT broker at {self.address}: {exc}")
            raise SparkplugError(self.error) from None
        self._socket_open = True

    def loop(self, timeout: float) -> bool:
        """Network I/O for up to `timeout` s; False once the connection is gone (then connect() again)."""
        if not self._socket_open:
            return False
        rc = self._client.loop(timeout=timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.fail(f"connection to the MQTT broker at {self.address} lost ({mqtt.error_string(rc)})")
            self._drop()
            return False
        return self._socket_open

    def publish(self, topic_: str, payload: bytes, qos: int = 0) -> Any:
        """Queue a message; returns paho's MQTTMessageInfo (is_published() once written), None if not queued."""
        info = self._client.publish(topic_, payload, qos=qos, retain=False)
        return None if info.rc != mqtt.MQTT_ERR_SUCCESS else info

    def subscribe(self, topic_: str, qos: int = 0) -> None:
        self._client.subscribe(topic_, qos=qos)

    def disconnect(self) -> None:
        """A clean DISCONNECT: the broker drops the will (publish the NDEATH first)."""
        if self._socket_open:
            self._client.disconnect()
            self._client.loop(timeout=0.1)
        self._drop()

    def fail(self, why: str) -> None:
        """Why this attempt or session failed; the first reason given stands until the next connect()."""
        if not self._failed:
            self._failed = True
            self.error = why

    def _drop(self) -> None:
        # paho closes the socket itself when loop() fails or a CONNACK refuses; connect() opens a new one
        self.connected = False
        self._socket_open = False

    # paho callbacks, called from loop() on the owner's thread
    def _connected(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if reason.is_failure:
            self.fail(f"the MQTT broker at {self.address} refused the connection: {reason}")
            self._drop()
            return
        self.connected = True
        self.error = None
        self._on_connected()

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if self.connected:
            self.fail(f"the MQTT broker at {self.address} closed the connection ({reason})")
        else:
            self.fail(f"the MQTT broker at {self.address} did not accept the connection ({reason})")
        self.connected = False
        self._socket_open = False

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._on_message(msg.topic, bytes(msg.payload))


def metric_map(metrics: Mapping[str, MetricValue]) -> list[tuple[str, MetricValue, int | None]]:
    """Metrics without timestamps of their own (they share the payload's)."""
    return [(k, v, None) for k, v in metrics.items()]
