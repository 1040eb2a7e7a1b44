"""The plant report (`sorter report --db postgresql://... [--line L ...]`): the shift report of one or
several lines from the plant's PostgreSQL (filled by each line's forwarder, sorter/north/plantdb/).

Each line gets the same numbers, tables and plots as a report from its own SQLite journal (the rows are
the same rows: sorter/reports/summary.py reads them alike), then the plant's totals: pieces and estimated
mass per fraction over all lines, and the plant's mass balance (in = every record, out = the fractions).

The lines' routing, fractions and mass model are the report config's (`--config`): the lines of a plant
share them. A line with another routing gets its own report (`--line L --config its.yaml`).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from sorter.config import LineConfig
from sorter.line.records import PIECE_COLUMNS
from sorter.reports.errors import ReportError
from sorter.reports.html_page import CSS, sections_html
from sorter.reports.load import ShiftData
from sorter.reports.mass import add_mass_estimates
from sorter.reports.plots import close_figures, make_figures
from sorter.reports.summary import summarise
from sorter.reports.tables import Table, make_tables
from sorter.reports.times import iso, parse_time

_SELECT_COLS = ", ".join(
    "piece_id AS id"
    if c == "id"
    else "extract(epoch FROM t_wall)::float8 AS t_wall"
    if c == "t_wall"
    else 'field_mt AS "field_mT"'
    if c == "field_mT"
    else c
    for c in PIECE_COLUMNS
)


def is_db_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without a password (it goes into the report)."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]+):[^@]*@", r"\1:***@", url)


def load_plant(url: str, lines: list[str] | None, t_from: float | None, t_to: float | None) -> dict[str, ShiftData]:
    """Per line (all lines with records in the range if `lines` is empty): its pieces and its runs' events."""
    if t_from is not None and t_to is not None and t_from >= t_to:
        raise ReportError(f"--from ({iso(t_from)}) is not before --to ({iso(t_to)})")
    where, args = ["true"], []
    if t_from is not None:
        where.append("t_wall >= to_timestamp(%s)")
        args.append(t_from)
    if t_to is not None:
        where.append("t_wall < to_timestamp(%s)")
        args.append(t_to)
    try:
        with psycopg.connect(url, connect_timeout=10, row_factory=dict_row) as conn:
            known = [r["line"] for r in conn.execute("SELECT DISTINCT line FROM plant.pieces ORDER BY line")]
            wanted = lines or known
            out: dict[str, ShiftData] = {}
            for line in wanted:
                pieces = conn.execute(
                    f"SELECT run_id, {_SELECT_COLS} FROM plant.pieces WHERE line = %s AND {' AND '.join(where)} "
                    "ORDER BY t_wall, run_id, piece_id",
                    [line, *args],
                ).fetchall()
                if not pieces:
                    continue
                runs = sorted({p["run_id"] for p in pieces})
                events = conn.execute(
                    "SELECT extract(epoch FROM t_wall)::float8 AS t_wall, run_id, kind, detail FROM plant.events "
                    "WHERE line = %s AND run_id = ANY(%s) ORDER BY t_wall, event_no",
                    [line, runs],
                ).fetchall()
                for p in pieces:
                    p["probs"] = p["probs"] or {}
                    p["image_probs"] = p["image_probs"] or {}
                for e in events:
                    e["detail"] = e["detail"] or {}
                lo = t_from if t_from is not None else min([pieces[0]["t_wall"], *(e["t_wall"] for e in events)])
                last = max([pieces[-1]["t_wall"], *(e["t_wall"] for e in events)])
                hi = t_to if t_to is not None else math.nextafter(last, math.inf)
                out[line] = ShiftData(f"{redact(url)} line {line}", pieces, events, lo, max(hi, lo + 1e-3), None, runs)
    except psycopg.Error as exc:
        raise ReportError(f"{redact(url)}: cannot read the plant database: {' '.join(str(exc).split())}") from None
    missing = sorted(set(wanted) - set(out))
    if not out:
        raise ReportError(
            f"{redact(url)}: no piece records for {', '.join(wanted) or 'any line'} in the range"
            + (f" (lines in the database: {', '.join(known)})" if known else "")
        )
    if lines and missing:
        raise ReportError(
            f"{redact(url)}: no piece records of line(s) {', '.join(missing)} in the range "
            f"(lines in the database: {', '.join(known)})"
        )
    return out


