"""Shift and batch reports from the piece records alone (`sorter report`).

A plant has no ground truth: everything here comes from the records database the service writes
(`sorter/line/records.py`: one row per piece, plus the events table). The demo's report (`sim/report.py`)
is a different thing: it judges the same records against the simulator's truth.

What the report holds, for a time range and/or one run:
- throughput over time (pieces/min, estimated kg/h), with the periods the line was not in Execute;
- composition by decided class, fraction counts and estimated masses, a confidence histogram;
- the mass balance: in = every recorded piece, out = the sum of the fractions (each record is in exactly
  one fraction, so it must close; a record naming an unconfigured fraction shows up as a gap), and, for
  every run that ended inside the range, the service's own counters at stop against the records;
- eject outcomes (accepted, held, expired, conflict...), Hall-bar reading states, decision latency;
- alarms and stops from the events table (alarm/alarm_cleared/state/start/stop/model_swap).

Masses are estimates: the camera sees a piece's projected area, not its volume. Mass ≈ area × nominal
thickness × density of the decided class, with a thickness rule per class (`MASS_MODEL`). It is good for
trends and rough kg/h, not for invoicing: check it against weighed bins and adjust `MASS_MODEL`.

Output: a self-contained HTML file (tables, plots as embedded PNG), optionally a PDF (matplotlib's
PdfPages) and a CSV of the range's records.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sorter.config import LineConfig
from sorter.line.records import PIECE_COLUMNS
from sorter.reports.stats import percentiles


class ReportError(Exception):
    """Bad input for a report: the message says what to fix (the CLI exits 2)."""


# --- the mass estimate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MassRule:
    """Nominal thickness (mm) = frac_of_width × the piece's mean width + offset_mm, capped at max_mm."""

    density_g_cm3: float
    frac_of_width: float
    offset_mm: float
    max_mm: float


# Handbook densities; thickness rules from the pieces' usual shapes: sintered magnets are chunky (blocks,
# arcs, discs: thickness grows with size), steel parts are mostly sheet/washers/screws, "other" is a mix
# (copper, brass, aluminium, plastic, PCB: a mixed density).
MASS_MODEL: dict[str, MassRule] = {
    "ndfeb": MassRule(7.5, 0.4, 1.0, 20.0),
    "ferrite": MassRule(4.9, 0.4, 1.0, 20.0),
    "smco": MassRule(8.4, 0.4, 1.0, 20.0),
    "steel": MassRule(7.85, 0.15, 1.5, 10.0),
    "other": MassRule(4.0, 0.15, 1.5, 10.0),
}


def estimate_mass_g(row: dict[str, Any]) -> float:
    """Estimated mass of a recorded piece (g): projected area × nominal thickness × density of its class."""
    area = row.get("area_mm2") or 0.0
    if area <= 0:
        return 0.0
    rule = MASS_MODEL.get(row.get("cls") or "", MASS_MODEL["other"])
    across = (row.get("x1_mm") or 0.0) - (row.get("x0_mm") or 0.0)
    longest = max(row.get("length_mm") or 0.0, across, 1e-6)
    width = min(area / longest, longest)  # mean width across the piece's longest extent
    thickness = min(rule.frac_of_width * width + rule.offset_mm, rule.max_mm)
    return area * thickness * rule.density_g_cm3 / 1000.0


# --- loading ----------------------------------------------------------------------------------------


