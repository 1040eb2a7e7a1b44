"""Ground truth of a simulated run, in SQLite: every fed piece, where it ended,
and every valve window the PLC really fired."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS pieces (
    id INTEGER PRIMARY KEY, cls TEXT NOT NULL, variant TEXT, shape TEXT,
    mass_g REAL, area_mm2 REAL, x_mm REAL, s_mm REAL,
    count INTEGER NOT NULL,  -- unwrapped encoder count when its centroid crossed the camera line
    x0_mm REAL, x1_mm REAL, length_mm REAL,
    bin TEXT, bank INTEGER, seq INTEGER, err_mm REAL
);
CREATE TABLE IF NOT EXISTS windows (
    seq INTEGER, bank INTEGER, open_at INTEGER, open_for INTEGER, p_open REAL, p_close REAL, spans TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class TruthStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def add_pieces(self, rows: list[tuple[Any, ...]]) -> None:
        self._db.executemany(
            "INSERT INTO pieces (id, cls, variant, shape, mass_g, area_mm2, x_mm, s_mm, count, x0_mm, x1_mm,"
            " length_mm) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )

    def set_outcomes(self, rows: list[tuple[Any, ...]]) -> None:
        self._db.executemany("UPDATE pieces SET bin=?, bank=?, seq=?, err_mm=? WHERE id=?", rows)

    def add_windows(self, rows: list[tuple[Any, ...]]) -> None:
        self._db.executemany("INSERT INTO windows VALUES (?,?,?,?,?,?,?)", rows)

    def set_meta(self, **items: Any) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items.items()]
        )

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.commit()
        self._db.close()


def load_truth(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    pieces = [dict(r) for r in db.execute("SELECT * FROM pieces ORDER BY id")]
    windows = [dict(r) for r in db.execute("SELECT * FROM windows")]
    meta = {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT * FROM meta")}
    db.close()
    return pieces, windows, meta
