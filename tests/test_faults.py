"""Fault runs (issue 15): the SPEC, first-seen rows and lost_in_restart, the disk-full buffer, PLC restart
detection, the wall clock kept out of scheduling, and the fault report's accounting pieces."""

from __future__ import annotations

import ast
import asyncio
import sqlite3
from itertools import pairwise
from pathlib import Path

import pytest

from sim.faults import (
    ALL_FAULTS,
    FAULT_KINDS,
    BeltTrack,
    FaultSpecError,
    FrameGaps,
    LineWatch,
    camera_fields,
    parse_faults,
)
from sim.servicerun import SteppableWallClock
from sorter.config import PlcConfig, load_config
from sorter.core.alarms import AlarmBoard, Condition
from sorter.core.clock import ClockModel
from sorter.core.messages import Outcome, Piece
from sorter.drivers.plc.base import plc_restarted
from sorter.drivers.plc.link import PlcLink
from sorter.line.conditions import line_conditions
from sorter.line.records import RecordStore, load_pieces, seen_row
from tests.test_metrics import make_stats

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
CAMS = ["cam0", "cam1"]


# --- the SPEC ---


def test_all_is_every_fault_once_in_order_one_after_the_other_within_the_run() -> None:
    faults = parse_faults("all", CAMS, 120.0)
    assert [f.label for f in faults] == ALL_FAULTS.split(",")
    assert {f.name for f in faults} == set(FAULT_KINDS)
    for a, b in pairwise(faults):
        assert b.at_s >= a.busy_until_s  # the next starts once the line has recovered from the last
    assert faults[-1].busy_until_s <= 120.0
    stall = next(f for f in faults if f.name == "camera-stall")
    assert (stall.camera, stall.duration_s) == ("cam0", 3.0)
    assert next(f for f in faults if f.name == "wall-clock-step").step_s == 3600.0


