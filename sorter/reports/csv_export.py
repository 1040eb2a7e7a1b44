"""The range's piece records as CSV: one row per piece, with its local time and estimated mass."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sorter.line.records import PIECE_COLUMNS
from sorter.reports.times import iso


def write_csv(path: Path, pieces: list[dict[str, Any]]) -> None:
    cols = ["run_id", "time", *PIECE_COLUMNS, "mass_est_g"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for p in pieces:
            row = {**p, "time": iso(p["t_wall"]), "mass_est_g": round(p["mass_est_g"], 3)}
            w.writerow([json.dumps(row[c]) if isinstance(row.get(c), dict) else row.get(c) for c in cols])
