"""Fuzzing the Hall bar's line protocol (docs/hall-bar.md) and the link's handling of what it parses.

Properties, each checked by hypothesis:
- `parse_line` on any bytes returns a DataLine or InfoLine or raises LineError with one of the documented
  reasons, nothing else; lines that look almost right (valid lines edited, cut, with junk, odd case) too;
- what `format_data` / `format_info` emit parses back to what they were given (wrapped counters), and
  they refuse (ValueError) what the protocol cannot carry instead of emitting a line the parser rejects;
- one edited byte (replaced, inserted or deleted) anywhere in a valid line is caught (LineError) or
  leaves the same report (a checksum digit changing case, a CR LF lost): the checksum and the strict
  field syntax never let a single corruption through as another reading;
- `LineSplitter` never raises, keeps its buffer bounded and yields the same valid lines however a
  stream is cut into chunks, and every line sent whole between noise comes out;
- `HallBar._feed` (the reader thread's handling of received bytes, without a port) never raises on
  any stream with any arrival times, and counts every line once, as ok or rejected by reason.

Time bound: everything is in-process, well under a millisecond per example for single lines and a few ms
for streams; the example counts below (300-1000) keep each test within about 0.5-3 s and the module
under 10 s on the 2-core machine (5000 examples of each took 75 s). `deadline=None` for the tests that
feed whole streams: their per-example time grows with the generated stream's length.
"""

from __future__ import annotations

import itertools
import re
from typing import get_args

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sorter.config import MagnetometerConfig
from sorter.drivers.hallbar import DataLine, HallBar, InfoLine, LineError, parse_line
from sorter.drivers.hallbar.protocol import (
    MAX_LINE_BYTES,
    SEQ_MOD,
    T_MOD,
    VALUE_MAX,
    VALUE_MIN,
    LineSplitter,
    Reason,
    checksum,
    format_data,
    format_info,
)

pytestmark = pytest.mark.fast

REASONS = set(get_args(Reason))
FW_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-"
PRINTABLE = bytes(range(0x20, 0x7F))

values16 = st.integers(VALUE_MIN, VALUE_MAX)
data_lines = st.builds(
    DataLine,
    seq=st.integers(0, SEQ_MOD - 1),
    t_us=st.integers(0, T_MOD - 1),
    values=st.lists(values16, min_size=1, max_size=256).map(tuple),
)
info_lines = st.builds(
    InfoLine,
    channels=st.integers(1, SEQ_MOD - 1),
    pitch_um=st.integers(0, T_MOD - 1),
    fw=st.text(FW_CHARS, min_size=1, max_size=32),
)
messages = st.one_of(data_lines, info_lines)


def encode(msg: DataLine | InfoLine) -> bytes:
    if isinstance(msg, DataLine):
        return format_data(msg.seq, msg.t_us, msg.values)
    return format_info(msg.channels, msg.pitch_um, msg.fw)


def parse_or_reason(line: bytes) -> DataLine | InfoLine | str:
    """The parsed report, or the reason it was rejected; anything but LineError propagates (a bug)."""
    try:
        return parse_line(line)
    except LineError as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason


# --- a line that is nearly right: a valid one edited ---


@st.composite
def edited_lines(draw: st.DrawFn) -> bytes:
    line = bytearray(encode(draw(messages)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "cut", "case", "junk"]))
        i = draw(st.integers(0, max(len(line) - 1, 0)))
        if op == "replace" and line:
            line[i] = draw(st.integers(0, 255))
        elif op == "insert":
            line[i:i] = bytes([draw(st.integers(0, 255))])
        elif op == "delete" and line:
            del line[i]
        elif op == "cut":
            del line[i:]
        elif op == "case":
            line = bytearray(line.swapcase())
        else:
            line[i:i] = draw(
                st.binary(min_size=1, max_size=8) | st.sampled_from([b"$", b"*", b",", b"\r\n", b"-", b"*00"])
            )
    return bytes(line)


@settings(max_examples=1000)
@given(st.binary(max_size=3000) | edited_lines())
@example(b"$*00")  # empty payload with a matching checksum
@example(b"$HB,1,2,3*" + f"{checksum(b'HB,1,2,3'):02x}".encode())  # lower-case checksum digits are fine
@example(b"$HB,1,2," + b"1," * 1100 + b"1*00")  # past MAX_LINE_BYTES
def test_parse_line_raises_only_line_error(line: bytes) -> None:
    got = parse_or_reason(line)
    if not isinstance(got, str):  # accepted: it must be exactly what the formatter makes of it (CR LF, case aside)
        assert encode(got).rstrip(b"\r\n").upper() == line.rstrip(b"\r\n").upper() or _non_canonical(line)


def _non_canonical(line: bytes) -> bool:
    """Numbers the parser accepts that the formatter writes otherwise: leading zeros, -0."""
    return re.search(rb"(^|,)-?0\d|(^|,)-0(,|\*)", line) is not None


@settings(max_examples=300)
@given(messages)
def test_formatted_lines_round_trip(msg: DataLine | InfoLine) -> None:
    line = encode(msg)
    assert line.startswith(b"$") and line.endswith(b"\r\n") and len(line) <= MAX_LINE_BYTES
    assert parse_line(line) == msg
    assert parse_line(line.rstrip(b"\r\n")) == msg  # CR LF optional
    star = line.rindex(b"*")
    assert parse_line(line[: star + 1] + line[star + 1 :].lower()) == msg  # either case of hex digits


