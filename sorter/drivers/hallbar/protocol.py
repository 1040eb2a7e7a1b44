"""The Hall bar's line protocol (docs/hall-bar.md): one ASCII line per report, NMEA style.

    $HB,<seq>,<t_us>,<v0>,...,<vN-1>*<CS>\r\n     data: peak reading of each channel since the last data line
    $HI,<channels>,<pitch_um>,<fw>*<CS>\r\n       info: what the bar is, at start and about once a second

CS is the XOR of every byte between `$` and `*`, as two hex digits. `$` only ever
starts a line, so a receiver that sees `$` inside a line knows the line before
it was cut short. Both sides of the wire use this module: the service parses,
the simulator formats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SEQ_MOD = 1 << 16
T_MOD = 1 << 32
VALUE_MIN, VALUE_MAX = -32768, 32767  # mT; a reading outside int16 is a corrupt line, not a field
MAX_LINE_BYTES = 2048  # 256 channels of "-32768," fit; anything longer is garbage
FW_RE = re.compile(r"[A-Za-z0-9._+-]{1,32}")
_UINT = re.compile(r"\d{1,10}")
_INT = re.compile(r"-?\d{1,5}")
_HEX = b"0123456789ABCDEFabcdef"
BITS_PER_BYTE = 10  # 8N1: start bit + 8 data bits + stop bit

Reason = Literal["empty", "garbage", "truncated", "checksum", "fields", "number", "range", "unknown_type", "too_long"]


class LineError(ValueError):
    """A line that is not a valid report; `reason` is one of `Reason` (counted per reason)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DataLine:
    seq: int  # uint16, +1 per data line sent, wraps
    t_us: int  # the board's free-running microsecond clock when the line was latched, uint32, wraps
    values: tuple[int, ...]  # mT, signed peak (the sample of largest |B|) per channel over the line's interval


@dataclass(frozen=True, slots=True)
class InfoLine:
    channels: int
    pitch_um: int
    fw: str


def checksum(payload: bytes) -> int:
    cs = 0
    for b in payload:
        cs ^= b
    return cs


def _frame(payload: str) -> bytes:
    body = payload.encode("ascii")
    line = b"$" + body + b"*" + f"{checksum(body):02X}".encode("ascii") + b"\r\n"
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"a line of {len(line)} bytes is longer than the protocol's {MAX_LINE_BYTES}")
    return line


# The formatters refuse what the protocol cannot carry (ValueError): a line parse_line() would reject must
# never be sent as if it were a reading. Counters wrap, as on the wire.


def format_data(seq: int, t_us: int, values: tuple[int, ...] | list[int]) -> bytes:
    if not values:
        raise ValueError("a data line needs at least one channel")
    ints = [int(v) for v in values]
    if bad := [(i, v) for i, v in enumerate(ints) if not VALUE_MIN <= v <= VALUE_MAX]:
        raise ValueError(f"channel {bad[0][0]}: {bad[0][1]} mT is outside {VALUE_MIN}..{VALUE_MAX} (clip it)")
    return _frame(f"HB,{seq % SEQ_MOD},{t_us % T_MOD}," + ",".join(map(str, ints)))


def format_info(channels: int, pitch_um: int, fw: str) -> bytes:
    if not FW_RE.fullmatch(fw):
        raise ValueError(f"firmware tag {fw!r} must match {FW_RE.pattern}")
    if not 1 <= channels < SEQ_MOD:
        raise ValueError(f"channels {channels} must be 1..{SEQ_MOD - 1}")
    if not 0 <= pitch_um < T_MOD:
        raise ValueError(f"pitch_um {pitch_um} must be 0..{T_MOD - 1}")
    return _frame(f"HI,{channels},{pitch_um},{fw}")


def wire_seconds(nbytes: int, baudrate: int) -> float:
    """How long `nbytes` take on an 8N1 serial line."""
    return nbytes * BITS_PER_BYTE / baudrate


