"""The Hall-sensor bar in-process: its line protocol, the board clock sync and the field map's gaps.
The bar on a real pty is tests/test_hallbar_wire.py."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from sim.hallbar import garble
from sorter.config import MagnetometerConfig
from sorter.drivers.hallbar import BarReading, BoardClock, DataLine, FieldMap, InfoLine, LineError, parse_line
from sorter.drivers.hallbar.protocol import LineSplitter, checksum, format_data, format_info, wire_seconds
from sorter.drivers.hallbar.sync import lower_envelope

ROOT = Path(__file__).resolve().parents[1]
CPMM = 20.0
SPEED = 2500.0
T_MOD = 1 << 32

pytestmark = pytest.mark.fast

# --- protocol ---


def test_data_and_info_lines_round_trip() -> None:
    values = (0, -1, 412, -32768, 32767, 7)
    line = format_data(65535, T_MOD - 1, values)
    assert line.startswith(b"$HB,65535,4294967295,0,-1,412,") and line.endswith(b"\r\n")
    assert parse_line(line) == DataLine(65535, T_MOD - 1, values)
    assert parse_line(line.rstrip(b"\r\n")) == DataLine(65535, T_MOD - 1, values)  # CR LF optional
    assert format_data(65536, T_MOD, (1,)) == format_data(0, 0, (1,))  # counters wrap on the wire
    info = format_info(48, 12500, "fw-2.1")
    assert parse_line(info) == InfoLine(48, 12500, "fw-2.1")
    # NMEA-style checksum: XOR of the bytes between '$' and '*', two hex digits
    body = info[1 : info.index(b"*")]
    assert info[-4:-2] == f"{checksum(body):02X}".encode()
    assert wire_seconds(len(line), 115200) == pytest.approx(len(line) * 10 / 115200)


def _with_cs(payload: str) -> bytes:
    body = payload.encode()
    return b"$" + body + f"*{checksum(body):02X}\r\n".encode()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"", "empty"),
        (b"\r\n", "empty"),
        (b"HB,1,2,3*00\r\n", "garbage"),
        (b"$HB,1,2,3,4\r\n", "truncated"),
        (b"$HB,1,2,3,4*3", "truncated"),
        (b"$HB,1,2,3,4*ZZ\r\n", "garbage"),
        (b"$HB,1,2,3,4*00\r\n", "checksum"),
        (_with_cs("HB,1,2"), "fields"),
        (_with_cs("HB,1,2,"), "number"),
        (_with_cs("HB,1,2,3,x4"), "number"),
        (_with_cs("HB,1,2,3,+4"), "number"),
        (_with_cs("HB,1,2,3, 4"), "number"),
        (_with_cs("HB,65536,2,3"), "range"),
        (_with_cs("HB,1,4294967296,3"), "range"),
        (_with_cs("HB,1,2,40000"), "range"),
        (_with_cs("HI,48,12500"), "fields"),
        (_with_cs("HI,0,12500,fw"), "range"),
        (_with_cs("HI,48,12500,f w"), "garbage"),
        (_with_cs("HX,1,2,3"), "unknown_type"),
        (b"$HB,1,2,\xff*" + f"{checksum(b'HB,1,2,' + bytes([0xFF])):02X}".encode() + b"\r\n", "garbage"),
        (b"$HB,1,2," + b"1," * 2000 + b"1*00\r\n", "too_long"),
    ],
)
def test_bad_lines_are_rejected_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(LineError) as err:
        parse_line(line)
    assert err.value.reason == reason


def test_splitter_resyncs_and_reports_cut_lines() -> None:
    a, b = format_data(1, 10, (1, 2)), format_data(2, 20, (3, 4))
    sp = LineSplitter()
    # the tail of a line sent before we listened is dropped silently; lines split across reads reassemble
    assert sp.feed(b"3,4*1F\r\n" + a[:5]) == []
    assert sp.feed(a[5:] + b[:3]) == [("line", a)]
    # a line cut short: the next '$' shows it
    assert sp.feed(b"4,5") == []
    assert sp.feed(b + b"junk\r\n") == [("fragment", b[:3] + b"4,5"), ("line", b), ("line", b"junk\r\n")]
    # a runaway line without LF is reported once, then the stream resyncs at the next '$'
    out = sp.feed(b"$HB," + b"9" * 3000)
    assert [k for k, _ in out] == ["fragment"]
    assert sp.feed(b"99999\r\n" + a) == [("line", a)]  # the runaway's tail is dropped up to the next '$'
    assert sp.feed(b"") == []


def test_garbled_lines_are_each_exactly_one_bad_line() -> None:
    rng = random.Random(3)
    kinds: dict[str, int] = {}
    for i in range(2000):
        line = format_data(i, i * 1000, tuple(rng.randint(-400, 400) for _ in range(48)))
        bad, kind = garble(line, rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        nxt = format_data(i + 1, i * 1000 + 500, (1,) * 48)
        sp = LineSplitter()
        items = sp.feed(b"$" + b"\r\n" + bad + nxt)[1:]  # an empty first line syncs the splitter
        assert len(items) == 2, (kind, bad)
        (k0, d0), (k1, d1) = items
        assert k1 == "line" and parse_line(d1) == parse_line(nxt)
        if k0 == "line":
            with pytest.raises(LineError):
                parse_line(d0)
    assert set(kinds) == {"flip", "replace", "truncate", "junk"}


# --- board clock sync ---


def test_lower_envelope_ignores_points_above_it() -> None:
    pts = [(float(x), 0.5 + 0.001 * x + (0.3 if x % 3 else 0.0)) for x in range(30)]
    a, d = lower_envelope(pts, max_slope=0.01)
    assert a == pytest.approx(0.5) and d == pytest.approx(0.001)
    a, d = lower_envelope(pts, max_slope=0.0005)  # a clamped slope still lies under every point
    assert d == pytest.approx(0.0005) and all(y >= a + d * x - 1e-12 for x, y in pts)


def test_board_clock_follows_drift_wrap_and_delay_spikes() -> None:
    rng = np.random.default_rng(5)
    ppm = 80.0
    start_us = T_MOD - 3_000_000  # the board clock wraps 3 s in
    t0 = 1000.0
    clk = BoardClock()
    errors = []
    t = t0
    prev_ext = -1
    while t < t0 + 40.0:
        t += rng.uniform(0.008, 0.016)
        t_us = (start_us + round((t - t0) * (1 + ppm * 1e-6) * 1e6)) % T_MOD
        wire = rng.integers(120, 300) * 10 / 115200
        latency = 0.0002 + rng.exponential(0.0008)
        if rng.random() < 0.05:
            latency += rng.uniform(0.02, 0.3)  # USB hiccups, a busy reader thread
        ext, stepped = clk.add(int(t_us), t + wire + latency, wire)
        assert not stepped and ext > prev_ext  # unwrapped through the wrap
        prev_ext = ext
        if t > t0 + 10.0:
            errors.append(clk.to_pc(ext) - t)
    err = np.abs(errors)
    assert err.max() < 0.0006, err.max()  # sub-ms everywhere: < 1.5 mm of belt at 2.5 m/s
    assert np.median(err) < 0.0003
    assert clk.ppm == pytest.approx(ppm, abs=5.0)


def test_board_clock_resets_on_a_board_restart() -> None:
    clk = BoardClock()
    t = 50.0
    for i in range(100):
        clk.add(4_000_000_000 + i * 10_000, t + i * 0.01 + 0.002, 0.001)
    _, stepped = clk.add(1234, t + 1.0 + 0.002, 0.001)  # restarted: the stamp bears no relation to the last
    assert stepped and clk.resets == 1
    assert clk.to_pc(0) == pytest.approx(t + 1.0 + 0.001, abs=1e-9)


# --- the field map ---


def test_fieldmap_gaps_and_channel_choice() -> None:
    mag = MagnetometerConfig(port="/dev/null", channels=8, pitch_mm=10.0, first_channel_x_mm=5.0, distance_mm=100.0)
    t_to_count = {float(i): 1000.0 * i for i in range(20)}
    fmap = FieldMap(mag, 10.0, t_to_count.__getitem__, margin_mm=0.0)
    assert fmap.covered_until() is None
    assert fmap.channels_for(12.0, 18.0) == (1, 1)  # sensors at 5, 15, 25...: only 15 is within [7, 23]
    assert fmap.channels_for(12.0, 21.0) == (1, 2)  # 25 <= 21 + pitch/2
    assert fmap.channels_for(-50.0, -40.0) == (0, 0)  # off the bar: the nearest sensor
    assert fmap.channels_for(200.0, 210.0) == (7, 7)

    def reading(i: int, after_gap: bool = False, ch: int = 0, v: float = 0.0) -> BarReading:
        values = np.zeros(8, dtype=np.float32)
        values[ch] = v
        return BarReading(i, None if after_gap else float(i - 1), float(i), values, (), float(i))

    fmap.add(reading(1, after_gap=True))  # the first line of a session: its start is unknown
    for i in range(2, 6):
        fmap.add(reading(i, ch=2, v=-80.0 if i == 4 else 1.0))
    fmap.add(reading(8, after_gap=True, ch=2, v=5.0))  # lines 6 and 7 were lost
    for i in range(9, 12):
        fmap.add(reading(i, ch=2, v=3.0))
    assert fmap.covered_until() == 11000.0
    off = 100.0 * 10.0  # distance in counts
    res = fmap.query(2500 - off, 3500 - off, 20.0, 30.0)  # read in [2500, 3500]: lines 3 and 4
    assert res.complete and res.field_mT == 80.0 and res.signed_mT == -80.0 and res.channel == 2 and res.lines == 2
    assert res.peak_span == (3000.0, 4000.0)
    res = fmap.query(6200 - off, 6800 - off, 20.0, 30.0)  # inside the lost stretch
    assert not res.complete and res.field_mT == 5.0  # the line after the gap may hold part of it: a lower bound
    res = fmap.query(9200 - off, 10500 - off, 20.0, 30.0)
    assert res.complete and res.field_mT == 3.0
    res = fmap.query(10500 - off, 12500 - off, 20.0, 30.0)  # the bar has not got there yet
    assert res.pending and not res.complete
    res = fmap.query(500 - off, 1500 - off, 20.0, 30.0)  # before the session's first known interval start
    assert not res.complete

    def not_ready(t: float) -> float:
        raise RuntimeError("clock model not ready")

    fmap.count_at = not_ready
    fmap.add(reading(12, ch=2, v=3.0))
    fmap.count_at = t_to_count.__getitem__
    fmap.add(reading(13, ch=2, v=3.0))  # contiguous on the bar, but the line before it was never placed
    assert fmap.unconverted == 1
    assert not fmap.query(12200 - off, 12800 - off, 20.0, 30.0).complete
