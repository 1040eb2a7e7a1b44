"""The Hall-sensor bar on both sides of a real pty: the simulated bar writes, the service's HallBar reads
through pyserial; injected faults counted on both sides, a pulled cable and a stalled bar, and the field
map's per-piece peaks of pieces passing on a running belt."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from sim.belt import Belt
from sim.config import load_sim_config
from sim.feed import SimPiece, make_piece
from sim.hallbar import SimHallBar
from sim.line import SimLine
from sim.magnet import field_at_mT, remanence_t
from sorter.config import LineConfig, MagnetometerConfig
from sorter.drivers.hallbar import FieldMap, HallBar
from sorter.drivers.hallbar.protocol import SEQ_MOD
from tests.conftest import wait_until_blocking

ROOT = Path(__file__).resolve().parents[1]
CPMM = 20.0
SPEED = 2500.0
T_MOD = 1 << 32

pytestmark = pytest.mark.wire


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
        wait_until_blocking(lambda: r.bar.online and r.bar.lines_ok >= 20, timeout=5, what="bar online")
        assert r.bar.lines_corrupt == 0 and r.bar.lines_lost == 0
        r.sim.drop_rate, r.sim.corrupt_rate = 0.03, 0.03  # before this, neither side saw a fault
        wait_until_blocking(lambda: r.sim.corrupted >= 25 and r.sim.dropped >= 25, timeout=10, what="faults injected")
        r.sim.drop_rate = r.sim.corrupt_rate = 0.0
        last_faulty = r.sim.data_lines
        wait_until_blocking(lambda: r.sim.data_lines > last_faulty + 10, timeout=5, what="clean lines after the faults")
        seq = r.sim.last_clean_seq
        assert seq is not None
        # the bar keeps sending every 2 ms, so "caught up" is "has read this line or a later one" (with wrap)
        wait_until_blocking(
            lambda: r.bar.latest is not None and (r.bar.latest.seq - seq) % SEQ_MOD < SEQ_MOD // 2,
            timeout=5,
            what="bar caught up",
        )
        sim_c, bar_c = r.sim.counters(), r.bar.counters()
        assert sim_c["overflow"] == 0
        assert bar_c["lines_corrupt"] == sim_c["corrupted"]  # garbled data and info lines
        assert bar_c["lines_lost"] == sim_c["lost_data"]  # data lines dropped or garbled: seq gaps
        assert bar_c["online"] and bar_c["reconnects"] == 0 and bar_c["board_restarts"] == 0
        assert set(bar_c["rejects"]) == {"checksum", "truncated"}  # XOR catches every garbled byte; cuts lack LF


def test_offline_when_unplugged_or_silent_and_back_after(tmp_path: Path) -> None:
    with capture_logs() as logs, rig(tmp_path) as r:
        wait_until_blocking(lambda: r.bar.online, timeout=5, what="bar online")
        r.sim.set_plugged(False)  # the cable is pulled: the pty closes, reads fail
        wait_until_blocking(lambda: r.bar.state == "offline", timeout=5, what="bar offline after unplug")
        assert "port failed" in (r.bar.offline_reason or "")
        # a reconnect attempt against the missing device fails, and the bar stays offline
        wait_until_blocking(lambda: "open failed" in (r.bar.offline_reason or ""), timeout=5, what="a reconnect tried")
        assert r.bar.state == "offline"
        ok = r.bar.lines_ok
        r.sim.set_plugged(True)  # a new pty behind the same link; the board restarted
        wait_until_blocking(lambda: r.bar.online and r.bar.lines_ok > ok + 20, timeout=5, what="bar back online")
        assert r.bar.reconnects == 1 and r.bar.latest is not None and r.bar.latest.seq < 1000

        r.sim.drop_rate = 1.0  # the port stays open but nothing valid arrives: a stalled bar
        wait_until_blocking(lambda: r.bar.state == "offline", timeout=5, what="bar offline after a stall")
        assert "no valid data line" in (r.bar.offline_reason or "")
        r.sim.drop_rate = 0.0
        wait_until_blocking(lambda: r.bar.online, timeout=5, what="bar online after the stall")
        assert r.bar.reconnects == 2
    events = [e["event"] for e in logs if e["event"].startswith("hallbar")]
    assert events.count("hallbar offline") == 2 and events.count("hallbar online") == 3


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
        wait_until_blocking(lambda: r.bar.online and r.bar.lines_ok >= 60, timeout=5, what="bar online with a baseline")
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
        wait_until_blocking(
            lambda: r.belt.position_mm() > cross - 60, timeout=3, poll_s=0.002, what="belt near the lost piece"
        )
        r.sim.drop_rate = 1.0
        wait_until_blocking(
            lambda: r.belt.position_mm() > cross + 60, timeout=3, poll_s=0.002, what="belt past the lost piece"
        )
        r.sim.drop_rate = 0.0

        for p in r.pieces[:-1]:
            u_lead, u_trail, x0, x1 = _extent(r, p)
            w_end = r.fmap.window(u_lead, u_trail)[1]
            wait_until_blocking(lambda w=w_end: (r.fmap.covered_until() or 0) > w, timeout=2, what="bar past the piece")
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
        wait_until_blocking(
            lambda: (r.fmap.covered_until() or 0) > r.fmap.window(u_lead, u_trail)[1], timeout=5, what="bar past"
        )
        res = r.fmap.query(u_lead, u_trail, x0, x1)
        assert not res.complete and not res.pending  # the bar moved on, but what it read there is lost
        assert r.bar.lines_lost > 0


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
