"""The report's tables, one source for the HTML page and the PDF: built from the summary, one function each."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

from sorter.reports.times import iso


@dataclass
class Table:
    title: str
    header: list[str]  # all empty: a table without a header row
    rows: list[list[Any]]
    note: str = ""


def fmt(v: Any, digits: int = 3) -> str:
    """A cell: None as "-", floats to `digits` decimals (very large ones in 4 significant digits)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def pct(v: float | None) -> str:
    """A share as a percentage with two decimals; "-" for none."""
    return "-" if v is None else f"{100 * v:.2f} %"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def text_lines(t: Table) -> list[str]:
    """The table as monospaced text: title, header, rows (columns up to 60 characters), note, a blank line."""
    cells = [[fmt(c) for c in r] for r in t.rows]
    header = t.header if any(t.header) else [""] * (len(cells[0]) if cells else 0)
    width = [min(60, max([len(str(h)), *(len(r[i]) for r in cells)])) for i, h in enumerate(header)]  # rows or not
    out = [t.title.upper()]
    if any(t.header):
        out.append("  ".join(h.ljust(w)[:w] for h, w in zip(header, width, strict=True)))
    for r in cells:
        out.append("  ".join(c.ljust(w)[:w] for c, w in zip(r, width, strict=True)))
    if t.note:
        out += textwrap.wrap(t.note, 180)
    return [*out, ""]


def make_tables(s: dict[str, Any]) -> list[Table]:
    """The shift report's tables, in page order, from its summary (sorter/reports/summary.py)."""
    tables = [
        period_table(s),
        mass_balance_table(s["mass_balance"]),
        fractions_table(s["fractions"]),
        classes_table(s["classes"]),
        outcomes_table(s["outcomes"], s["ejects_sent"]),
        latency_and_field_table(s["decision_latency_ms"], s["field_states"]),
        state_time_table(s["state_s"], s["span_s"]),
        alarms_table(s["alarms"]),
        stops_table(s["stops"]),
    ]
    if s["run_checks"]:
        tables.append(run_checks_table(s["run_checks"]))
    tables.append(mass_model_table(s["mass_model"]))
    return tables


def period_table(s: dict[str, Any]) -> Table:
    return Table(
        "Period",
        ["", ""],
        [
            ["from", iso(s["from"])],
            ["to", iso(s["to"])],
            ["runs", ", ".join(r["run_id"] for r in s["runs"])],
            ["first / last piece", f"{iso(s['first_piece'])} / {iso(s['last_piece'])}"],
            ["pieces", s["pieces"]],
            ["estimated mass", f"{s['mass_est_kg']:.2f} kg"],
            [
                "throughput over the period",
                f"{fmt(s['pieces_per_min'], 1)} pieces/min, {fmt(s['kg_per_h_est'], 1)} kg/h (est.)",
            ],
            [
                "throughput while producing",
                f"{fmt(s['pieces_per_min_producing'], 1)} pieces/min, "
                f"{fmt(s['kg_per_h_est_producing'], 1)} kg/h (est.) over {s['producing_s']:.0f} s",
            ],
        ],
    )


def mass_balance_table(b: dict[str, Any]) -> Table:
    return Table(
        "Mass balance",
        ["", "pieces", "estimated kg"],
        [
            ["in (every recorded piece)", b["in_count"], fmt(b["in_mass_est_kg"])],
            ["out (sum of the fractions)", b["out_count"], fmt(b["out_mass_est_kg"])],
            ["unaccounted", b["unaccounted"], fmt(b["in_mass_est_kg"] - b["out_mass_est_kg"])],
            ["closes", yes_no(b["closes"]), ""],
        ],
        "Every record ends in exactly one fraction (see Fractions: 'ended in'); a record whose fraction the "
        "config does not know is unaccounted.",
    )


FRACTIONS_NOTE = (
    "Routed: where the service's decisions sent pieces. Ended in: where they went, as far as the records "
    "know: a piece routed to a product whose air never fired (command expired, PLC offline, valve "
    "conflict, cancelled) rides on into the default fraction. Unconfirmed: commands sent but never "
    "acknowledged by the PLC (timeout, pending), counted where they were routed. Shares and masses are of "
    "'ended in'. Estimated purity = mean probability (the model's, fused with the field) that a piece in "
    "the fraction belongs there: the model's belief, not a measurement."
)