@settings(max_examples=300)
@given(
    seq=st.integers(-(2**40), 2**40),
    t_us=st.integers(-(2**40), 2**40),
    values=st.lists(st.integers(-(2**20), 2**20), max_size=300),
    channels=st.integers(-10, 2**33),
    pitch_um=st.integers(-10, 2**33),
)
# bugs found: the formatters emitted each of these as a line, which parse_line then rejects
@example(seq=1, t_us=1, values=[40000], channels=48, pitch_um=12500)  # a value beyond int16
@example(seq=1, t_us=1, values=[1], channels=0, pitch_um=12500)  # no channels
@example(seq=1, t_us=1, values=[1], channels=SEQ_MOD, pitch_um=T_MOD)  # beyond the fields' types
@example(seq=1, t_us=1, values=[VALUE_MIN] * 300, channels=1, pitch_um=-1)  # a line past MAX_LINE_BYTES
def test_formatters_refuse_what_the_parser_would_reject(
    seq: int, t_us: int, values: list[int], channels: int, pitch_um: int
) -> None:
    """The simulator formats, the service parses: a formatter must never emit a line the parser rejects."""
    try:
        line = format_data(seq, t_us, values)
    except ValueError:
        payload = f"HB,{seq % SEQ_MOD},{t_us % T_MOD}," + ",".join(map(str, values))
        too_long = len(payload) + 6 > MAX_LINE_BYTES  # $ * CS CR LF
        assert not values or not all(VALUE_MIN <= v <= VALUE_MAX for v in values) or too_long
    else:
        assert parse_line(line) == DataLine(seq % SEQ_MOD, t_us % T_MOD, tuple(values))
    try:
        info = format_info(channels, pitch_um, "fw-1")
    except ValueError:
        assert not (1 <= channels < SEQ_MOD and 0 <= pitch_um < T_MOD)
    else:
        assert parse_line(info) == InfoLine(channels, pitch_um, "fw-1")


@settings(max_examples=1000)
@given(
    msg=messages,
    op=st.sampled_from(["replace", "insert", "delete"]),
    where=st.integers(0, 10_000),
    byte=st.integers(0, 255),
)
def test_one_corrupted_byte_never_passes_as_another_report(
    msg: DataLine | InfoLine, op: str, where: int, byte: int
) -> None:
    line = bytearray(encode(msg))
    i = where % (len(line) + (op == "insert"))
    if op == "replace":
        if line[i] == byte:
            return
        line[i] = byte
    elif op == "insert":
        line[i:i] = bytes([byte])
    else:
        del line[i]
    got = parse_or_reason(bytes(line))
    assert isinstance(got, str) or got == msg, (bytes(line), got)


# --- reassembly ---


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def split_all(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    sp = LineSplitter()
    out: list[tuple[str, bytes]] = []
    for c in chunks:
        out += sp.feed(c)
        assert len(sp._buf) <= MAX_LINE_BYTES  # bounded whatever arrives
    return out


def valid(items: list[tuple[str, bytes]]) -> list[DataLine | InfoLine]:
    out = []
    for kind, data in items:
        assert kind in ("line", "fragment")
        if kind == "line":
            assert data.endswith(b"\n")
            got = parse_or_reason(data)
            if not isinstance(got, str):
                out.append(got)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_splitter_is_indifferent_to_chunking(data: st.DataObject) -> None:
    parts = data.draw(st.lists(st.one_of(messages.map(encode), st.binary(max_size=300), edited_lines()), max_size=8))
    stream = b"".join(parts)
    whole = split_all([stream])
    pieces = split_all(data.draw(chunked(stream)))
    bytewise = split_all([stream[i : i + 1] for i in range(len(stream))]) if len(stream) < 4000 else pieces
    assert valid(whole) == valid(pieces) == valid(bytewise)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_whole_line_between_noise_comes_out(data: st.DataObject) -> None:
    """Noise between lines (no `$`: a `$` starts a line) may cost nothing but itself."""
    sent = data.draw(st.lists(messages, min_size=1, max_size=6))
    noise = st.binary(max_size=3000).map(lambda b: b.replace(b"$", b""))
    stream = b"".join(data.draw(noise) + encode(m) for m in sent) + data.draw(noise)
    assert valid(split_all(data.draw(chunked(stream)))) == sent


# --- the link's handling of what arrives ---


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, 8),
    stream=st.lists(
        st.tuples(
            st.one_of(
                st.builds(
                    lambda seq, t_us, vals: format_data(seq, t_us, vals),
                    st.integers(0, SEQ_MOD - 1),
                    st.integers(0, T_MOD - 1),
                    st.lists(values16, min_size=1, max_size=8),
                ),
                info_lines.map(encode),
                edited_lines(),
                st.binary(max_size=64),
            ),
            st.floats(0.0, 10.0, allow_nan=False),  # seconds since the previous chunk (0: read together)
        ),
        max_size=30,
    ),
)
@example(  # a board restart (seq and clock jump back) in the same read as the line before it
    channels=1,
    stream=[(format_data(10, 4_000_000, [5]), 0.0), (format_data(0, 0, [5]), 0.0), (format_data(1, 10_000, [5]), 0.01)],
)
def test_hallbar_feed_never_raises(channels: int, stream: list[tuple[bytes, float]]) -> None:
    cfg = MagnetometerConfig(port="/dev/null-fuzz", channels=channels)
    readings = []
    bar = HallBar(cfg, on_reading=readings.append, baseline_lines=20)
    now = 1000.0
    total_lines = 0
    sp = LineSplitter()
    for chunk, dt in stream:
        now += dt
        total_lines += len(sp.feed(chunk))
        bar._feed(chunk, now)
    c = bar.counters()
    assert c["lines_ok"] + c["lines_corrupt"] + c["info_lines"] == total_lines
    assert sum(c["rejects"].values()) == c["lines_corrupt"]
    assert len(readings) == c["lines_ok"] and c["sink_errors"] == 0
    for r in readings:
        assert r.values.shape == (channels,)