def _uint(field: str, what: str, limit: int) -> int:
    if not _UINT.fullmatch(field):
        raise LineError("number", f"{what} {field[:16]!r} is not an unsigned integer")
    v = int(field)
    if v >= limit:
        raise LineError("range", f"{what} {v} >= {limit}")
    return v


def parse_line(line: bytes) -> DataLine | InfoLine:
    """Parse one line (with or without its CR LF); raises LineError saying why a line is bad."""
    if len(line) > MAX_LINE_BYTES:
        raise LineError("too_long", f"{len(line)} bytes")
    line = line.rstrip(b"\r\n")
    if not line:
        raise LineError("empty", "empty line")
    if line[:1] != b"$":
        raise LineError("garbage", f"does not start with '$': {line[:24]!r}")
    star = line.rfind(b"*")
    if star < 0:
        raise LineError("truncated", f"no checksum: {line[:24]!r}...")
    cs = line[star + 1 :]
    if len(cs) != 2 or any(c not in _HEX for c in cs):
        raise LineError("truncated" if len(cs) < 2 else "garbage", f"bad checksum field {cs[:8]!r}")
    body = line[1:star]
    if checksum(body) != int(cs, 16):
        raise LineError("checksum", f"computed {checksum(body):02X}, line says {cs.decode()}")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:  # XOR can miss two errors that cancel; non-ASCII is still garbage
        raise LineError("garbage", "non-ASCII bytes") from None
    fields = text.split(",")
    kind = fields[0]
    if kind == "HB":
        if len(fields) < 4:
            raise LineError("fields", f"data line with {len(fields)} fields")
        seq = _uint(fields[1], "seq", SEQ_MOD)
        t_us = _uint(fields[2], "t_us", T_MOD)
        values = []
        for i, f in enumerate(fields[3:]):
            if not _INT.fullmatch(f):
                raise LineError("number", f"channel {i}: {f[:16]!r} is not an integer")
            v = int(f)
            if not VALUE_MIN <= v <= VALUE_MAX:
                raise LineError("range", f"channel {i}: {v} mT")
            values.append(v)
        return DataLine(seq, t_us, tuple(values))
    if kind == "HI":
        if len(fields) != 4:
            raise LineError("fields", f"info line with {len(fields)} fields")
        channels = _uint(fields[1], "channels", 1 << 16)
        pitch_um = _uint(fields[2], "pitch_um", 1 << 32)
        if channels < 1:
            raise LineError("range", "0 channels")
        if not FW_RE.fullmatch(fields[3]):
            raise LineError("garbage", f"firmware tag {fields[3][:40]!r}")
        return InfoLine(channels, pitch_um, fields[3])
    raise LineError("unknown_type", f"line type {kind[:8]!r}")


class LineSplitter:
    """Reassembles lines from a byte stream.

    Yields ("line", bytes) for each LF-terminated line and ("fragment", bytes)
    for bytes that cannot be a whole line: a line cut short (a new `$` arrived
    before its LF) or one running past MAX_LINE_BYTES. Bytes before the first
    `$` of a stream are the tail of a line sent before we listened: dropped
    silently, they are not an error of the bar.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._synced = False

    def reset(self) -> None:
        self._buf.clear()
        self._synced = False

    def feed(self, data: bytes) -> list[tuple[Literal["line", "fragment"], bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[Literal["line", "fragment"], bytes]] = []
        if not self._synced:
            start = buf.find(b"$")
            if start < 0:
                buf.clear()
                return out
            del buf[:start]
            self._synced = True
        while buf:
            nl = buf.find(b"\n")
            dollar = buf.find(b"$", 1)
            if dollar >= 0 and (nl < 0 or dollar < nl):
                out.append(("fragment", bytes(buf[:dollar])))
                del buf[:dollar]
                continue
            if nl < 0:
                if len(buf) > MAX_LINE_BYTES:
                    out.append(("fragment", bytes(buf)))
                    buf.clear()
                    self._synced = False  # the rest of this overlong line is dropped up to the next '$'
                break
            out.append(("line", bytes(buf[: nl + 1])))
            del buf[: nl + 1]
        return out