def parse_time(text: str, what: str) -> float:
    """ISO 8601 date or date-time (naive: this machine's local time) -> unix time."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{what} {text!r} is not an ISO 8601 date or time (e.g. 2026-11-28T06:00)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.timestamp()


def iso(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).astimezone().isoformat(timespec="seconds")


@dataclass
class ShiftData:
    db: Path
    pieces: list[dict[str, Any]]
    events: list[dict[str, Any]]  # every event of the runs involved (state timelines need what came before)
    t_from: float
    t_to: float
    run: str | None
    runs: list[str] = field(default_factory=list)


def load_range(db: Path, t_from: float | None = None, t_to: float | None = None, run: str | None = None) -> ShiftData:
    """The records in [t_from, t_to) (of one run if given), and the events of the runs they belong to."""
    if t_from is not None and t_to is not None and t_from >= t_to:
        raise ReportError(f"--from ({iso(t_from)}) is not before --to ({iso(t_to)})")
    if not db.exists():
        raise ReportError(f"records database {db} does not exist (the config's records.path)")
    try:
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
    except sqlite3.Error as exc:
        raise ReportError(f"{db}: cannot read the records database: {exc}") from None
    if not pieces:
        what = [f"from {iso(t_from)}" if t_from else "", f"to {iso(t_to)}" if t_to else "", f"run {run}" if run else ""]
        sel = " ".join(w for w in what if w) or "at all"
        hint = f" (runs in the database: {', '.join(known_runs[-5:])})" if run and known_runs else ""
        raise ReportError(f"{db}: no piece records {sel}{hint}")
    for p in pieces:
        for c in ("probs", "image_probs"):
            p[c] = json.loads(p[c]) if p[c] else {}
        p["mass_est_g"] = estimate_mass_g(p)
    for e in events:
        e["detail"] = json.loads(e["detail"]) if e["detail"] else {}
    # without a bound, the range covers the runs involved from their start to their stop
    lo = t_from if t_from is not None else min([pieces[0]["t_wall"], *(e["t_wall"] for e in events)])
    last = max([pieces[-1]["t_wall"], *(e["t_wall"] for e in events)])
    hi = t_to if t_to is not None else math.nextafter(last, math.inf)  # `to` is exclusive: include the last
    return ShiftData(db, pieces, events, lo, max(hi, lo + 1e-3), run, run_ids)


# --- the numbers ------------------------------------------------------------------------------------


def _time_bin_s(span_s: float) -> float:
    for b in (60, 300, 900, 1800, 3600):
        if span_s / b <= 150:
            return float(b)
    return 3600.0 * math.ceil(span_s / 3600 / 150)


def state_periods(events: list[dict[str, Any]], t_end: float) -> list[tuple[str, float, float, str]]:
    """(state, t0, t1, run) for each run's PackML states, from its start/state/stop events."""
    out: list[tuple[str, float, float, str]] = []
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_run[e["run_id"]].append(e)
    for run_id, evs in by_run.items():
        cur: str | None = None
        t0 = 0.0
        for e in evs:
            if e["kind"] == "start":
                cur, t0 = "Stopped", e["t_wall"]
            elif e["kind"] == "state":
                if cur is not None:
                    out.append((cur, t0, e["t_wall"], run_id))
                cur, t0 = e["detail"].get("new", "?"), e["t_wall"]
            elif e["kind"] == "stop":
                if cur is not None:
                    out.append((cur, t0, e["t_wall"], run_id))
                cur = None
        if cur is not None:  # still running (or crashed without a stop event)
            out.append((cur, t0, max(t_end, t0), run_id))
    return out


def _clip(t0: float, t1: float, lo: float, hi: float) -> float:
    return max(0.0, min(t1, hi) - max(t0, lo))


def destination(p: dict[str, Any], default: str) -> str:
    """Where a recorded piece ended up, as far as the records know.

    The record's `fraction` is where the service routed the piece; with no air fired (the command
    expired, the PLC link was down, a valve conflict, no belt speed, cancelled at shutdown) the piece
    rides on into the default fraction whatever it was routed to.
    """
    return default if p["outcome"] in NO_AIR else p["fraction"]


# outcomes after which no air was fired for the piece, and those where the PLC never confirmed the command
NO_AIR = frozenset({"expired", "offline", "conflict", "no_speed", "cancelled"})
UNCONFIRMED = frozenset({"timeout", "pending"})