def test_scheduled_and_unscheduled_faults_mix() -> None:
    faults = parse_faults("service-kill@40, plc-link-drop:500ms, hallbar-unplug:5s@5", CAMS, 80.0)
    by_name = {f.name: f for f in faults}
    assert by_name["service-kill"].at_s == 40.0 and by_name["hallbar-unplug"].at_s == 5.0
    assert by_name["plc-link-drop"].duration_s == 0.5
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no faults"),
        ("plc-reboot", "unknown fault 'plc-reboot'"),
        ("plc-link-drop", "plc-link-drop:<duration>"),
        ("camera-stall:cam7:3s", "no camera 'cam7'"),
        ("camera-unplug:cam0:fast", "not a duration"),
        ("hallbar-unplug:0s", "must be positive"),
        ("wall-clock-step:3600", "signed step"),
        ("service-kill@soon", "not a time"),
        ("plc-link-drop:10s@5,plc-restart@8", "starts before plc-link-drop:10s"),
        ("records-disk-full:50s@20", "the feed lasts 60 s"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_faults(spec, CAMS, 60.0)


# --- records: first seen, decided, lost in a restart ---


def _piece(i: int) -> Piece:
    return Piece(i, u=1000.0 * i, u_lead=1000.0 * i - 200, u_trail=1000.0 * i + 200, x=100.0, x0=90.0, x1=110.0,
                 area_mm2=150.0, cameras=("cam0",), n_views=3, t_first_capture=1.0, t_last_capture=1.1)  # fmt: skip


@pytest.fixture
def cfg():
    return load_config(ROOT / "config" / "sim.yaml")


def test_a_piece_is_recorded_when_first_seen_and_completed_on_its_decision(tmp_path, cfg) -> None:
    db = tmp_path / "records.sqlite"
    store = RecordStore(db, "run-a")
    store.add_seen([_piece(1), _piece(2)], cfg)
    store.flush()
    rows = {r["id"]: r for r in load_pieces(db)}
    assert {r["outcome"] for r in rows.values()} == {Outcome.SEEN}
    assert rows[1]["fraction"] == cfg.routing.default_fraction and rows[1]["count"] == 1000
    decided = seen_row(_piece(1), cfg, 0.0) | {
        "cls": "ndfeb",
        "confidence": 0.99,
        "fraction": "ndfeb",
        "outcome": "pending",
    }
    store.add_piece(decided)  # the decision: the same row, completed
    store.update_outcome(1, Outcome.ACCEPTED, 17, 2.0, 40.0)
    store.close()
    rows = {r["id"]: r for r in load_pieces(db)}
    assert len(rows) == 2
    assert (rows[1]["outcome"], rows[1]["cls"], rows[1]["seq"]) == ("accepted", "ndfeb", 17)
    assert rows[2]["outcome"] == Outcome.SEEN


def test_the_next_start_marks_what_a_dead_run_left_open_lost_in_restart(tmp_path, cfg) -> None:
    db = tmp_path / "records.sqlite"
    dead = RecordStore(db, "run-dead")
    dead.add_seen([_piece(1), _piece(2), _piece(3), _piece(4)], cfg)
    dead.add_piece(seen_row(_piece(2), cfg, 0.0) | {"outcome": "pending", "fraction": "ndfeb", "cls": "ndfeb"})
    dead.add_piece(seen_row(_piece(3), cfg, 0.0) | {"outcome": "no_eject", "cls": "steel"})
    dead.flush()  # then SIGKILL: no close, pieces 1, 2 and 4 still open
    clean = RecordStore(db, "run-clean")
    clean.add_seen([_piece(1)], cfg)
    clean.update_outcome(1, Outcome.CANCELLED, None, None, None)
    clean.close()
    new = RecordStore(db, "run-new")
    assert new.close_dead_runs() == 3
    assert new.close_dead_runs() == 0  # once
    new.close()
    rows = {(r["run_id"], r["id"]): r["outcome"] for r in load_pieces(db)}
    assert rows == {
        ("run-dead", 1): "lost_in_restart",
        ("run-dead", 2): "lost_in_restart",
        ("run-dead", 3): "no_eject",
        ("run-dead", 4): "lost_in_restart",
        ("run-clean", 1): "cancelled",
    }
    con = sqlite3.connect(db)
    kinds = [r[0] for r in con.execute("SELECT detail FROM events WHERE kind='lost_in_restart' AND run_id='run-new'")]
    con.close()
    assert kinds == ['{"dead_run": "run-dead", "pieces": 3}']


class FullDisk(RecordStore):
    """The writer seam failing as SQLite does on a full disk, until `full` is cleared."""

    full = True

    def _write(self, ins, upd, ev, *rest) -> None:  # type: ignore[no-untyped-def]
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        super()._write(ins, upd, ev, *rest)


def test_a_full_disk_buffers_rows_up_to_the_bound_then_writes_them_in_order(tmp_path, cfg) -> None:
    db = tmp_path / "records.sqlite"
    store = FullDisk(db, "run", buffer_max_rows=5)
    store.add_seen([_piece(i) for i in range(1, 5)], cfg)
    with pytest.raises(sqlite3.OperationalError):
        store.flush()
    assert store.error == "database or disk is full" and store.pending_writes == 4
    store.update_outcome(1, Outcome.NO_EJECT, None, None, None)  # the 5th row: fits
    store.add_seen([_piece(6)], cfg)  # past the bound: refused, counted
    store.event("alarm", alarm="x")
    assert (store.pending_writes, store.rows_dropped) == (5, 2)
    stats = make_stats(records_error=store.error, records_pending=store.pending_writes, records_dropped=2)
    names = {c.name for c in line_conditions(stats)}
    assert {"records_disk", "records_dropped"} <= names
    store.looked_at("cam0", 900)
    with pytest.raises(sqlite3.OperationalError):
        store.flush()
    store.looked_at("cam0", 1000)  # a newer frame while the disk is full: the newer position is written
    store.full = False
    store.flush()
    assert store.error is None and store.pending_writes == 0
    assert list(store._db.execute("SELECT run_id, camera, count32 FROM looked")) == [("run", "cam0", 1000)]
    store.close()
    rows = load_pieces(db)
    assert [(r["id"], r["outcome"]) for r in rows] == [(1, "no_eject"), (2, "seen"), (3, "seen"), (4, "seen")]
    assert not {c.name for c in line_conditions(make_stats(records_error=None))} & {"records_disk", "records_dropped"}


def test_buffer_bound_must_be_positive(tmp_path) -> None:
    with pytest.raises(ValueError, match="buffer_max_rows"):
        RecordStore(tmp_path / "r.sqlite", "run", buffer_max_rows=0)


# --- PLC restart ---


@pytest.mark.parametrize(
    ("pc_seq", "plc_seq", "counters", "restarted"),
    [
        (120, 0, ((40, 0), (2, 0)), True),  # seq back at 0: only a power-up clears it
        (120, 121, ((40, 41), (2, 2)), False),
        (0, 0, ((None, 0), (None, 0)), False),  # the first poll ever
        (0, 0, ((65530, 3), (0, 0)), False),  # a counter wrapping forward is no restart
        (7, 7, ((900, 0), (0, 0)), True),  # a counter stepped back although seq looks the same
    ],
)
def test_plc_restart_is_told_from_seq_and_counters(pc_seq, plc_seq, counters, restarted) -> None:
    assert (plc_restarted(pc_seq, plc_seq, counters) is not None) is restarted


async def test_the_link_resynchronises_after_a_plc_restart() -> None:
    cfg = PlcConfig()
    link = PlcLink(cfg, ClockModel())
    r = cfg.registers
    lo = min(r.input_addresses)

    def regs(last_seq: int, done: int, queue_free: int = 64) -> list[int]:
        out = [0] * (max(r.input_addresses) - lo + 1)
        out[r.ir_last_seq - lo], out[r.ir_ejects_done - lo], out[r.ir_queue_free - lo] = last_seq, done, queue_free
        return out

    link._apply_poll(regs(0, 0), 1.0, 1.001, online=True)
    for _ in range(3):
        link.mailbox.reserve()
    link._apply_poll(regs(3, 2), 1.02, 1.021)
    assert link.mailbox.last_accepted == 3 and link.status.ejects_done == 2
    seq, _ = link.mailbox.reserve()  # written, waiting for acceptance when the PLC restarts
    waiter = asyncio.get_running_loop().create_future()
    link._waiters[seq] = waiter
    link._apply_poll(regs(0, 0), 1.04, 1.041)
    assert link.restarts == 1
    assert link.mailbox.last_accepted == 0 and link.mailbox.pending == 0 and link.mailbox.next_seq == 1
    assert waiter.result() is Outcome.OFFLINE  # the PLC never took it
    assert link.status.ejects_done == 2  # the total goes on: the step back is not counted as a wrap
    link._apply_poll(regs(0, 1), 1.06, 1.061)
    assert link.restarts == 1 and link.status.ejects_done == 3


# --- the wall clock ---


def test_alarm_debounce_ignores_a_wall_clock_step() -> None:
    board = AlarmBoard(delay_s=1.0)
    cond = [Condition("plc_offline", "no answer", "check")]
    assert board.update(cond, now=1000.0, t_mono=50.0) == ([], [])
    raised, _ = board.update(cond, now=1000.0 + 3600, t_mono=50.1)  # the wall clock jumped an hour
    assert raised == []
    raised, _ = board.update(cond, now=4601.0, t_mono=51.0)
    assert [a.name for a in raised] == ["plc_offline"] and raised[0].raised_at == 4601.0


# wall time is read only to stamp things; a new reader must be looked at (and added here) deliberately
WALL_CLOCK_READERS = {
    ("sorter/core/timebase.py", "time.time"),  # the real-time line's Timebase.wall: timestamps only
    ("sorter/line/records.py", "time.time"),  # record and event timestamps (the Timebase's, by default)
    ("sorter/core/alarms.py", "time.time"),  # alarm timestamps (the debounce is monotonic)
    ("sorter/north/hmi/live.py", "time.time"),  # the time shown on the live view
    ("sorter/north/hmi/server.py", "datetime.now"),  # certificate expiry
    ("sorter/north/keyfiles.py", "datetime.now"),  # certificate validity
    ("sorter/ml/train.py", "datetime.now"),  # a model's creation date
    ("sorter/reports/html_page.py", "datetime.now"),  # when a report was made
    ("sorter/cli.py", "time.strftime"),  # an evaluation's folder name
    ("sorter/app.py", "time.strftime"),  # the run id
    ("sorter/north/hmi/compare.py", "time.strftime"),  # a model comparison's folder name
}


def test_nothing_in_the_product_reads_the_wall_clock_but_for_timestamps() -> None:
    found = set()
    for path in sorted((ROOT / "sorter").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("time", "now", "utcnow", "strftime", "localtime"):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                if (node.attr == "time" and name == "time") or (node.attr != "time" and name in ("time", "datetime")):
                    module = "datetime" if name == "datetime" else "time"
                    found.add((str(path.relative_to(ROOT)), f"{module}.{node.attr}"))
    assert found == WALL_CLOCK_READERS


def test_the_service_wall_clock_steps_with_its_file(tmp_path) -> None:
    f = tmp_path / "offset"
    clock = SteppableWallClock(f, real=lambda: 1000.0)
    clock.read()  # no file yet: unchanged
    assert clock() == 1000.0
    f.write_text("+3600\n")
    clock.read()
    assert clock() == 4600.0
    f.write_text("soon")
    clock.read()  # not a number: said on stderr, the offset stays
    assert clock() == 4600.0


# --- the report's pieces ---


def test_line_watch_follows_the_log_and_finds_recovery() -> None:
    w = LineWatch(("cam0", "cam1"))
    w.new_incarnation(0.0)
    for t, line in [
        (1.0, {"event": "plc connected"}),
        (1.1, {"event": "camera online", "camera": "cam0"}),
        (1.2, {"event": "camera online", "camera": "cam1"}),
        (1.5, {"event": "state", "new": "Execute"}),
        (5.0, {"event": "camera offline", "camera": "cam1", "reason": "stalled"}),
        (8.0, {"event": "camera online", "camera": "cam1"}),
    ]:
        w.feed(t, line)
    assert w.healthy_from(0.0) == 1.5
    assert w.healthy_from(3.0) == 3.0  # healthy already then
    assert w.healthy_from(5.5) == 8.0
    assert w.first(4.0, lambda ln: ln.get("event") == "camera offline") == 5.0
    w.dead(9.0)
    assert not w.healthy and w.healthy_from(9.0) is None


def test_belt_track_interpolates_counts() -> None:
    b = BeltTrack()
    for t, c in [(1.0, 100), (2.0, 300), (3.0, 300)]:  # stopped between 2 and 3 s
        b.add(t, c)
    assert b.count_at(1.5) == 200 and b.count_at(2.5) == 300 and b.count_at(0.0) == 100 and b.count_at(9.0) == 300


def test_frame_gaps_explain_only_pieces_no_looking_camera_saw_whole(cfg) -> None:
    fields = camera_fields(cfg)  # cam0 0..320 mm, cam1 280..600 mm across
    assert fields["cam0"] == (0.0, 320.0) and fields["cam1"] == (280.0, 600.0)
    cpm = cfg.belt.counts_per_mm
    # cam1 skipped frames from 0 to 400 mm of belt
    gaps = FrameGaps([{"camera": "cam1", "from_count32": 0, "to_count32": int(400 * cpm), "frames": 7}], cfg, fields, 0)

    def piece(s_mm: float, x0: float, x1: float, length: float = 20.0) -> dict:
        return {"count": int(s_mm * cpm), "x0_mm": x0, "x1_mm": x1, "length_mm": length}

    assert gaps.explains(piece(200, 400, 420))  # under cam1 only, in the middle of its gap
    assert not gaps.explains(piece(200, 100, 120))  # cam0 looked and saw it whole
    assert not gaps.explains(piece(200, 290, 310))  # in the overlap, wholly in cam0's field
    assert gaps.explains(piece(200, 310, 330))  # across cam0's edge: only cam1 could see it whole
    assert not gaps.explains(piece(30, 400, 420))  # wholly in view of the last frame cam1 looked at
    assert not gaps.explains(piece(500, 400, 420))  # after the gap
    assert gaps.summary(cpm)["by_camera"]["cam1"] == {"gaps": 1, "frames": 7, "belt_mm": 400.0}


def test_a_piece_in_a_touching_neighbours_record_is_accounted_not_unseen() -> None:
    from sim.faults import seen_in_other_records

    def row(i: int, s_mm: float, x0: float, x1: float, length: float) -> dict:
        return {"id": i, "count": int(s_mm * 20), "count32": int(s_mm * 20), "x0_mm": x0, "x1_mm": x1,
                "x_mm": (x0 + x1) / 2, "length_mm": length}  # fmt: skip

    truth = [row(1, 1000, 100, 120, 20), row(2, 1020.5, 100, 120, 20), row(3, 2000, 300, 320, 20)]
    blob = row(10, 1010, 100, 120, 41)  # pieces 1 and 2 touched: one record over both
    seen = seen_in_other_records(truth, [blob], {1: blob}, 20.0)
    assert set(seen) == {2} and "touching piece(s) [1]" in seen[2]
    assert seen_in_other_records(truth, [], {}, 20.0) == {}  # no record over them: nothing to explain
    off = row(11, 2009, 300, 320, 20)  # piece 3's record, 9 mm off along the belt: unmatched, over it
    seen = seen_in_other_records(truth, [blob, off], {1: blob}, 20.0)
    assert set(seen) == {2, 3} and "more than the match tolerance" in seen[3]


def test_the_shift_report_counts_lost_in_restart_and_undecided_rows(tmp_path, cfg) -> None:
    from sorter.reports.shift import summarise_records

    db = tmp_path / "records.sqlite"
    dead = RecordStore(db, "run-dead")
    dead.event("start")
    dead.add_seen([_piece(1), _piece(2)], cfg)
    decided = seen_row(_piece(2), cfg, 0.0) | {
        "cls": "ndfeb",
        "confidence": 0.99,
        "fraction": "ndfeb",
        "outcome": "pending",
    }
    dead.add_piece(decided)
    dead.add_seen([_piece(3)], cfg)
    dead.add_piece(seen_row(_piece(3), cfg, 0.0) | {"cls": "steel", "confidence": 0.95, "outcome": "no_eject"})
    dead.flush()  # killed here
    new = RecordStore(db, "run-new")
    new.close_dead_runs()
    new.event("start")
    new.add_seen([_piece(1)], cfg)  # the new run's first piece, not decided yet when the report is made
    new.flush()
    _, s = summarise_records(cfg, db=db)
    assert s["pieces"] == 4 and s["lost_in_restart"] == 2
    assert s["outcomes"] == {"lost_in_restart": 2, "no_eject": 1, "seen": 1}
    assert s["classes"]["undecided"]["count"] == 2 and s["classes"]["undecided"]["mean_confidence"] is None
    # the undecided ones ride to the default fraction; the routed one's air is unconfirmed
    assert s["fractions"]["ndfeb"]["count"] == 1 and s["fractions"]["ndfeb"]["unconfirmed"] == 1
    assert s["mass_balance"]["closes"]


def test_a_nearly_full_records_disk_is_an_alarm_before_writes_fail(tmp_path) -> None:
    store = RecordStore(tmp_path / "r.sqlite", "run", min_free_mb=1e12)  # more than any disk has free
    store.check_free(now=0.0)
    assert store.disk_low is not None and "below records.min_free_mb" in store.disk_low
    names = {c.name for c in line_conditions(make_stats(records_disk_low=store.disk_low))}
    assert "records_disk_low" in names
    store.min_free_mb = 1e-6
    store.check_free(now=0.5)  # not yet: checked at most once a second
    assert store.disk_low is not None
    store.check_free(now=1.5)
    assert store.disk_low is None
    store.close()
    never = RecordStore(tmp_path / "n.sqlite", "run", min_free_mb=0)
    never.check_free(now=10.0)
    assert never.disk_low is None
    never.close()
