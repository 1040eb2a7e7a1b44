"""A Sparkplug B payload decoder of its own, for the plant demo's subscriber and the tests.

It reads the protobuf wire format by hand (varints and length-delimited fields, the field numbers of the
Sparkplug 3.0 specification / Eclipse Tahu's sparkplug_b.proto) and shares no code with the product's
encoder (sorter/north/sparkplug.py, generated protobuf classes): a payload the product gets wrong the
same way on both sides cannot pass unnoticed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

# Metric value fields (oneof `value`): number -> how to read it
_INT_VALUE, _LONG_VALUE, _FLOAT_VALUE, _DOUBLE_VALUE, _BOOL_VALUE, _STRING_VALUE, _BYTES_VALUE = range(10, 17)
_INT64 = 4  # DataType Int64: the long_value is two's complement


class DecodeError(ValueError):
    pass


@dataclass
class Metric:
    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_historical: bool = False
    is_null: bool = False
    value: Any = None


@dataclass
class Payload:
    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)

    def values(self, *, live_only: bool = False) -> dict[str, Any]:
        """name -> value (None for null); `live_only` leaves out historical metrics."""
        return {m.name: m.value for m in self.metrics if m.name and not (live_only and m.is_historical)}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) of one message."""
    out = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        v: int | bytes
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i : i + n], i + n
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise DecodeError(f"wire type {wt} not expected")
        if i > len(buf):
            raise DecodeError("truncated field")
        out.append((num, wt, v))
    return out


def _metric(buf: bytes) -> Metric:
    m = Metric()
    for num, _, v in _fields(buf):
        if num == 1:
            m.name = v.decode()
        elif num == 2:
            m.alias = v
        elif num == 3:
            m.timestamp = v
        elif num == 4:
            m.datatype = v
        elif num == 5:
            m.is_historical = bool(v)
        elif num == 7:
            m.is_null = bool(v)
        elif num in (_INT_VALUE, _LONG_VALUE):
            m.value = v
        elif num == _FLOAT_VALUE:
            m.value = struct.unpack("<f", v)[0]
        elif num == _DOUBLE_VALUE:
            m.value = struct.unpack("<d", v)[0]
        elif num == _BOOL_VALUE:
            m.value = bool(v)
        elif num == _STRING_VALUE:
            m.value = v.decode()
        elif num == _BYTES_VALUE:
            m.value = bytes(v)
    if m.datatype == _INT64 and isinstance(m.value, int) and m.value >= 1 << 63:
        m.value -= 1 << 64
    if m.is_null:
        m.value = None
    return m


def decode_payload(buf: bytes) -> Payload:
    p = Payload()
    for num, _, v in _fields(buf):
        if num == 1:
            p.timestamp = v
        elif num == 2:
            p.metrics.append(_metric(v))
        elif num == 3:
            p.seq = v
    return p


def encode_rebirth() -> bytes:
    """An NCMD payload asking for a rebirth (`Node Control/Rebirth` = true), written by hand as well."""
    name = b"Node Control/Rebirth"
    metric = bytes([0x0A, len(name)]) + name + bytes([0x20, 11, 0x70, 1])  # name, datatype Boolean, value true
    return bytes([0x12, len(metric)]) + metric
