"""Piece records: runs append to one database; an older database is upgraded without losing rows."""

from __future__ import annotations

import sqlite3

import pytest

from sorter.line.records import RecordStore, load_pieces

pytestmark = pytest.mark.fast


def _row(i: int) -> dict:
    return {"id": i, "t_wall": 1.0, "t_capture": 1.0, "count": 100 * i, "count32": 100 * i, "fraction": "residue",
            "outcome": "no_eject", "probs": {"ndfeb": 0.2}, "image_probs": {"ndfeb": 0.3}, "field_mT": 12.5,
            "field_state": "ok"}  # fmt: skip


def test_runs_with_the_same_piece_ids_append_to_one_database(tmp_path):
    db = tmp_path / "records.sqlite"
    for run in ("run-a", "run-b"):  # a restarted service numbers its pieces from 1 again
        store = RecordStore(db, run)
        for i in (1, 2, 3):
            store.add_piece(_row(i))
        store.update_outcome(2, "accepted", 7, 2.0, 50.0)
        store.close()
    rows = load_pieces(db)
    assert len(rows) == 6
    assert {r["run_id"] for r in rows} == {"run-a", "run-b"}
    b = {r["id"]: r for r in load_pieces(db, "run-b")}
    assert b[2]["outcome"] == "accepted" and b[2]["seq"] == 7 and b[1]["outcome"] == "no_eject"
    assert b[1]["image_probs"] == {"ndfeb": 0.3} and b[1]["field_mT"] == 12.5


def test_a_first_release_database_is_upgraded_in_place(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        """CREATE TABLE pieces (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, t_wall REAL NOT NULL,
        t_capture REAL NOT NULL, count INTEGER NOT NULL, count32 INTEGER NOT NULL, x_mm REAL, x0_mm REAL,
        x1_mm REAL, length_mm REAL, area_mm2 REAL, cameras TEXT, n_views INTEGER, probs TEXT, cls TEXT,
        confidence REAL, fraction TEXT NOT NULL, bank TEXT, seq INTEGER, valve_mask INTEGER, open_at INTEGER,
        open_for INTEGER, outcome TEXT NOT NULL, t_accepted REAL, latency_ms REAL);
        CREATE TABLE events (t_wall REAL NOT NULL, run_id TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT);
        INSERT INTO pieces (id, run_id, t_wall, t_capture, count, count32, probs, fraction, outcome)
        VALUES (1, 'old-run', 1.0, 1.0, 5, 5, '{"ferrite": 0.9}', 'ferrite_smco', 'accepted');"""
    )
    con.close()
    store = RecordStore(db, "new-run")
    store.add_piece(_row(1))  # the same piece id as the old run's
    store.close()
    rows = {r["run_id"]: r for r in load_pieces(db)}
    assert rows["old-run"]["probs"] == {"ferrite": 0.9} and rows["old-run"]["field_mT"] is None
    assert rows["new-run"]["field_state"] == "ok"


def test_a_failed_write_keeps_the_rows_for_the_next_flush(tmp_path):
    db = tmp_path / "records.sqlite"
    store = RecordStore(db, "run")
    store.add_piece(_row(1))
    blocker = sqlite3.connect(db, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    store._db.execute("PRAGMA busy_timeout=0")
    try:
        store.flush()
        raise AssertionError("the flush should have failed")
    except sqlite3.OperationalError:
        pass
    assert store.pending_writes == 1
    blocker.rollback()
    blocker.close()
    store.close()
    assert [r["id"] for r in load_pieces(db)] == [1]
