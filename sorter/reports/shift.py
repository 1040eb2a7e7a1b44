"""Shift and batch reports from the piece records alone (`sorter report`): the entry point.

A plant has no ground truth: everything here comes from the records database the service writes
(`sorter/line/records.py`: one row per piece, plus the events table). The demo's report (`sim/report.py`)
is a different thing: it judges the same records against the simulator's truth, and `sorter sim
crosscheck` (sim/crosscheck.py) compares the two.

What the report holds, for a time range and/or one run:
- throughput over time (pieces/min, estimated kg/h), with the periods the line was not in Execute;
- composition by decided class, fraction counts and estimated masses, a confidence histogram;
- the mass balance: in = every recorded piece, out = the sum of the fractions (each record is in exactly
  one fraction, so it must close; a record naming an unconfigured fraction shows up as a gap), and, for
  every run that ended inside the range, the service's own counters at stop against the records;
- eject outcomes (accepted, held, expired, conflict...), Hall-bar reading states, decision latency;
- alarms and stops from the events table (alarm/alarm_cleared/state/start/stop/model_swap).

Masses are estimates: the camera sees a piece's projected area, not its volume. Mass ≈ area × nominal
thickness × density of the decided class, with a thickness rule per class (sorter/reports/mass.py). It is
good for trends and rough kg/h, not for invoicing: check it against weighed bins and adjust the line
config's `reports.mass_model` (one `MassRule` per class, sorter/config/schema.py).

Output: a self-contained HTML file (tables, plots as embedded PNG), optionally a PDF (matplotlib's
PdfPages) and a CSV of the range's records.

The modules, one job each: load (records and events of a range), mass (the mass estimate), events (state
periods, alarms, stops), summary (the numbers), plots, tables, html_page, pdf, csv_export; times and errors
are shared by all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sorter.config import LineConfig
from sorter.reports.csv_export import write_csv
from sorter.reports.errors import ReportError
from sorter.reports.html_page import write_html
from sorter.reports.load import ShiftData, load_range
from sorter.reports.mass import add_mass_estimates
from sorter.reports.pdf import write_pdf
from sorter.reports.plots import close_figures, make_figures
from sorter.reports.summary import summarise
from sorter.reports.tables import make_tables
from sorter.reports.times import iso, parse_time

__all__ = ["ReportError", "make_report", "summarise_records"]


def summarise_records(
    cfg: LineConfig,
    *,
    db: Path | None = None,
    t_from: str | None = None,
    t_to: str | None = None,
    run: str | None = None,
) -> tuple[ShiftData, dict[str, Any]]:
    """The records of a range and/or run (default database: the config's records.path), and their numbers."""
    lo = parse_time(t_from, "--from") if t_from else None
    hi = parse_time(t_to, "--to") if t_to else None
    data = load_range(db or cfg.records.path, lo, hi, run)
    add_mass_estimates(data.pieces, cfg.reports.mass_model)
    return data, summarise(data, cfg)


def make_report(
    cfg: LineConfig,
    out: Path,
    *,
    db: Path | None = None,
    t_from: str | None = None,
    t_to: str | None = None,
    run: str | None = None,
    pdf: Path | None = None,
    csv_path: Path | None = None,
    summary_json: Path | None = None,
) -> dict[str, Any]:
    """Write the report (HTML, optional PDF, CSV and summary JSON); returns the summary."""
    data, summary = summarise_records(cfg, db=db, t_from=t_from, t_to=t_to, run=run)
    title = f"Shift report {iso(data.t_from)} – {iso(data.t_to)}" if run is None else f"Batch report, run {run}"
    figs = make_figures(data, summary, cfg)
    tables = make_tables(summary)
    try:
        write_html(out, summary, tables, figs, title)
        if pdf is not None:
            write_pdf(pdf, tables, figs, title)
        if csv_path is not None:
            write_csv(csv_path, data.pieces)
        if summary_json is not None:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps(summary, indent=2, default=str))
    except OSError as exc:
        raise ReportError(f"cannot write the report: {exc}") from None
    finally:
        close_figures(figs)
    return summary