def fractions_table(fractions: dict[str, dict[str, Any]]) -> Table:
    header = [
        "fraction",
        "routed",
        "ended in",
        "unconfirmed",
        "share",
        "est. kg",
        "mass share",
        "mean confidence",
        "est. purity",
        "decided classes",
    ]
    rows = [
        [
            f,
            r["routed"],
            r["count"],
            r["unconfirmed"],
            pct(r["share"]),
            fmt(r["mass_est_kg"]),
            pct(r["mass_share"]),
            fmt(r["mean_confidence"], 4),
            pct(r["purity_est"]),
            ", ".join(f"{c} {k}" for c, k in r["by_class"].items()),
        ]
        for f, r in fractions.items()
    ]
    return Table("Fractions", header, rows, FRACTIONS_NOTE)


def classes_table(classes: dict[str, dict[str, Any]]) -> Table:
    return Table(
        "Composition by decided class",
        ["class", "pieces", "est. kg", "mean confidence", "routed to (when confident)"],
        [
            [c, r["count"], fmt(r["mass_est_kg"]), fmt(r["mean_confidence"], 4), r["routed_to"]]
            for c, r in classes.items()
        ],
    )


OUTCOMES_NOTE = (
    "accepted: the PLC took the command; no_eject: default fraction, no air; held: the line was not in "
    "Execute, the piece went to the default fraction; expired: too late to reach the PLC, not sent; conflict: "
    "the valves would have hit a neighbour of another fraction; offline/timeout: the PLC link; cancelled: "
    "unanswered at shutdown; lost_in_restart: the service died (killed, power loss) after seeing the piece, "
    "its fate is unknown (the PLC's watchdog stopped the air within 0.5 s)."
)


def outcomes_table(outcomes: dict[str, int], ejects_sent: int) -> Table:
    return Table(
        "Eject outcomes",
        ["outcome", "pieces"],
        [[k, v] for k, v in outcomes.items()] + [["commands sent (with a sequence number)", ejects_sent]],
        OUTCOMES_NOTE,
    )


def latency_and_field_table(lat: dict[str, Any], field_states: dict[str, int]) -> Table:
    return Table(
        "Decision latency and Hall bar",
        ["", ""],
        [
            ["latency p50 / p99 / max ms", f"{fmt(lat['p50'])} / {fmt(lat['p99'])} / {fmt(lat['max'])} (n={lat['n']})"],
            *[[f"field reading {k}", v] for k, v in field_states.items()],
        ],
    )


def state_time_table(state_s: dict[str, float], span_s: float) -> Table:
    return Table(
        "Time per line state",
        ["state", "seconds", "share"],
        [[k, fmt(v, 1), pct(v / span_s) if span_s else "-"] for k, v in state_s.items()],
    )


def alarms_table(alarms: list[dict[str, Any]]) -> Table:
    rows = [
        [
            a["alarm"],
            iso(a["raised"]),
            "still active at stop" if a["active_at_stop"] else iso(a["cleared"]),
            fmt(a["duration_s"], 1),
            a["reason"],
        ]
        for a in alarms
    ]
    return Table("Alarms", ["alarm", "raised", "cleared", "duration s", "cause"], rows or [["none", "", "", "", ""]])


def stops_table(stops: list[dict[str, Any]]) -> Table:
    rows = [[iso(x["t"]), x["state"], x["why"]] for x in stops]
    return Table("Stops, holds and suspensions", ["time", "state", "why"], rows or [["none", "", ""]])


def run_checks_table(run_checks: list[dict[str, Any]]) -> Table:
    rows = []
    for rc in run_checks:
        rows.append([rc["run_id"], "pieces", rc["counter_pieces"], rc["records"], yes_no(rc["match"])])
        for f, v in rc["fractions"].items():
            rows.append(["", f, v["counter"], v["records"], yes_no(v["counter"] == v["records"])])
    return Table(
        "Service counters at stop vs records",
        ["run", "", "counter", "records", "equal"],
        rows,
        "The service counts every piece it records in memory and writes the counters into its stop event: "
        "an independent check that no record was lost between the loop and the database.",
    )


def mass_model_table(mass_model: dict[str, dict[str, float]]) -> Table:
    return Table(
        "Mass estimate (per decided class)",
        ["class", "density g/cm³", "thickness = a × width + b", "max mm"],
        [
            [
                c,
                f"{r['density_g_cm3']:g}",
                f"{r['frac_of_width']:g} × w + {r['offset_mm']:g} mm",
                f"{r['max_mm']:g}",
            ]
            for c, r in mass_model.items()
        ],
        "The camera measures projected area; mass = area × nominal thickness × density. An estimate for trends "
        "and kg/h, to be checked against weighed bins.",
    )