def summarise(data: ShiftData, cfg: LineConfig) -> dict[str, Any]:
    pieces, lo, hi = data.pieces, data.t_from, data.t_to
    routing, default = cfg.routing.classes, cfg.routing.default_fraction
    for p in pieces:
        p["dest"] = destination(p, default)
    fractions = list(dict.fromkeys([*cfg.fractions, *(p["fraction"] for p in pieces)]))
    n = len(pieces)
    mass = sum(p["mass_est_g"] for p in pieces)

    def belongs(p: dict[str, Any], f: str) -> float:
        return sum(v for c, v in p["probs"].items() if routing.get(c, default) == f)

    frac_rows: dict[str, Any] = {}
    for f in fractions:
        inside = [p for p in pieces if p["dest"] == f]
        m = sum(p["mass_est_g"] for p in inside)
        frac_rows[f] = {
            "count": len(inside),
            "routed": sum(1 for p in pieces if p["fraction"] == f),  # the decisions, before what the air did
            "unconfirmed": sum(1 for p in inside if p["outcome"] in UNCONFIRMED),
            "share": round(len(inside) / n, 4) if n else None,
            "mass_est_kg": round(m / 1000, 3),
            "mass_share": round(m / mass, 4) if mass else None,
            "by_class": dict(sorted(Counter(p["cls"] for p in inside).items())),
            "mean_confidence": round(float(np.mean([p["confidence"] for p in inside])), 4) if inside else None,
            # what the model believes, not a measurement: mean probability that a piece here belongs here
            "purity_est": round(float(np.mean([belongs(p, f) for p in inside])), 4) if inside else None,
        }
    configured = set(cfg.fractions)
    out_count = sum(r["count"] for f, r in frac_rows.items() if f in configured)
    out_mass = sum(p["mass_est_g"] for p in pieces if p["dest"] in configured)
    balance = {
        "in_count": n,
        "out_count": out_count,
        "in_mass_est_kg": round(mass / 1000, 3),
        "out_mass_est_kg": round(out_mass / 1000, 3),
        "unaccounted": n - out_count,  # records naming a fraction the config does not have
        "closes": n == out_count and math.isclose(mass, out_mass, rel_tol=1e-9, abs_tol=1e-9),
    }
    classes = sorted({p["cls"] for p in pieces})
    class_rows = {
        c: {
            "count": sum(1 for p in pieces if p["cls"] == c),
            "mass_est_kg": round(sum(p["mass_est_g"] for p in pieces if p["cls"] == c) / 1000, 3),
            "mean_confidence": round(float(np.mean([p["confidence"] for p in pieces if p["cls"] == c])), 4),
            "routed_to": routing.get(c, default),
        }
        for c in classes
    }
    outcomes = dict(sorted(Counter(p["outcome"] for p in pieces).items()))
    # time in each state within the range
    periods = state_periods(data.events, hi)
    state_s: dict[str, float] = defaultdict(float)
    for st, t0, t1, _ in periods:
        if (d := _clip(t0, t1, lo, hi)) > 0:
            state_s[st] += d
    producing_s = sum(state_s.get(s, 0.0) for s in ("Execute", "Suspending", "Suspended", "Unsuspending"))
    span = hi - lo
    # alarms: raised -> cleared
    alarms: list[dict[str, Any]] = []
    open_alarms: dict[tuple[str, str], dict[str, Any]] = {}
    stops: list[dict[str, Any]] = []
    last_why: dict[str, str] = {}
    for e in data.events:
        d, key = e["detail"], (e["run_id"], e["detail"].get("alarm", ""))
        if e["kind"] == "alarm":
            a = {
                "alarm": d.get("alarm"),
                "raised": e["t_wall"],
                "cleared": None,
                "active_at_stop": False,
                "reason": d.get("reason", ""),
                "run_id": e["run_id"],
            }
            open_alarms[key] = a
            alarms.append(a)
        elif e["kind"] == "alarm_cleared" and key in open_alarms:
            open_alarms.pop(key)["cleared"] = e["t_wall"]
        elif e["kind"] == "stop":
            for k in [k for k in open_alarms if k[0] == e["run_id"]]:
                a = open_alarms.pop(k)  # still active when the service stopped: nobody watches any more
                a["cleared"], a["active_at_stop"] = e["t_wall"], True
        if e["kind"] != "state":
            continue
        why = d.get("why", "")
        if why in ("", "state complete"):  # Held after Holding...: the reason is the acting state's
            why = last_why.get(e["run_id"], why)
        last_why[e["run_id"]] = why
        if d.get("new") in ("Stopped", "Aborted", "Held", "Suspended") and lo <= e["t_wall"] < hi:
            stops.append({"t": e["t_wall"], "state": d.get("new"), "why": why, "run_id": e["run_id"]})
    alarms = [a for a in alarms if a["raised"] < hi and (a["cleared"] is None or a["cleared"] >= lo)]
    for a in alarms:
        a["duration_s"] = round((a["cleared"] if a["cleared"] is not None else hi) - a["raised"], 1)
    # each run that ended inside the range: its own counters at stop against its records
    run_checks = []
    for e in data.events:
        if e["kind"] != "stop" or not (lo <= e["t_wall"] <= hi + 60):
            continue
        mine = [p for p in pieces if p["run_id"] == e["run_id"]]
        starts = [s["t_wall"] for s in data.events if s["run_id"] == e["run_id"] and s["kind"] == "start"]
        if starts and starts[0] < lo:
            continue  # only part of the run is in range
        d = e["detail"]
        by_frac = Counter(p["fraction"] for p in mine)
        run_checks.append(
            {
                "run_id": e["run_id"],
                "counter_pieces": d.get("pieces", 0),
                "records": len(mine),
                "fractions": {
                    f: {"counter": d.get(f"fraction_{f}", 0), "records": by_frac.get(f, 0)} for f in fractions
                },
                "match": d.get("pieces", 0) == len(mine)
                and all(d.get(f"fraction_{f}", 0) == by_frac.get(f, 0) for f in fractions),
            }
        )
    latencies = [p["latency_ms"] for p in pieces if p["latency_ms"] is not None]
    runs = []
    for r in data.runs:
        evs = [e for e in data.events if e["run_id"] == r]
        start = next((e for e in evs if e["kind"] == "start"), None)
        stop = next((e for e in evs if e["kind"] == "stop"), None)
        runs.append(
            {
                "run_id": r,
                "started": start["t_wall"] if start else None,
                "stopped": stop["t_wall"] if stop else None,
                "model": (start["detail"].get("model") if start else None),
                "pieces_in_range": sum(1 for p in pieces if p["run_id"] == r),
                "model_swaps": sum(1 for e in evs if e["kind"] == "model_swap"),
            }
        )
    return {
        "database": str(data.db),
        "from": lo,
        "to": hi,
        "run": data.run,
        "runs": runs,
        "pieces": n,
        "first_piece": pieces[0]["t_wall"],
        "last_piece": pieces[-1]["t_wall"],
        "span_s": round(span, 1),
        "producing_s": round(producing_s, 1),
        "mass_est_kg": round(mass / 1000, 3),
        "pieces_per_min": round(n / span * 60, 1) if span > 0 else None,
        "kg_per_h_est": round(mass / 1000 / span * 3600, 2) if span > 0 else None,
        "pieces_per_min_producing": round(n / producing_s * 60, 1) if producing_s > 0 else None,
        "kg_per_h_est_producing": round(mass / 1000 / producing_s * 3600, 2) if producing_s > 0 else None,
        "fractions": frac_rows,
        "mass_balance": balance,
        "classes": class_rows,
        "outcomes": outcomes,
        "held": outcomes.get("held", 0),
        "expired": outcomes.get("expired", 0),
        "conflict": outcomes.get("conflict", 0),
        "ejects_sent": sum(1 for p in pieces if p["seq"] is not None),
        "field_states": dict(sorted(Counter(p["field_state"] or "-" for p in pieces).items())),
        "decision_latency_ms": percentiles(latencies),
        "state_s": {k: round(v, 1) for k, v in sorted(state_s.items(), key=lambda kv: -kv[1])},
        "alarms": alarms,
        "stops": stops,
        "run_checks": run_checks,
        "mass_model": {c: vars(r) for c, r in MASS_MODEL.items()},
    }


