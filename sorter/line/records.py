"""Piece records in an embedded SQLite database (WAL).

One row per piece, written when the piece is first seen (tracked past the cameras: outcome `seen`),
completed when it is decided and updated when its eject command's fate is known, so a piece that was
seen is never silently lost: if the service stops cleanly before a command is answered, the row says
so (`cancelled`); if it dies (SIGKILL, power loss), the next start marks every row it left open
`lost_in_restart` (`close_dead_runs`).
Writes are batched into one transaction per flush to keep the hot path cheap.

When the disk refuses a flush (full, read-only, I/O error) the rows stay in memory, in order, up to
`records.buffer_max_rows`, and are written by the first flush that succeeds. Past the bound, new rows
are refused and counted (`rows_dropped`): a service that grows its heap without end would be killed by
the OOM killer and lose everything it held. Both are alarms (the service raises them from
`error` and `rows_dropped`).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sorter.core.geometry import wrap32
from sorter.core.messages import OPEN_OUTCOMES, Outcome

if TYPE_CHECKING:
    from sorter.config import LineConfig
    from sorter.core.messages import LatencyParts, Piece, ShadowDecision
    from sorter.core.planner import Plan

SHADOW_CROPS_MAX = 500  # differing pieces' crops kept per run (about 10 kB each): the rest keep their row only
DEFAULT_BUFFER_MAX_ROWS = 50_000  # the schema's default too (records.buffer_max_rows)
DEFAULT_MIN_FREE_MB = 100.0  # the schema's default too (records.min_free_mb)
FREE_CHECK_S = 1.0  # how often a flush looks at the disk's free space

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
    -- latency_ms in parts (sorter/core/messages.py LatencyParts): the first three once decided, plc_ms
    -- once the PLC accepted the command; NULL for a piece decided at shutdown
    settle_ms REAL,                  -- last view -> the frame that showed it had left the view arrived
    field_wait_ms REAL,              -- waiting for the Hall bar to read past it
    compute_ms REAL,                 -- the PC's time from its last input to the command handed to the PLC link
    plc_ms REAL,                     -- handed to the PLC link -> acceptance seen
    PRIMARY KEY (run_id, id)         -- every run of the service appends to the same database
)"""
SCHEMA = (
    _PIECES_TABLE
    + """;
CREATE INDEX IF NOT EXISTS pieces_run ON pieces(run_id, t_wall);
CREATE TABLE IF NOT EXISTS events (
    t_wall REAL NOT NULL, run_id TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT
);
-- how far along the belt each camera's frames had been looked at, committed with the rows they produced:
-- after a crash, the belt beyond this (less a piece's passage through the view) is belt nobody recorded
CREATE TABLE IF NOT EXISTS looked (
    run_id TEXT NOT NULL, camera TEXT NOT NULL, count32 INTEGER NOT NULL, PRIMARY KEY (run_id, camera)
);

-- shadow mode (docs/shadow.md): what a candidate model decided for a piece beside the live one, never acted on
CREATE TABLE IF NOT EXISTS shadow (
    run_id TEXT NOT NULL,
    piece_id INTEGER NOT NULL,
    model TEXT NOT NULL,             -- the shadow model's version
    live_cls TEXT, live_fraction TEXT, live_confidence REAL,
    cls TEXT, fraction TEXT, confidence REAL,
    t_wall REAL NOT NULL,
    crop BLOB,                       -- the piece's first view (PNG) where the classes differ, bounded per run
    PRIMARY KEY (run_id, piece_id, model)
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
    "settle_ms": "REAL",
    "field_wait_ms": "REAL",
    "compute_ms": "REAL",
    "plc_ms": "REAL",
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
    "settle_ms",
    "field_wait_ms",
    "compute_ms",
    "plc_ms",
)
_JSON_COLUMNS = ("probs", "image_probs")
# a piece's row is first written when it is seen, then completed when it is decided: the same statement
# inserts or overwrites it, so the order of the two in one flush is the only thing that matters
_INSERT = (
    f"INSERT INTO pieces (run_id, {', '.join(PIECE_COLUMNS)}) VALUES ({','.join('?' * (len(PIECE_COLUMNS) + 1))})"
    f" ON CONFLICT(run_id, id) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in PIECE_COLUMNS if c != 'id')}"
)


class RecordStore:
    def __init__(
        self,
        path: Path,
        run_id: str,
        *,
        buffer_max_rows: int = DEFAULT_BUFFER_MAX_ROWS,
        min_free_mb: float = DEFAULT_MIN_FREE_MB,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if buffer_max_rows < 1:
            raise ValueError("records.buffer_max_rows must be at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.run_id = run_id
        self._wall = wall  # rows' and events' timestamps (the line's Timebase.wall)
        self.buffer_max_rows = buffer_max_rows
        self.rows_dropped = 0  # rows refused because the buffer was full (the disk refused writes too long)
        self.error: str | None = None  # why the last flush failed; None once one succeeds
        self.min_free_mb = min_free_mb
        # why the disk is nearly full (None: it is not): a full disk is noticed before SQLite refuses a write,
        # which in WAL mode can take a while (the log reuses its space until a checkpoint must grow the file)
        self.disk_low: str | None = None
        self._free_checked = -math.inf
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._inserts: list[tuple[Any, ...]] = []
        self._updates: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []
        self._shadow: list[tuple[Any, ...]] = []
        self.shadow_crops = 0  # crops of differing pieces kept this run (at most SHADOW_CROPS_MAX)
        self._lock = threading.Lock()  # rows are added on the event loop and written on a worker thread
        self._writing = 0  # rows taken by a flush in progress: still in memory, they count against the bound
        self._looked: dict[str, int] = {}  # camera -> count32 of its latest frame looked at, not yet written
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

    def _room(self) -> bool:
        """Whether one more row fits the buffer (call with the lock held); counts the refusal if not."""
        if self.pending_writes + self._writing < self.buffer_max_rows:
            return True
        self.rows_dropped += 1
        return False

    def add_piece(self, row: dict[str, Any]) -> None:
        """Insert a piece's row, or complete the row its first sighting wrote (same run and id)."""
        values = [
            json.dumps(row[c]) if c in _JSON_COLUMNS and row.get(c) is not None else row.get(c) for c in PIECE_COLUMNS
        ]
        with self._lock:
            if self._room():
                self._inserts.append((self.run_id, *values))

    def add_seen(self, pieces: list[Piece], cfg: LineConfig) -> None:
        """Rows for pieces just tracked past the cameras, before their decision (outcome `seen`)."""
        for p in pieces:
            self.add_piece(seen_row(p, cfg, self._wall()))

    def update_outcome(
        self,
        piece_id: int,
        outcome: str,
        seq: int | None,
        t_accepted: float | None,
        latency_ms: float | None,
        plc_ms: float | None = None,
    ) -> None:
        with self._lock:
            if self._room():
                self._updates.append((outcome, seq, t_accepted, latency_ms, plc_ms, self.run_id, piece_id))

    def event(self, kind: str, **detail: Any) -> None:
        with self._lock:
            if self._room():
                self._events.append((self._wall(), self.run_id, kind, json.dumps(detail, default=str)))

    def add_shadow(self, decisions: list[ShadowDecision]) -> None:
        """A shadow model's decisions (a shadow tap: on the loop); the crop kept for the first SHADOW_CROPS_MAX
        differing pieces of the run."""
        t = self._wall()
        with self._lock:
            for s in decisions:
                if not self._room():
                    return
                crop = None
                if s.crop_png is not None and self.shadow_crops < SHADOW_CROPS_MAX:
                    crop, self.shadow_crops = s.crop_png, self.shadow_crops + 1
                live = (s.live_cls, s.live_fraction, s.live_confidence)
                self._shadow.append((self.run_id, s.piece_id, s.model, *live, s.cls, s.fraction, s.confidence, t, crop))

    def looked_at(self, camera: str, count32: int) -> None:
        """The latest frame of `camera` the service has looked at (written with the next flush)."""
        with self._lock:
            self._looked[camera] = count32

    def close_dead_runs(self) -> int:
        """Mark `lost_in_restart` every row an earlier run of the service left open; returns how many.

        A run that stops cleanly closes its rows (decided, or `cancelled`); rows still `seen`, `planned`
        or `pending` belong to a run that died before it knew their fate. Called once at start, before
        this run writes anything (so none of its own rows can be caught). Raises sqlite3.Error if the
        database cannot be written.
        """
        marks = ",".join("?" * len(OPEN_OUTCOMES))
        with self._db:
            self._db.execute("BEGIN")
            rows = list(
                self._db.execute(
                    f"SELECT run_id, COUNT(*) FROM pieces WHERE run_id<>? AND outcome IN ({marks}) GROUP BY run_id",
                    (self.run_id, *OPEN_OUTCOMES),
                )
            )
            self._db.execute(
                f"UPDATE pieces SET outcome=? WHERE run_id<>? AND outcome IN ({marks})",
                (Outcome.LOST_IN_RESTART, self.run_id, *OPEN_OUTCOMES),
            )
            for run, n in rows:
                detail = json.dumps({"dead_run": run, "pieces": n})
                self._db.execute(
                    "INSERT INTO events VALUES (?,?,?,?)", (self._wall(), self.run_id, "lost_in_restart", detail)
                )
        return sum(n for _, n in rows)

    @property
    def pending_writes(self) -> int:
        return len(self._inserts) + len(self._updates) + len(self._events) + len(self._shadow)

    def check_free(self, now: float | None = None) -> None:
        """Update `disk_low` from the free space of the database's disk (at most every FREE_CHECK_S)."""
        now = time.monotonic() if now is None else now
        if self.min_free_mb <= 0 or now - self._free_checked < FREE_CHECK_S:
            return
        self._free_checked = now
        try:
            st = os.statvfs(self.path.parent)
        except OSError as exc:
            self.disk_low = f"cannot read the free space of {self.path.parent}: {exc}"
            return
        free_mb = st.f_bavail * st.f_frsize / 1e6
        self.disk_low = (
            f"{free_mb:.1f} MB free on the records disk ({self.path.parent}), below records.min_free_mb "
            f"{self.min_free_mb:g}"
            if free_mb < self.min_free_mb
            else None
        )

    def flush(self) -> None:
        self.check_free()  # on the writer thread: a disk that hangs must not hold up the service loop
        with self._lock:
            if not self.pending_writes and not self._looked:
                return
            ins, upd, ev, sh = self._inserts, self._updates, self._events, self._shadow
            self._inserts, self._updates, self._events, self._shadow = [], [], [], []
            looked, self._looked = self._looked, {}
            self._writing = len(ins) + len(upd) + len(ev) + len(sh)
        try:
            self._write(ins, upd, ev, [(self.run_id, cam, c) for cam, c in looked.items()], sh)
        except sqlite3.Error as exc:
            with self._lock:  # keep them for the next flush: a full or locked disk must not lose records
                self._inserts[:0], self._updates[:0], self._events[:0], self._shadow[:0] = ins, upd, ev, sh
                self._looked = looked | self._looked  # newer positions win
                self._writing = 0
            self.error = str(exc)
            raise
        with self._lock:
            self._writing = 0
        self.error = None
        self.written += len(ins)

    def _write(
        self,
        ins: list[tuple[Any, ...]],
        upd: list[tuple[Any, ...]],
        ev: list[tuple[Any, ...]],
        looked: list[tuple[str, str, int]] = [],  # noqa: B006 - never mutated
        shadow: list[tuple[Any, ...]] = [],  # noqa: B006 - never mutated
    ) -> None:
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany(_INSERT, ins)
            self._db.executemany(
                "UPDATE pieces SET outcome=?, seq=COALESCE(?, seq), t_accepted=?, latency_ms=?, plc_ms=?"
                " WHERE run_id=? AND id=?",
                upd,
            )
            self._db.executemany("INSERT INTO events VALUES (?,?,?,?)", ev)
            self._db.executemany("INSERT OR REPLACE INTO looked VALUES (?,?,?)", looked)
            self._db.executemany("INSERT OR REPLACE INTO shadow VALUES (?,?,?,?,?,?,?,?,?,?,?)", shadow)

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


SHADOW_COLUMNS = "run_id, piece_id, model, live_cls, live_fraction, live_confidence, cls, fraction, confidence, t_wall"


def load_shadow(path: Path, run_id: str | None = None, *, crops: bool = False) -> list[dict[str, Any]]:
    """A run's shadow rows (all runs' without run_id), by piece; `crops`: with the differing pieces' PNGs.
    An older database without the table has none."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='shadow'").fetchone():
            return []
        cols = f"{SHADOW_COLUMNS}, crop IS NOT NULL AS has_crop" + (", crop" if crops else "")
        q = f"SELECT {cols} FROM shadow" + (" WHERE run_id=?" if run_id else "") + " ORDER BY run_id, piece_id"
        return [dict(r) for r in db.execute(q, (run_id,) if run_id else ())]
    finally:
        db.close()


def shadow_crop(path: Path, run_id: str, piece_id: int) -> bytes | None:
    """One differing piece's crop (PNG) from the shadow table, None if it has none."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT crop FROM shadow WHERE run_id=? AND piece_id=? AND crop IS NOT NULL", (run_id, piece_id)
        ).fetchone()
        return None if row is None else bytes(row[0])
    finally:
        db.close()


def seen_row(p: Piece, cfg: LineConfig, t_wall: float) -> dict[str, Any]:
    """A piece's row when it is first seen (tracked past the cameras, not decided): where it is, and that
    it rides to the default fraction unless its decision says otherwise."""
    cpm = cfg.belt.counts_per_mm
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
        "fraction": cfg.routing.default_fraction,
        "outcome": Outcome.SEEN,
    }


def piece_row(plan: Plan, cfg: LineConfig, t_wall: float, latency: LatencyParts | None = None) -> dict[str, Any]:
    """A decided piece's row of the `pieces` table (its outcome `pending` until the PLC answers its command)."""
    d, cmd = plan.decision, plan.command
    return seen_row(d.piece, cfg, t_wall) | {
        "settle_ms": latency.settle_ms if latency else None,
        "field_wait_ms": latency.field_wait_ms if latency else None,
        "compute_ms": latency.compute_ms if latency else None,
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
