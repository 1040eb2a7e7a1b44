"""Piece records in an embedded SQLite database (WAL).

One row per piece, written when the piece is decided and updated when its
eject command's fate is known, so a piece that was seen is never silently lost:
if the service stops before a command is answered, the row says so.
Writes are batched into one transaction per flush to keep the hot path cheap.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sorter.core.geometry import wrap32
from sorter.core.messages import Outcome

if TYPE_CHECKING:
    from sorter.config import LineConfig
    from sorter.core.planner import Plan

_PIECES_TABLE = """
CREATE TABLE IF NOT EXISTS pieces (
    id INTEGER NOT NULL,             -- piece id, unique within a run
    run_id TEXT NOT NULL,
    t_wall REAL NOT NULL,            -- unix time of the decision
    t_capture REAL NOT NULL,         -- monotonic time of the piece's last view
    count INTEGER NOT NULL,          -- unwrapped encoder count at which its centroid crossed the camera line
    count32 INTEGER NOT NULL,
    x_mm REAL, x0_mm REAL, x1_mm REAL, length_mm REAL, area_mm2 REAL,
    cameras TEXT, n_views INTEGER,
    probs TEXT,                      -- JSON {class: probability}: the decision's (image fused with the field)
    cls TEXT, confidence REAL,
    fraction TEXT NOT NULL,          -- where the service sends it
    bank TEXT, seq INTEGER, valve_mask INTEGER, open_at INTEGER, open_for INTEGER,
    outcome TEXT NOT NULL,           -- an Outcome (sorter/core/messages.py): pending until the PLC answers
    t_accepted REAL,
    latency_ms REAL,                 -- last view's capture -> command accepted by the PLC
    model TEXT,                      -- version of the model that classified the piece
    image_probs TEXT,                -- JSON {class: probability} from the camera alone, fused over views
    field_mT REAL,                   -- peak |field| the Hall-sensor bar read under the piece
    field_state TEXT,                -- ok, no_bar, offline, missing, incomplete
    threshold REAL,                  -- the confidence threshold the decision was held to
    PRIMARY KEY (run_id, id)         -- every run of the service appends to the same database
)"""
SCHEMA = (
    _PIECES_TABLE
    + """;
