"""The report as one self-contained HTML page: the tables, with the plots as embedded PNG."""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path
from typing import Any

from sorter.reports.tables import Table, fmt
from sorter.reports.times import iso

PNG_DPI = 80

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1000px;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0} td,th{border:1px solid #ccc;padding:.2em .5em}
th{background:#f0f0f0;text-align:left} td{text-align:right} td:first-child{text-align:left}
.note{font-size:.8em;color:#555;max-width:900px} img{max-width:100%} .bad{color:#b00;font-weight:bold}
"""

# tables (by title) and plots (by name) placed first, each plot after the table it illustrates; the rest follow
SECTION_ORDER = [
    "Period",
    "Mass balance",
    "throughput",
    "Fractions",
    "composition",
    "Composition by decided class",
    "confidence",
    "Eject outcomes",
    "Decision latency and Hall bar",
    "latency",
]


def write_html(path: Path, summary: dict[str, Any], tables: list[Table], figs: dict[str, Any], title: str) -> None:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>From the piece records in <code>{html.escape(summary['database'])}</code> only "
        f"(no ground truth). Generated {iso(datetime.now().timestamp())} by <code>sorter report</code>.</p>",
    ]
    parts.append(sections_html(tables, figs))
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def sections_html(tables: list[Table], figs: dict[str, Any]) -> str:
    """The tables and plots of one report, in page order (the plant report repeats it per line)."""
    parts = []
    by_title = {t.title: t for t in tables}
    done: set[str] = set()
    for key in SECTION_ORDER + [t.title for t in tables]:
        if key in done:
            continue
        done.add(key)
        if key in by_title:
            parts.append(table_html(by_title[key]))
        elif key in figs:
            parts.append(f"<img alt='{key}' src='data:image/png;base64,{png_base64(figs[key])}'>")
    return "\n".join(parts)


def table_html(t: Table) -> str:
    """A table as its <h2> title, the <table> (a "NO" cell marked bad) and its note."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header) if any(t.header) else ""
    rows = "".join(
        "<tr>" + "".join(f"<td{' class=bad' if str(c) == 'NO' else ''}>{html.escape(fmt(c))}</td>" for c in r) + "</tr>"
        for r in t.rows
    )
    note = f"<p class='note'>{html.escape(t.note)}</p>" if t.note else ""
    return f"<h2>{html.escape(t.title)}</h2><table>{'<tr>' + head + '</tr>' if head else ''}{rows}</table>{note}"


def png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    return base64.b64encode(buf.getvalue()).decode()
