"""The report as a PDF (matplotlib's PdfPages, A4 landscape): the tables as text pages, then the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sorter.reports.tables import Table, text_lines

LINES_PER_PAGE = 66
A4_LANDSCAPE_IN = (11.69, 8.27)


def write_pdf(path: Path, tables: list[Table], figs: dict[str, Any], title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    path.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(path) as pdf:
        # tables as monospaced text pages (landscape: wide tables fit), as many per page as fit
        lines: list[str] = [title, ""]
        for t in tables:
            lines += text_lines(t)
        for i in range(0, len(lines), LINES_PER_PAGE):
            fig = plt.figure(figsize=A4_LANDSCAPE_IN)
            fig.text(0.04, 0.96, "\n".join(lines[i : i + LINES_PER_PAGE]), family="monospace", fontsize=6.5, va="top")
            pdf.savefig(fig)
            plt.close(fig)
        for fig in figs.values():
            pdf.savefig(fig)
        d = pdf.infodict()
        d["Title"] = title
        d["Creator"] = "sorter report"