CREATE INDEX IF NOT EXISTS pieces_run ON pieces(run_id, t_wall);
CREATE TABLE IF NOT EXISTS events (
    t_wall REAL NOT NULL, run_id TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT
);
"""
)


# columns added after the first release: an older database gets them on open
_ADDED_COLUMNS = {
    "model": "TEXT",
    "image_probs": "TEXT",
    "field_mT": "REAL",
    "field_state": "TEXT",
    "threshold": "REAL",
}
PIECE_COLUMNS = (
    "id",
    "t_wall",
    "t_capture",
    "count",
    "count32",
    "x_mm",
    "x0_mm",
    "x1_mm",
    "length_mm",
    "area_mm2",
    "cameras",
    "n_views",
    "probs",
    "cls",
    "confidence",
    "fraction",
    "bank",
    "seq",
    "valve_mask",
    "open_at",
    "open_for",
    "outcome",
    "t_accepted",
    "latency_ms",
    "model",
    "image_probs",
    "field_mT",
    "field_state",
    "threshold",
)
_JSON_COLUMNS = ("probs", "image_probs")
_INSERT = f"INSERT INTO pieces (run_id, {', '.join(PIECE_COLUMNS)}) VALUES ({','.join('?' * (len(PIECE_COLUMNS) + 1))})"


class RecordStore:
    def __init__(self, path: Path, run_id: str, *, wall: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.run_id = run_id
        self._wall = wall  # events' timestamps (the line's Timebase.wall)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._inserts: list[tuple[Any, ...]] = []
        self._updates: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()  # rows are added on the event loop and written on a worker thread
        self.written = 0

    def _migrate(self) -> None:
        """Bring a database written by an older release up to this schema, keeping its rows."""
        info = list(self._db.execute("PRAGMA table_info(pieces)"))
        have = {r[1] for r in info}
        for col, kind in _ADDED_COLUMNS.items():
            if col not in have:
                self._db.execute(f"ALTER TABLE pieces ADD COLUMN {col} {kind}")
        if any(r[1] == "run_id" and r[5] == 0 for r in info):  # first release: piece id alone was the key
            cols = ", ".join(("run_id", *PIECE_COLUMNS))
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DROP INDEX IF EXISTS pieces_run")
                self._db.execute("ALTER TABLE pieces RENAME TO pieces_v1")
                self._db.execute(_PIECES_TABLE)
                self._db.execute(f"INSERT INTO pieces ({cols}) SELECT {cols} FROM pieces_v1")
                self._db.execute("DROP TABLE pieces_v1")
                self._db.execute("CREATE INDEX IF NOT EXISTS pieces_run ON pieces(run_id, t_wall)")

    def add_piece(self, row: dict[str, Any]) -> None:
        values = [
            json.dumps(row[c]) if c in _JSON_COLUMNS and row.get(c) is not None else row.get(c) for c in PIECE_COLUMNS
        ]
        with self._lock:
            self._inserts.append((self.run_id, *values))

    def update_outcome(
        self, piece_id: int, outcome: str, seq: int | None, t_accepted: float | None, latency_ms: float | None
    ) -> None:
        with self._lock:
            self._updates.append((outcome, seq, t_accepted, latency_ms, self.run_id, piece_id))

    def event(self, kind: str, **detail: Any) -> None:
        with self._lock:
            self._events.append((self._wall(), self.run_id, kind, json.dumps(detail, default=str)))

    @property
    def pending_writes(self) -> int:
        return len(self._inserts) + len(self._updates) + len(self._events)

    def flush(self) -> None:
        with self._lock:
            if not self.pending_writes:
                return
            ins, upd, ev = self._inserts, self._updates, self._events
            self._inserts, self._updates, self._events = [], [], []
        try:
            self._write(ins, upd, ev)
        except sqlite3.Error:
            with self._lock:  # keep them for the next flush: a full or locked disk must not lose records
                self._inserts[:0], self._updates[:0], self._events[:0] = ins, upd, ev
            raise
        self.written += len(ins)

    def _write(self, ins: list[tuple[Any, ...]], upd: list[tuple[Any, ...]], ev: list[tuple[Any, ...]]) -> None:
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany(_INSERT, ins)
            self._db.executemany(
                "UPDATE pieces SET outcome=?, seq=COALESCE(?, seq), t_accepted=?, latency_ms=? WHERE run_id=? AND id=?",
                upd,
            )
            self._db.executemany("INSERT INTO events VALUES (?,?,?,?)", ev)

    def close(self) -> None:
        self.flush()
        self._db.close()


def load_pieces(path: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    q = "SELECT * FROM pieces" + (" WHERE run_id=?" if run_id else "") + " ORDER BY count"
    rows = [dict(r) for r in db.execute(q, (run_id,) if run_id else ())]
    db.close()
    for r in rows:
        for c in _JSON_COLUMNS:
            r[c] = json.loads(r[c]) if r[c] else {}
    return rows


def piece_row(plan: Plan, cfg: LineConfig, t_wall: float) -> dict[str, Any]:
    """A decided piece's row of the `pieces` table (its outcome `pending` until the PLC answers its command)."""
    d, cmd, cpm = plan.decision, plan.command, cfg.belt.counts_per_mm
    p = d.piece
    return {
        "id": p.id,
        "t_wall": t_wall,
        "t_capture": p.t_last_capture,
        "count": round(p.u),
        "count32": wrap32(round(p.u)),
        "x_mm": p.x,
        "x0_mm": p.x0,
        "x1_mm": p.x1,
        "length_mm": (p.u_trail - p.u_lead) / cpm,
        "area_mm2": p.area_mm2,
        "cameras": ",".join(p.cameras),
        "n_views": p.n_views,
        "probs": d.probs,
        "image_probs": d.image_probs,
        "field_mT": d.field.field_mT,
        "field_state": d.field.state,
        "threshold": d.threshold,
        "model": d.model,
        "cls": d.cls,
        "confidence": d.confidence,
        "fraction": d.fraction,
        "bank": cfg.ejection.banks[cmd.bank].name if cmd else None,
        "valve_mask": cmd.valve_mask if cmd else None,
        "open_at": cmd.open_at if cmd else None,
        "open_for": cmd.open_for if cmd else None,
        "outcome": Outcome.PENDING if cmd else plan.outcome,
    }
