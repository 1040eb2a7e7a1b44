"""The Hall-sensor bar, both sides of the wire: protocol, clock sync, the simulated bar on a real pty
read by the service's HallBar through pyserial, and the field map's per-piece lookup."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from sim.belt import Belt
from sim.config import load_sim_config
from sim.feed import SimPiece, make_piece
from sim.hallbar import SimHallBar, garble
from sim.line import SimLine
from sim.magnet import field_at_mT, remanence_t
from sorter.config import LineConfig, MagnetometerConfig
from sorter.drivers.hallbar import BarReading, BoardClock, DataLine, FieldMap, HallBar, InfoLine, LineError, parse_line
from sorter.drivers.hallbar.protocol import LineSplitter, checksum, format_data, format_info, wire_seconds
from sorter.drivers.hallbar.sync import lower_envelope

ROOT = Path(__file__).resolve().parents[1]
CPMM = 20.0
SPEED = 2500.0
T_MOD = 1 << 32


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


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


# --- the simulated bar on a pty, read by the service's HallBar ---


def fast_cfg(link: Path, **hb: float) -> tuple[LineConfig, MagnetometerConfig]:
    """The demo config with a fast serial line so a test sees thousands of lines in seconds."""
    base = load_sim_config(ROOT / "config/sim.yaml")
    mag = MagnetometerConfig(
        port=str(link), baudrate=921_600, stall_timeout_s=0.3, reconnect_min_s=0.05, reconnect_max_s=0.2
    )
    assert base.simulator is not None
    sim_hb = base.simulator.hallbar.model_copy(update={"period_ms": 2.0, "drop_rate": 0.0, "corrupt_rate": 0.0, **hb})
    sim = base.simulator.model_copy(update={"hallbar": sim_hb})
    return base.model_copy(update={"magnetometer": mag, "simulator": sim}), mag


@dataclass
class Rig:
    belt: Belt
    sim: SimHallBar
    bar: HallBar
    fmap: FieldMap
    pieces: list[SimPiece] = field(default_factory=list)

    def count_at(self, t: float) -> float:
        """The belt's exact unwrapped count at PC time t: the service's clock model, without its error."""
        return self.belt.encoder_start + self.belt.position_mm(t) * CPMM


@contextmanager
def rig(tmp_path: Path, **hb: float) -> Iterator[Rig]:
    link = tmp_path / "dev" / "hallbar"
    cfg, mag = fast_cfg(link, **hb)
    belt = Belt(CPMM, SPEED, encoder_start=T_MOD - 40_000)
    pieces: list[SimPiece] = []
    sim = SimHallBar(cfg, belt, lambda: tuple(pieces), link, seed=11)
    holder: dict[str, Rig] = {}
    fmap = FieldMap(mag, CPMM, lambda t: holder["rig"].count_at(t))
    bar = HallBar(mag, on_reading=fmap.add)
    r = holder["rig"] = Rig(belt, sim, bar, fmap, pieces)
    belt.start()
    sim.start()
    bar.start()
    try:
        yield r
    finally:
        bar.stop()
        sim.stop()


def test_symlink_points_to_the_pty_and_is_replaced(tmp_path: Path) -> None:
    link = tmp_path / "bar"
    cfg, _ = fast_cfg(link)
    link.symlink_to("/nonexistent/stale")  # a stale link from a crashed run is replaced
    sim = SimHallBar(cfg, Belt(CPMM, SPEED), tuple, link, seed=1)
    sim.start()
    try:
        assert link.is_symlink() and str(link.readlink()) == sim.device and sim.device.startswith("/dev/pts/")
        first = sim.device
        sim.set_plugged(False)
        assert not link.exists() and not link.is_symlink()  # a pulled cable: the device is gone
        sim.set_plugged(True)
        assert link.is_symlink() and str(link.readlink()) == sim.device
        assert sim.counters()["replugs"] == 1 and first is not None
    finally:
        sim.stop()
    assert not link.is_symlink()
    (tmp_path / "file").write_text("not a link")
    with pytest.raises(FileExistsError):
        SimHallBar(cfg, Belt(CPMM, SPEED), tuple, tmp_path / "file", seed=1).start()


def test_counters_match_injected_faults(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        wait_until(lambda: r.bar.online and r.bar.lines_ok >= 20, what="bar online")
        assert r.bar.lines_corrupt == 0 and r.bar.lines_lost == 0
        r.sim.drop_rate, r.sim.corrupt_rate = 0.03, 0.03  # before this, neither side saw a fault
        wait_until(lambda: r.sim.corrupted >= 25 and r.sim.dropped >= 25, timeout=10, what="faults injected")
        r.sim.drop_rate = r.sim.corrupt_rate = 0.0
        last_faulty = r.sim.data_lines
        wait_until(lambda: r.sim.data_lines > last_faulty + 10, what="clean lines after the faults")
        seq = r.sim.last_clean_seq
        wait_until(lambda: r.bar.latest is not None and r.bar.latest.seq == seq, what="bar caught up")
        sim_c, bar_c = r.sim.counters(), r.bar.counters()
        assert sim_c["overflow"] == 0
        assert bar_c["lines_corrupt"] == sim_c["corrupted"]  # garbled data and info lines
        assert bar_c["lines_lost"] == sim_c["lost_data"]  # data lines dropped or garbled: seq gaps
        assert bar_c["online"] and bar_c["reconnects"] == 0 and bar_c["board_restarts"] == 0
        assert set(bar_c["rejects"]) == {"checksum", "truncated"}  # XOR catches every garbled byte; cuts lack LF


def test_offline_when_unplugged_or_silent_and_back_after(tmp_path: Path) -> None:
    with capture_logs() as logs, rig(tmp_path) as r:
        wait_until(lambda: r.bar.online, what="bar online")
        r.sim.set_plugged(False)  # the cable is pulled: the pty closes, reads fail
        wait_until(lambda: r.bar.state == "offline", what="bar offline after unplug")
        assert "port failed" in (r.bar.offline_reason or "")
        time.sleep(0.15)  # a few reconnect attempts against the missing device
        assert r.bar.state == "offline"
        ok = r.bar.lines_ok
        r.sim.set_plugged(True)  # a new pty behind the same link; the board restarted
        wait_until(lambda: r.bar.online and r.bar.lines_ok > ok + 20, what="bar back online")
        assert r.bar.reconnects == 1 and r.bar.latest is not None and r.bar.latest.seq < 1000

        r.sim.drop_rate = 1.0  # the port stays open but nothing valid arrives: a stalled bar
        wait_until(lambda: r.bar.state == "offline", what="bar offline after a stall")
        assert "no valid data line" in (r.bar.offline_reason or "")
        r.sim.drop_rate = 0.0
        wait_until(lambda: r.bar.online, what="bar online after the stall")
        assert r.bar.reconnects == 2
    events = [e["event"] for e in logs if e["event"].startswith("hallbar")]
    assert events.count("hallbar offline") == 2 and events.count("hallbar online") == 3


# --- the field map: pieces on a running belt ---


def _piece(cls: str, seed: int, x_mm: float, s_mm: float, pid: int, size: tuple[float, float]) -> SimPiece:
    rng = np.random.default_rng(seed)
    return make_piece(rng, cls, size_mm=size).placed(x_mm, s_mm, id=pid)


def _expected(r: Rig, p: SimPiece, channels: tuple[int, int]) -> float:
    """The true peak the bar's channels should report for a piece (gain applied; offsets are the baseline's job)."""
    lift = r.sim.hb.lift_off_mm
    return max(
        abs(r.sim.true_gains[ch] * field_at_mT(p, float(r.sim.channel_x_mm[ch] - p.x_mm), 0.0, lift))
        for ch in range(channels[0], channels[1] + 1)
    )


def _extent(r: Rig, p: SimPiece) -> tuple[float, float, float, float]:
    """(u_lead, u_trail, x0, x1): what the service's tracking knows of a piece."""
    u_lead = r.belt.encoder_start + (p.s_mm - p.dy_lead) * CPMM
    u_trail = r.belt.encoder_start + (p.s_mm - p.dy_trail) * CPMM
    return u_lead, u_trail, p.x_mm + p.dx0, p.x_mm + p.dx1


