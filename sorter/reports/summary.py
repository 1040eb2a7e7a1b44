"""The shift report's numbers, from the loaded records and events alone (no ground truth).

Counts and estimated masses per fraction and per decided class, the mass balance (in = every record,
out = the sum of the fractions), throughput, eject outcomes, Hall-bar reading states, decision latency,
time per line state, alarms and stops, and each run's own counters at stop against its records.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from sorter.config import LineConfig, RoutingConfig
from sorter.reports.events import PRODUCING_STATES, alarm_periods, stops, time_per_state
from sorter.reports.load import ShiftData
from sorter.reports.stats import percentiles

# outcomes after which no air was fired for the piece, and those where the PLC never confirmed the command
NO_AIR = frozenset({"expired", "offline", "conflict", "no_speed", "cancelled", "seen"})
# lost_in_restart: the service died after seeing the piece; whether its air fired before the PLC's watchdog
# made the line fail safe is unknown
UNCONFIRMED = frozenset({"timeout", "pending", "planned", "lost_in_restart"})

RUN_STOP_GRACE_S = 60.0  # a run whose stop event comes this soon after the range still counts as ended in it


def destination(p: dict[str, Any], default: str) -> str:
    """Where a recorded piece ended up, as far as the records know.

    The record's `fraction` is where the service routed the piece; with no air fired (the command
    expired, the PLC link was down, a valve conflict, no belt speed, cancelled at shutdown) the piece
    rides on into the default fraction whatever it was routed to.
    """
    return default if p["outcome"] in NO_AIR else p["fraction"]


def summarise(data: ShiftData, cfg: LineConfig) -> dict[str, Any]:
    """The report's numbers. Sets each piece's `dest` (where it ended up); needs its `mass_est_g`."""
    pieces, lo, hi = data.pieces, data.t_from, data.t_to
    for p in pieces:
        p["dest"] = destination(p, cfg.routing.default_fraction)
    fractions = list(dict.fromkeys([*cfg.fractions, *(p["fraction"] for p in pieces)]))
    n = len(pieces)
    mass = sum(p["mass_est_g"] for p in pieces)
    frac_rows = fraction_rows(pieces, fractions, cfg.routing, mass)
    state_s = time_per_state(data.events, lo, hi)
    producing_s = sum(state_s.get(s, 0.0) for s in PRODUCING_STATES)
    span = hi - lo
    outcomes = dict(sorted(Counter(p["outcome"] for p in pieces).items()))
    latencies = [p["latency_ms"] for p in pieces if p["latency_ms"] is not None]
    return {
        "database": str(data.db),
        "from": lo,
        "to": hi,
        "run": data.run,
        "runs": run_rows(data),
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
        "mass_balance": mass_balance(pieces, frac_rows, cfg.fractions, mass),
        "classes": class_rows(pieces, cfg.routing),
        "outcomes": outcomes,
        "held": outcomes.get("held", 0),
        "expired": outcomes.get("expired", 0),
        "conflict": outcomes.get("conflict", 0),
        "lost_in_restart": outcomes.get("lost_in_restart", 0),
        "ejects_sent": sum(1 for p in pieces if p["seq"] is not None),
        "field_states": dict(sorted(Counter(p["field_state"] or "-" for p in pieces).items())),
        "decision_latency_ms": percentiles(latencies),
        "state_s": {k: round(v, 1) for k, v in sorted(state_s.items(), key=lambda kv: -kv[1])},
        "alarms": alarm_periods(data.events, lo, hi),
        "stops": stops(data.events, lo, hi),
        "run_checks": run_checks(data, fractions),
        "mass_model": {c: r.model_dump() for c, r in cfg.reports.mass_model.items()},
    }


def _mean_confidence(pieces: list[dict[str, Any]]) -> float | None:
    """Mean decision confidence of the decided pieces among `pieces` (None if none was decided)."""
    conf = [p["confidence"] for p in pieces if p["confidence"] is not None]
    return round(float(np.mean(conf)), 4) if conf else None


def fraction_rows(
    pieces: list[dict[str, Any]], fractions: list[str], routing: RoutingConfig, mass_g: float
) -> dict[str, dict[str, Any]]:
    """Per fraction: routed (the decisions) and ended in (after what the air did), shares, masses, purity."""
    n = len(pieces)

    def belongs(p: dict[str, Any], f: str) -> float:
        return sum(v for c, v in p["probs"].items() if routing.classes.get(c, routing.default_fraction) == f)

    rows: dict[str, dict[str, Any]] = {}
    for f in fractions:
        inside = [p for p in pieces if p["dest"] == f]
        m = sum(p["mass_est_g"] for p in inside)
        rows[f] = {
            "count": len(inside),
            "routed": sum(1 for p in pieces if p["fraction"] == f),  # the decisions, before what the air did
            "unconfirmed": sum(1 for p in inside if p["outcome"] in UNCONFIRMED),
            "share": round(len(inside) / n, 4) if n else None,
            "mass_est_kg": round(m / 1000, 3),
            "mass_share": round(m / mass_g, 4) if mass_g else None,
            "by_class": dict(sorted(Counter(p["cls"] for p in inside).items())),
            "mean_confidence": _mean_confidence(inside),
            # what the model believes, not a measurement: mean probability that a piece here belongs here
            "purity_est": round(float(np.mean([belongs(p, f) for p in inside])), 4) if inside else None,
        }
    return rows


def mass_balance(
    pieces: list[dict[str, Any]], frac_rows: dict[str, dict[str, Any]], configured: list[str], mass_g: float
) -> dict[str, Any]:
    """In = every record, out = the configured fractions; a record naming another fraction leaves it open."""
    n = len(pieces)
    out_count = sum(r["count"] for f, r in frac_rows.items() if f in configured)
    out_mass = sum(p["mass_est_g"] for p in pieces if p["dest"] in configured)
    return {
        "in_count": n,
        "out_count": out_count,
        "in_mass_est_kg": round(mass_g / 1000, 3),
        "out_mass_est_kg": round(out_mass / 1000, 3),
        "unaccounted": n - out_count,  # records naming a fraction the config does not have
        "closes": n == out_count and math.isclose(mass_g, out_mass, rel_tol=1e-9, abs_tol=1e-9),
    }


def class_rows(pieces: list[dict[str, Any]], routing: RoutingConfig) -> dict[str, dict[str, Any]]:
    """Per decided class: count, estimated mass, mean confidence and the fraction it is routed to."""
    return {
        c: {
            "count": sum(1 for p in pieces if p["cls"] == c),
            "mass_est_kg": round(sum(p["mass_est_g"] for p in pieces if p["cls"] == c) / 1000, 3),
            "mean_confidence": _mean_confidence([p for p in pieces if p["cls"] == c]),
            "routed_to": routing.classes.get(c, routing.default_fraction),
        }
        for c in sorted({p["cls"] for p in pieces})
    }


def run_checks(data: ShiftData, fractions: list[str]) -> list[dict[str, Any]]:
    """Each run that started and ended inside the range: its own counters at stop against its records."""
    lo, hi = data.t_from, data.t_to
    out = []
    for e in data.events:
        if e["kind"] != "stop" or not (lo <= e["t_wall"] <= hi + RUN_STOP_GRACE_S):
            continue
        mine = [p for p in data.pieces if p["run_id"] == e["run_id"]]
        starts = [s["t_wall"] for s in data.events if s["run_id"] == e["run_id"] and s["kind"] == "start"]
        if starts and starts[0] < lo:
            continue  # only part of the run is in range
        d = e["detail"]
        by_frac = Counter(p["fraction"] for p in mine)
        out.append(
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
    return out


def run_rows(data: ShiftData) -> list[dict[str, Any]]:
    """The runs involved: start, stop, model, pieces in range, model swaps."""
    rows = []
    for r in data.runs:
        evs = [e for e in data.events if e["run_id"] == r]
        start = next((e for e in evs if e["kind"] == "start"), None)
        stop = next((e for e in evs if e["kind"] == "stop"), None)
        rows.append(
            {
                "run_id": r,
                "started": start["t_wall"] if start else None,
                "stopped": stop["t_wall"] if stop else None,
                "model": (start["detail"].get("model") if start else None),
                "pieces_in_range": sum(1 for p in data.pieces if p["run_id"] == r),
                "model_swaps": sum(1 for e in evs if e["kind"] == "model_swap"),
            }
        )
    return rows
