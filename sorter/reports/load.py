"""Loading a report's input: the piece records of a time range and/or run, and the events of their runs.

Read-only from the records database the service writes (sorter/line/records.py: the pieces and events
tables); JSON columns decoded.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorter.reports.errors import ReportError
from sorter.reports.times import iso


@dataclass
class ShiftData:
    db: Path | str  # the SQLite journal, or the plant database and line (sorter/reports/plant.py)
    pieces: list[dict[str, Any]]
    events: list[dict[str, Any]]  # every event of the runs involved (state timelines need what came before)
    t_from: float
    t_to: float
    run: str | None
    runs: list[str] = field(default_factory=list)


def load_range(db: Path, t_from: float | None = None, t_to: float | None = None, run: str | None = None) -> ShiftData:
    """The records in [t_from, t_to) (of one run if given), and the events of the runs they belong to.

    Without a bound, the range covers the runs involved from their first to their last record or event.
    """
    if t_from is not None and t_to is not None and t_from >= t_to:
        raise ReportError(f"--from ({iso(t_from)}) is not before --to ({iso(t_to)})")
    if not db.exists():
        raise ReportError(f"records database {db} does not exist (the config's records.path)")
    try:
        pieces, events, run_ids, known_runs = _read(db, t_from, t_to, run)
    except sqlite3.Error as exc:
        raise ReportError(f"{db}: cannot read the records database: {exc}") from None
    if not pieces:
        raise ReportError(_no_records_message(db, t_from, t_to, run, known_runs))
    for p in pieces:
        for c in ("probs", "image_probs"):
            p[c] = json.loads(p[c]) if p[c] else {}
        if p["cls"] is None:  # seen but never decided (still open, or lost_in_restart): no class, no confidence
            p["cls"] = UNDECIDED
    for e in events:
        e["detail"] = json.loads(e["detail"]) if e["detail"] else {}
    lo = t_from if t_from is not None else min([pieces[0]["t_wall"], *(e["t_wall"] for e in events)])
    last = max([pieces[-1]["t_wall"], *(e["t_wall"] for e in events)])
    hi = t_to if t_to is not None else math.nextafter(last, math.inf)  # `to` is exclusive: include the last
    return ShiftData(db, pieces, events, lo, max(hi, lo + 1e-3), run, run_ids)


UNDECIDED = "undecided"  # the class shown for a piece recorded before its decision


def _read(
    db: Path, t_from: float | None, t_to: float | None, run: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[str]]:
    """(pieces in range, events of their runs, those runs, every run in the database), rows undecoded."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    where: list[str] = ["1=1"]
    args: list[float | str] = []
    if t_from is not None:
        where.append("t_wall >= ?")
        args.append(t_from)
    if t_to is not None:
        where.append("t_wall < ?")
        args.append(t_to)
    if run is not None:
        where.append("run_id = ?")
        args.append(run)
    q = f"SELECT * FROM pieces WHERE {' AND '.join(where)} ORDER BY t_wall"
    pieces = [dict(r) for r in con.execute(q, args)]
    run_ids = sorted({p["run_id"] for p in pieces})
    if run is not None and run not in run_ids:
        run_ids = [run]
    q = f"SELECT * FROM events WHERE run_id IN ({','.join('?' * len(run_ids))}) ORDER BY t_wall"
    events = [dict(r) for r in con.execute(q, run_ids)] if run_ids else []
    known_runs = [r[0] for r in con.execute("SELECT DISTINCT run_id FROM pieces")]
    con.close()
    return pieces, events, run_ids, known_runs


def _no_records_message(
    db: Path, t_from: float | None, t_to: float | None, run: str | None, known_runs: list[str]
) -> str:
    what = [f"from {iso(t_from)}" if t_from else "", f"to {iso(t_to)}" if t_to else "", f"run {run}" if run else ""]
    selection = " ".join(w for w in what if w) or "at all"
    hint = f" (runs in the database: {', '.join(known_runs[-5:])})" if run and known_runs else ""
    return f"{db}: no piece records {selection}{hint}"