def test_fieldmap_reports_each_pieces_peak(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        wait_until(lambda: r.bar.online and r.bar.lines_ok >= 60, what="bar online with a baseline")
        mag = r.bar.cfg
        pos = r.belt.position_mm()
        # pieces reach the sensor row (distance_mm past the cameras) 250..750 mm of belt from now, one per 100 mm
        specs = [
            ("ndfeb", 1, 106.25, (14.0, 18.0)),  # right over channel 8
            ("ndfeb", 2, 212.5, (10.0, 12.0)),  # between channels 16 and 17
            ("ferrite", 3, 300.0, (20.0, 30.0)),
            ("smco", 4, 420.0, (8.0, 10.0)),
            ("steel", 5, 510.0, (20.0, 25.0)),
            ("other", 6, 580.0, (20.0, 25.0)),
        ]
        for i, (cls, seed, x, size) in enumerate(specs):
            r.pieces.append(_piece(cls, seed, x, pos - mag.distance_mm + 250 + 100 * i, i + 1, size))
        lost = r.pieces[0].placed(300.0, pos - mag.distance_mm + 950, id=99)  # crosses while lines are lost
        r.pieces.append(lost)
        # before it reached the bar a piece's reading is pending, not missing
        u_lead, u_trail, x0, x1 = _extent(r, r.pieces[0])
        early = r.fmap.query(u_lead, u_trail, x0, x1)
        assert early.pending and not early.complete

        # lose every line while the last piece passes the bar
        cross = lost.s_mm + mag.distance_mm
        wait_until(lambda: r.belt.position_mm() > cross - 60, timeout=3, what="belt near the lost piece")
        r.sim.drop_rate = 1.0
        wait_until(lambda: r.belt.position_mm() > cross + 60, timeout=3, what="belt past the lost piece")
        r.sim.drop_rate = 0.0

        for p in r.pieces[:-1]:
            u_lead, u_trail, x0, x1 = _extent(r, p)
            w_end = r.fmap.window(u_lead, u_trail)[1]
            wait_until(lambda w=w_end: (r.fmap.covered_until() or 0) > w, timeout=2, what="bar past the piece")
            res = r.fmap.query(u_lead, u_trail, x0, x1)
            want = _expected(r, p, res.channels)
            assert res.complete and not res.pending and res.field_mT is not None, (p.cls, res)
            assert res.field_mT == pytest.approx(want, abs=4.0 + 0.03 * want), (p.cls, res, want)
            if want > 20:
                assert np.sign(res.signed_mT) == np.sign(remanence_t(p))
            assert res.channels[0] <= res.channel <= res.channels[1]
        strong = r.fmap.query(*_extent(r, r.pieces[0]))
        assert strong.field_mT is not None and strong.field_mT > 50  # a healthy NdFeB piece, not noise

        u_lead, u_trail, x0, x1 = _extent(r, lost)
        wait_until(lambda: (r.fmap.covered_until() or 0) > r.fmap.window(u_lead, u_trail)[1], what="bar past")
        res = r.fmap.query(u_lead, u_trail, x0, x1)
        assert not res.complete and not res.pending  # the bar moved on, but what it read there is lost
        assert r.bar.lines_lost > 0


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


def test_simline_runs_the_bar_when_given_a_link(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config/sim.yaml")
    link = tmp_path / "hb"
    line = SimLine(cfg, hallbar_link=link)
    assert line.hallbar is not None
    line.set_hallbar(True)
    try:
        assert link.is_symlink() and line.status()["hallbar"]["plugged"]
    finally:
        line.set_hallbar(False)
    assert not link.is_symlink() and not line.status()["hallbar"]["plugged"]
