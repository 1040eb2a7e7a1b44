"""The shift report's numbers against the demo's report of the same run (`sorter sim crosscheck`).

A development check, not part of the product: `sorter report` (sorter/reports/) counts the service's
records alone, the demo's report (sim/report.py, `sorter demo --json`, the run folder's report.json)
judges the same records against the simulator's truth. Comparing the two checks both.

Exact: both count the same records (the demo's report reads them from the same database), so the
number of records, the eject outcomes, the commands sent and the decision latency must be equal.
Not exact: the demo's fraction counts are the simulator's *bins* (where each piece physically
landed, ground truth), the report's are where the records say each piece ended (routed, unless no
air fired); they differ by the pieces the air missed or blew into the wrong bin, and by pieces the
service never saw as pieces of their own (touching pieces recorded as one), i.e. by what purity,
recovery and `pieces_accounted` measure. The estimated masses are compared with the bins' true
masses in the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sorter.config import LineConfig
from sorter.reports.shift import ReportError, summarise_records
from sorter.reports.tables import Table, fmt, pct, yes_no


def load_demo_report(path: Path) -> dict[str, Any]:
    """A `sorter demo --json` report; ReportError if it cannot be read or is something else."""
    try:
        demo = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read the demo report: {exc}") from None
    if not isinstance(demo, dict) or "fractions" not in demo:
        raise ReportError(f"{path}: not a `sorter demo --json` report")
    return demo


def cross_check(summary: dict[str, Any], demo: dict[str, Any]) -> dict[str, Any]:
    """The shift report's summary (sorter/reports/summary.py) against a `sorter demo --json` report."""
    exact = {
        "records": (summary["pieces"], demo.get("records")),
        "eject_outcomes": (summary["outcomes"], demo.get("eject_outcomes")),
        "ejects_sent": (summary["ejects_sent"], demo.get("ejects_sent")),
        "decision_latency_ms": (summary["decision_latency_ms"], demo.get("decision_latency_ms")),
    }
    checks = {k: {"report": a, "demo": b, "equal": a == b} for k, (a, b) in exact.items()}
    bins = {}
    for f, r in summary["fractions"].items():
        t = demo.get("fractions", {}).get(f, {})
        tm = t.get("mass_g")
        bins[f] = {
            "in_fraction_by_records": r["count"],
            "landed_in_bin": t.get("count"),
            "difference": r["count"] - t["count"] if "count" in t else None,
            "mass_est_kg": r["mass_est_kg"],
            "mass_true_kg": round(tm / 1000, 3) if tm is not None else None,
            "mass_error": round(r["mass_est_kg"] * 1000 / tm - 1, 4) if tm else None,
            "demo_purity": t.get("purity"),
            "demo_recovery": t.get("recovery"),
        }
    return {
        "exact": checks,
        "all_equal": all(c["equal"] for c in checks.values()),
        "bins": bins,
        "pieces_fed": demo.get("pieces_fed"),
        "pieces_binned": demo.get("pieces_binned"),
        "demo_seed": demo.get("seed"),
        "demo_duration_s": demo.get("duration_s"),
    }


def crosscheck_run(
    cfg: LineConfig, demo_report: Path, *, db: Path | None = None, run: str | None = None
) -> dict[str, Any]:
    """Read the demo's report, summarise the records as `sorter report` does, and compare."""
    demo = load_demo_report(demo_report)
    _, summary = summarise_records(cfg, db=db, run=run)
    return cross_check(summary, demo)


def differences(check: dict[str, Any]) -> list[str]:
    """The exact figures that differ (none: the two reports agree)."""
    return [k for k, c in check["exact"].items() if not c["equal"]]


def crosscheck_tables(check: dict[str, Any]) -> list[Table]:
    """The exact figures side by side, then the records' fractions against the bins."""
    return [exact_table(check), bins_table(check)]


def exact_table(check: dict[str, Any]) -> Table:
    return Table(
        "Cross-check with the demo's report (same records)",
        ["figure", "this report", "demo report", "equal"],
        [[k, json.dumps(c["report"]), json.dumps(c["demo"]), yes_no(c["equal"])] for k, c in check["exact"].items()],
        "The demo's report reads the same records database: these must be equal.",
    )


def bins_table(check: dict[str, Any]) -> Table:
    header = [
        "fraction",
        "ended in (records)",
        "landed (truth)",
        "difference",
        "est. kg",
        "true kg",
        "mass error",
        "purity",
        "recovery",
    ]
    rows = [
        [
            f,
            b["in_fraction_by_records"],
            fmt(b["landed_in_bin"]),
            fmt(b["difference"]),
            fmt(b["mass_est_kg"]),
            fmt(b["mass_true_kg"]),
            pct(b["mass_error"]),
            pct(b["demo_purity"]),
            pct(b["demo_recovery"]),
        ]
        for f, b in check["bins"].items()
    ]
    return Table(
        "Ended in (records) vs landed in the bins (demo ground truth)",
        header,
        rows,
        f"The demo fed {check['pieces_fed']} pieces ({check['pieces_binned']} reached a bin). Its fraction "
        "counts are where pieces physically landed; the records say where each piece ended. They differ by "
        "the pieces the air missed or blew into a neighbouring bin (what purity and recovery measure) and "
        "by touching pieces recorded as one. "
        "The true masses (simulator) show how far the area-based mass estimate is off.",
    )