def plant_totals(
    data: dict[str, ShiftData], summaries: dict[str, dict[str, Any]], fractions: list[str]
) -> dict[str, Any]:
    """The plant's pieces and estimated mass per fraction and its mass balance, from every line's records
    (after summarise() set each piece's `dest`; sums of unrounded masses: the lines' rounded figures would
    not add up to the last gram)."""
    count: Counter[str] = Counter()
    mass_g: Counter[str] = Counter()
    for d in data.values():
        for p in d.pieces:
            count[p["dest"]] += 1
            mass_g[p["dest"]] += p["mass_est_g"]
    n = sum(len(d.pieces) for d in data.values())
    in_mass = sum(p["mass_est_g"] for d in data.values() for p in d.pieces)
    out_count = sum(count[f] for f in fractions)
    out_mass = sum(mass_g[f] for f in fractions)
    order = [*fractions, *sorted(set(count) - set(fractions))]
    return {
        "lines": sorted(summaries),
        "pieces": n,
        "mass_est_kg": round(in_mass / 1000, 3),
        "fractions": {f: {"count": count[f], "mass_est_kg": round(mass_g[f] / 1000, 3)} for f in order},
        "mass_balance": {
            "in_count": n,
            "out_count": out_count,
            "in_mass_est_kg": round(in_mass / 1000, 3),
            "out_mass_est_kg": round(out_mass / 1000, 3),
            "unaccounted": n - out_count,  # records naming a fraction the config does not have
            "closes": n == out_count and math.isclose(in_mass, out_mass, rel_tol=1e-9, abs_tol=1e-9),
            "lines_close": all(s["mass_balance"]["closes"] for s in summaries.values()),
        },
    }


def summarise_plant(
    cfg: LineConfig, url: str, lines: list[str] | None, t_from: str | None, t_to: str | None
) -> tuple[dict[str, ShiftData], dict[str, Any]]:
    lo = parse_time(t_from, "--from") if t_from else None
    hi = parse_time(t_to, "--to") if t_to else None
    data = load_plant(url, lines, lo, hi)
    per_line = {}
    for line, d in data.items():
        add_mass_estimates(d.pieces, cfg.reports.mass_model)
        per_line[line] = summarise(d, cfg)
    plant = plant_totals(data, per_line, cfg.fractions)
    summary = {"database": redact(url), "plant": plant, "lines": per_line}
    return data, summary


def make_plant_report(
    cfg: LineConfig,
    out: Path,
    url: str,
    *,
    lines: list[str] | None = None,
    t_from: str | None = None,
    t_to: str | None = None,
    summary_json: Path | None = None,
) -> dict[str, Any]:
    """Write the plant report (HTML, optional summary JSON); returns the summary."""
    data, summary = summarise_plant(cfg, url, lines, t_from, t_to)
    t_lo = min(d.t_from for d in data.values())
    t_hi = max(d.t_to for d in data.values())
    title = f"Plant report {iso(t_lo)} – {iso(t_hi)}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>From the piece records in the plant database <code>{html.escape(redact(url))}</code> "
        f"(no ground truth), lines {html.escape(', '.join(data))}.</p>",
        sections_html(plant_tables(summary["plant"]), {}),
    ]
    for line, d in data.items():
        s = summary["lines"][line]
        figs = make_figures(d, s, cfg)
        try:
            parts.append(f"<h1>Line {html.escape(line)}</h1>")
            parts.append(sections_html(make_tables(s), figs))
        finally:
            close_figures(figs)
    parts.append("</body></html>")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(parts))
        if summary_json is not None:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps(summary, indent=2, default=str))
    except OSError as exc:
        raise ReportError(f"cannot write the report: {exc}") from None
    return summary


def plant_tables(p: dict[str, Any]) -> list[Table]:
    b = p["mass_balance"]
    return [
        Table(
            "Plant: fractions over all lines",
            ["fraction", "pieces", "mass est. kg"],
            [[f, r["count"], r["mass_est_kg"]] for f, r in p["fractions"].items()]
            + [["all", p["pieces"], p["mass_est_kg"]]],
            "",
        ),
        Table(
            "Plant: mass balance",
            ["", "in", "out"],
            [
                ["pieces", b["in_count"], b["out_count"]],
                ["mass est. kg", b["in_mass_est_kg"], b["out_mass_est_kg"]],
                ["closes", "yes" if b["closes"] else "NO", "every line: " + ("yes" if b["lines_close"] else "NO")],
            ],
            "in = every record of every line; out = the configured fractions",
        ),
    ]