def cross_check(summary: dict[str, Any], demo: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers against a `sorter demo --json` report of the same run.

    Exact: both count the same records (the demo's report reads them from the same database), so the
    number of records, the eject outcomes, the commands sent and the decision latency must be equal.
    Not exact: the demo's fraction counts are the simulator's *bins* (where each piece physically
    landed, ground truth), the report's are where the records say each piece ended (routed, unless no
    air fired); they differ by the pieces the air missed or blew into the wrong bin, and by pieces the
    service never saw as pieces of their own (touching pieces recorded as one), i.e. by what purity,
    recovery and `pieces_accounted` measure. The estimated masses are compared with the bins' true
    masses in the same way.
    """
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


# --- plots ------------------------------------------------------------------------------------------

FRACTION_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]
CLASS_COLOURS = {"ndfeb": "#4c72b0", "ferrite": "#55a868", "smco": "#c44e52", "steel": "#8172b2", "other": "#ccb974"}
DPI = 80


def make_figures(data: ShiftData, summary: dict[str, Any], cfg: LineConfig) -> dict[str, Any]:
    """Matplotlib figures (Agg): throughput, composition, confidence, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pieces, lo, hi = data.pieces, data.t_from, data.t_to
    figs: dict[str, Any] = {}
    fractions = list(summary["fractions"])
    colour = {f: FRACTION_COLOURS[i % len(FRACTION_COLOURS)] for i, f in enumerate(fractions)}

    # throughput over time
    step = _time_bin_s(hi - lo)
    edges = np.arange(lo, hi + step, step)
    t = np.array([p["t_wall"] for p in pieces])
    fig, ax = plt.subplots(figsize=(9, 3.4))
    mid = (edges[:-1] - lo) / 60
    bottom = np.zeros(len(edges) - 1)
    for f in fractions:
        tf = np.array([p["t_wall"] for p in pieces if p["dest"] == f])
        h = np.histogram(tf, edges)[0] * 60 / step
        ax.bar(mid, h, width=step / 60, bottom=bottom, align="edge", color=colour[f], label=f, linewidth=0)
        bottom += h
    ax.set_xlabel(f"minutes since {iso(lo)}")
    ax.set_ylabel("pieces / min")
    mass_h = np.histogram(t, edges, weights=[p["mass_est_g"] for p in pieces])[0] / 1000 * 3600 / step
    ax2 = ax.twinx()
    ax2.step(
        np.append(mid, mid[-1] + step / 60),
        np.append(mass_h, mass_h[-1]),
        where="post",
        color="k",
        lw=1.2,
        label="kg/h (est.)",
    )
    ax2.set_ylabel("kg / h (estimated)")
    ax2.set_ylim(bottom=0)
    label: str | None = "not in Execute"
    for st, t0, t1, _ in state_periods(data.events, hi):
        if st != "Execute" and _clip(t0, t1, lo, hi) > 0:
            x0, x1 = (max(t0, lo) - lo) / 60, (min(t1, hi) - lo) / 60
            ax.axvspan(x0, x1, color="#e06666", alpha=0.35, lw=0, label=label)
            label = None
    label = "alarm active"
    for a in summary["alarms"]:
        t1 = a["cleared"] if a["cleared"] is not None else hi
        ax.axvspan(
            (max(a["raised"], lo) - lo) / 60, (min(t1, hi) - lo) / 60, ymin=0.96, color="#cc0000", lw=0, label=label
        )
        label = None
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize=8)
    ax.set_title(f"Throughput per {step / 60:g} min, by fraction the pieces ended in", fontsize=10)
    ax.set_xlim(0, (hi - lo) / 60)
    fig.tight_layout()
    figs["throughput"] = fig

    # composition: decided classes per fraction, count and estimated mass
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    classes = list(summary["classes"])
    for ax, key, label in ((axes[0], None, "pieces"), (axes[1], "mass", "estimated kg")):
        left = np.zeros(len(fractions))
        for c in classes:
            vals = np.array(
                [
                    sum((p["mass_est_g"] / 1000 if key else 1) for p in pieces if p["dest"] == f and p["cls"] == c)
                    for f in fractions
                ]
            )
            ax.barh(fractions, vals, left=left, color=CLASS_COLOURS.get(c, "#999999"), label=c)
            left += vals
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0].legend(fontsize=8, title="decided class", title_fontsize=8)
    fig.suptitle("Composition of each fraction by decided class", fontsize=10)
    fig.tight_layout()
    figs["composition"] = fig

    # confidence histogram per decided class
    fig, ax = plt.subplots(figsize=(9, 3.0))
    bins = [i / 50 for i in range(51)]
    for c in classes:
        conf = [p["confidence"] for p in pieces if p["cls"] == c]
        ax.hist(conf, bins=bins, histtype="step", lw=1.4, color=CLASS_COLOURS.get(c, "#999999"), label=c)
    for thr, style in ((cfg.routing.min_confidence, "--"), (cfg.routing.fallback_min_confidence, ":")):
        ax.axvline(thr, color="k", ls=style, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("decision confidence (dashed: min_confidence, dotted: fallback without the field)")
    ax.set_ylabel("pieces")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Confidence histogram", fontsize=10)
    fig.tight_layout()
    figs["confidence"] = fig

    lat = [p["latency_ms"] for p in pieces if p["latency_ms"] is not None]
    if lat:
        fig, ax = plt.subplots(figsize=(9, 2.6))
        ax.hist(lat, bins=60, color="#4c72b0")
        ax.set_xlabel("decision latency ms (last view's capture -> command accepted by the PLC)")
        ax.set_ylabel("pieces")
        ax.set_title("Decision latency", fontsize=10)
        fig.tight_layout()
        figs["latency"] = fig
    return figs


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode()


# --- tables (one source for HTML and PDF) ----------------------------------------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def make_tables(s: dict[str, Any], check: dict[str, Any] | None) -> list[Table]:
    t: list[Table] = []
    runs = ", ".join(r["run_id"] for r in s["runs"])
    t.append(
        Table(
            "Period",
            ["", ""],
            [
                ["from", iso(s["from"])],
                ["to", iso(s["to"])],
                ["runs", runs],
                ["first / last piece", f"{iso(s['first_piece'])} / {iso(s['last_piece'])}"],
                ["pieces", s["pieces"]],
                ["estimated mass", f"{s['mass_est_kg']:.2f} kg"],
                [
                    "throughput over the period",
                    f"{_f(s['pieces_per_min'], 1)} pieces/min, {_f(s['kg_per_h_est'], 1)} kg/h (est.)",
                ],
                [
                    "throughput while producing",
                    f"{_f(s['pieces_per_min_producing'], 1)} pieces/min, "
                    f"{_f(s['kg_per_h_est_producing'], 1)} kg/h (est.) over {s['producing_s']:.0f} s",
                ],
            ],
        )
    )
    b = s["mass_balance"]
    t.append(
        Table(
            "Mass balance",
            ["", "pieces", "estimated kg"],
            [
                ["in (every recorded piece)", b["in_count"], _f(b["in_mass_est_kg"])],
                ["out (sum of the fractions)", b["out_count"], _f(b["out_mass_est_kg"])],
                ["unaccounted", b["unaccounted"], _f(b["in_mass_est_kg"] - b["out_mass_est_kg"])],
                ["closes", "yes" if b["closes"] else "NO", ""],
            ],
            "Every record ends in exactly one fraction (see Fractions: 'ended in'); a record whose fraction the "
            "config does not know is unaccounted.",
        )
    )
    t.append(
        Table(
            "Fractions",
            [
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
            ],
            [
                [
                    f,
                    r["routed"],
                    r["count"],
                    r["unconfirmed"],
                    _pct(r["share"]),
                    _f(r["mass_est_kg"]),
                    _pct(r["mass_share"]),
                    _f(r["mean_confidence"], 4),
                    _pct(r["purity_est"]),
                    ", ".join(f"{c} {k}" for c, k in r["by_class"].items()),
                ]
                for f, r in s["fractions"].items()
            ],
            "Routed: where the service's decisions sent pieces. Ended in: where they went, as far as the records "
            "know: a piece routed to a product whose air never fired (command expired, PLC offline, valve "
            "conflict, cancelled) rides on into the default fraction. Unconfirmed: commands sent but never "
            "acknowledged by the PLC (timeout, pending), counted where they were routed. Shares and masses are of "
            "'ended in'. Estimated purity = mean probability (the model's, fused with the field) that a piece in "
            "the fraction belongs there: the model's belief, not a measurement.",
        )
    )
    t.append(
        Table(
            "Composition by decided class",
            ["class", "pieces", "est. kg", "mean confidence", "routed to (when confident)"],
            [
                [c, r["count"], _f(r["mass_est_kg"]), _f(r["mean_confidence"], 4), r["routed_to"]]
                for c, r in s["classes"].items()
            ],
        )
    )
    t.append(
        Table(
            "Eject outcomes",
            ["outcome", "pieces"],
            [[k, v] for k, v in s["outcomes"].items()] + [["commands sent (with a sequence number)", s["ejects_sent"]]],
            "accepted: the PLC took the command; no_eject: default fraction, no air; held: the line was not in "
            "Execute, the piece went to the default fraction; expired: too late to reach the PLC, not sent; conflict: "
            "the valves would have hit a neighbour of another fraction; offline/timeout: the PLC link; cancelled: "
            "unanswered at shutdown.",
        )
    )
    lat = s["decision_latency_ms"]
    t.append(
        Table(
            "Decision latency and Hall bar",
            ["", ""],
            [
                [
                    "latency p50 / p99 / max ms",
                    f"{_f(lat['p50'])} / {_f(lat['p99'])} / {_f(lat['max'])} (n={lat['n']})",
                ],
                *[[f"field reading {k}", v] for k, v in s["field_states"].items()],
            ],
        )
    )
    t.append(
        Table(
            "Time per line state",
            ["state", "seconds", "share"],
            [[k, _f(v, 1), _pct(v / s["span_s"]) if s["span_s"] else "-"] for k, v in s["state_s"].items()],
        )
    )
    t.append(
        Table(
            "Alarms",
            ["alarm", "raised", "cleared", "duration s", "cause"],
            [
                [
                    a["alarm"],
                    iso(a["raised"]),
                    "still active at stop" if a["active_at_stop"] else iso(a["cleared"]),
                    _f(a["duration_s"], 1),
                    a["reason"],
                ]
                for a in s["alarms"]
            ]
            or [["none", "", "", "", ""]],
        )
    )
    t.append(
        Table(
            "Stops, holds and suspensions",
            ["time", "state", "why"],
            [[iso(x["t"]), x["state"], x["why"]] for x in s["stops"]] or [["none", "", ""]],
        )
    )
    if s["run_checks"]:
        rows = []
        for rc in s["run_checks"]:
            rows.append([rc["run_id"], "pieces", rc["counter_pieces"], rc["records"], "yes" if rc["match"] else "NO"])
            for f, v in rc["fractions"].items():
                rows.append(["", f, v["counter"], v["records"], "yes" if v["counter"] == v["records"] else "NO"])
        t.append(
            Table(
                "Service counters at stop vs records",
                ["run", "", "counter", "records", "equal"],
                rows,
                "The service counts every piece it records in memory and writes the counters into its stop event: "
                "an independent check that no record was lost between the loop and the database.",
            )
        )
    if check:
        rows = [
            [k, json.dumps(c["report"]), json.dumps(c["demo"]), "yes" if c["equal"] else "NO"]
            for k, c in check["exact"].items()
        ]
        t.append(
            Table(
                "Cross-check with the demo's report (same records)",
                ["figure", "this report", "demo report", "equal"],
                rows,
                "The demo's report reads the same records database: these must be equal.",
            )
        )
        t.append(
            Table(
                "Ended in (records) vs landed in the bins (demo ground truth)",
                [
                    "fraction",
                    "ended in (records)",
                    "landed (truth)",
                    "difference",
                    "est. kg",
                    "true kg",
                    "mass error",
                    "purity",
                    "recovery",
                ],
                [
                    [
                        f,
                        b["in_fraction_by_records"],
                        _f(b["landed_in_bin"]),
                        _f(b["difference"]),
                        _f(b["mass_est_kg"]),
                        _f(b["mass_true_kg"]),
                        _pct(b["mass_error"]),
                        _pct(b["demo_purity"]),
                        _pct(b["demo_recovery"]),
                    ]
                    for f, b in check["bins"].items()
                ],
                f"The demo fed {check['pieces_fed']} pieces ({check['pieces_binned']} reached a bin). Its fraction "
                "counts are where pieces physically landed; the records say where each piece ended. They differ by "
                "the pieces the air missed or blew into a neighbouring bin (what purity and recovery measure) and "
                "by touching pieces recorded as one. "
                "The true masses (simulator) show how far the area-based mass estimate is off.",
            )
        )
    m = s["mass_model"]
    t.append(
        Table(
            "Mass estimate (per decided class)",
            ["class", "density g/cm³", "thickness = a × width + b", "max mm"],
            [
                [
                    c,
                    f"{r['density_g_cm3']:g}",
                    f"{r['frac_of_width']:g} × w + {r['offset_mm']:g} mm",
                    f"{r['max_mm']:g}",
                ]
                for c, r in m.items()
            ],
            "The camera measures projected area; mass = area × nominal thickness × density. An estimate for trends "
            "and kg/h, to be checked against weighed bins.",
        )
    )
    return t


# --- writers ----------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1000px;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0} td,th{border:1px solid #ccc;padding:.2em .5em}
th{background:#f0f0f0;text-align:left} td{text-align:right} td:first-child{text-align:left}
.note{font-size:.8em;color:#555;max-width:900px} img{max-width:100%} .bad{color:#b00;font-weight:bold}
"""


def write_html(path: Path, summary: dict[str, Any], tables: list[Table], figs: dict[str, Any], title: str) -> None:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>From the piece records in <code>{html.escape(summary['database'])}</code> only "
        f"(no ground truth). Generated {iso(datetime.now().timestamp())} by <code>sorter report</code>.</p>",
    ]
    order = [
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
    by_title = {t.title: t for t in tables}
    done: set[str] = set()

    def table_html(t: Table) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header) if any(t.header) else ""
        rows = "".join(
            "<tr>"
            + "".join(f"<td{' class=bad' if str(c) == 'NO' else ''}>{html.escape(_f(c))}</td>" for c in r)
            + "</tr>"
            for r in t.rows
        )
        note = f"<p class='note'>{html.escape(t.note)}</p>" if t.note else ""
        return f"<h2>{html.escape(t.title)}</h2><table>{'<tr>' + head + '</tr>' if head else ''}{rows}</table>{note}"

    for key in order + [t.title for t in tables]:
        if key in done:
            continue
        done.add(key)
        if key in by_title:
            parts.append(table_html(by_title[key]))
        elif key in figs:
            parts.append(f"<img alt='{key}' src='data:image/png;base64,{_png(figs[key])}'>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def write_pdf(path: Path, tables: list[Table], figs: dict[str, Any], title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    path.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(path) as pdf:
        # tables as monospaced text pages (A4 landscape: wide tables fit), as many per page as fit
        lines: list[str] = [title, ""]
        for t in tables:
            lines += _text_table(t)
        per_page = 66
        for i in range(0, len(lines), per_page):
            fig = plt.figure(figsize=(11.69, 8.27))
            fig.text(0.04, 0.96, "\n".join(lines[i : i + per_page]), family="monospace", fontsize=6.5, va="top")
            pdf.savefig(fig)
            plt.close(fig)
        for fig in figs.values():
            pdf.savefig(fig)
        d = pdf.infodict()
        d["Title"] = title
        d["Creator"] = "sorter report"


def _text_table(t: Table) -> list[str]:
    import textwrap

    cells = [[_f(c) for c in r] for r in t.rows]
    header = t.header if any(t.header) else [""] * (len(cells[0]) if cells else 0)
    width = [min(60, max(len(str(h)), *(len(r[i]) for r in cells))) for i, h in enumerate(header)]
    out = [t.title.upper()]
    if any(t.header):
        out.append("  ".join(h.ljust(w)[:w] for h, w in zip(header, width, strict=True)))
    for r in cells:
        out.append("  ".join(c.ljust(w)[:w] for c, w in zip(r, width, strict=True)))
    if t.note:
        out += textwrap.wrap(t.note, 180)
    return [*out, ""]


def write_csv(path: Path, pieces: list[dict[str, Any]]) -> None:
    cols = ["run_id", "time", *PIECE_COLUMNS, "mass_est_g"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for p in pieces:
            row = {**p, "time": iso(p["t_wall"]), "mass_est_g": round(p["mass_est_g"], 3)}
            w.writerow([json.dumps(row[c]) if isinstance(row.get(c), dict) else row.get(c) for c in cols])


# --- the command ------------------------------------------------------------------------------------


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
    demo_report: Path | None = None,
    summary_json: Path | None = None,
) -> dict[str, Any]:
    """Write the report (HTML, optional PDF and CSV); returns the summary (with the cross-check, if any)."""
    lo = parse_time(t_from, "--from") if t_from else None
    hi = parse_time(t_to, "--to") if t_to else None
    demo = None
    if demo_report is not None:
        try:
            demo = json.loads(demo_report.read_text())
        except (OSError, ValueError) as exc:
            raise ReportError(f"{demo_report}: cannot read the demo report: {exc}") from None
        if not isinstance(demo, dict) or "fractions" not in demo:
            raise ReportError(f"{demo_report}: not a `sorter demo --json` report")
    data = load_range(db or cfg.records.path, lo, hi, run)
    summary = summarise(data, cfg)
    check = cross_check(summary, demo) if demo is not None else None
    if check is not None:
        summary["demo_check"] = check
    title = f"Shift report {iso(data.t_from)} – {iso(data.t_to)}" if run is None else f"Batch report, run {run}"
    import matplotlib.pyplot as plt

    figs = make_figures(data, summary, cfg)
    tables = make_tables(summary, check)
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
        for f in figs.values():
            plt.close(f)
    return summary
