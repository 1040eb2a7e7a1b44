"""The demo's report: the service's piece records judged against the simulator's ground truth.

Purity of a fraction = share of the pieces in it whose true class routes there;
recovery = share of the pieces whose true class routes there that ended there.
Both by count and by mass.
"""

from __future__ import annotations

import bisect
from typing import Any

from sorter.config import LineConfig
from sorter.core.geometry import unwrap, wrap32
from sorter.reports.stats import percentiles

MATCH_MM = 6.0  # a record and a true piece closer than this (along and across) are the same piece


def match_records(
    truth: list[dict[str, Any]],
    records: list[dict[str, Any]],
    counts_per_mm: float,
) -> dict[int, dict[str, Any]]:
    """True piece id -> its record (one-to-one, nearest first)."""
    if not truth:
        return {}
    ref = truth[len(truth) // 2]["count"]
    order = sorted(truth, key=lambda t: t["count"])
    keys = [t["count"] for t in order]
    tol = MATCH_MM * counts_per_mm
    pairs = []
    for r in records:
        c = unwrap(wrap32(r["count"]), ref)  # records and truth may differ by whole 2**32 wraps
        i = bisect.bisect_left(keys, c - tol)
        while i < len(order) and keys[i] <= c + tol:
            t = order[i]
            dx = abs(r["x_mm"] - t["x_mm"])
            if dx <= MATCH_MM:
                pairs.append((abs(keys[i] - c) / counts_per_mm + dx, t["id"], r))
            i += 1
    pairs.sort(key=lambda p: p[0])
    matched: dict[int, dict[str, Any]] = {}
    used: set[int] = set()
    for _, tid, r in pairs:
        if tid not in matched and r["id"] not in used:
            matched[tid] = r
            used.add(r["id"])
    return matched


def shadow_section(
    cfg: LineConfig,
    truth: list[dict[str, Any]],
    records: list[dict[str, Any]],
    shadow_rows: list[dict[str, Any]],
    runner: dict[str, Any],
) -> dict[str, Any]:
    """The shadow model against the live one (sorter/core/shadow.py) and both against the simulator's truth, on the
    pieces the shadow compared (docs/shadow.md). `runner`: the service's own summary (compared, skipped)."""
    from collections import Counter

    from sorter.core.shadow import accuracy, summary_dict

    by_id = {t["id"]: t for t in truth}
    true_cls = {r["id"]: by_id[tid]["cls"] for tid, r in match_records(truth, records, cfg.belt.counts_per_mm).items()}
    out = summary_dict(
        runner.get("model", ""),
        len(shadow_rows),
        runner.get("skipped", 0),
        Counter((r["live_cls"], r["cls"]) for r in shadow_rows),
        Counter((r["live_fraction"], r["fraction"]) for r in shadow_rows),
    )
    out["compared_service"] = runner.get("compared")  # the service's count: equal to `compared` once all written
    out["failed_batches"] = runner.get("failed", 0)
    out["differing"] = sum(r["live_cls"] != r["cls"] for r in shadow_rows)
    out["crops_kept"] = sum(bool(r["has_crop"]) for r in shadow_rows)
    out["truth"] = accuracy(
        (true_cls[r["piece_id"]], r["live_cls"], r["cls"]) for r in shadow_rows if r["piece_id"] in true_cls
    )
    return out


def build_report(
    cfg: LineConfig,
    truth: list[dict[str, Any]],
    windows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    service: dict[str, Any],
    sim: dict[str, Any],
) -> dict[str, Any]:
    routing = cfg.routing.classes
    residue = cfg.routing.default_fraction
    cpm = cfg.belt.counts_per_mm
    matched = match_records(truth, records, cpm)
    binned = [t for t in truth if t["bin"]]
    fractions: dict[str, Any] = {}
    for f in cfg.fractions:
        inside = [t for t in binned if t["bin"] == f]
        belongs = [t for t in binned if routing.get(t["cls"], residue) == f]
        right = [t for t in inside if routing.get(t["cls"], residue) == f]
        mass = lambda rows: sum(t["mass_g"] for t in rows)  # noqa: E731
        fractions[f] = {
            "count": len(inside),
            "mass_g": round(mass(inside), 1),
            "purity": round(len(right) / len(inside), 4) if inside else None,
            "recovery": round(len(right) / len(belongs), 4) if belongs else None,
            "purity_mass": round(mass(right) / mass(inside), 4) if inside else None,
            "recovery_mass": round(mass(right) / mass(belongs), 4) if belongs else None,
            "by_class": {c: sum(1 for t in inside if t["cls"] == c) for c in sorted({t["cls"] for t in inside})},
        }
    # eject error: each targeted piece against the window its own command opened (seq numbers wrap at 16 bits
    # in an hour's run: of the windows with its seq, the one nearest the piece)
    by_seq: dict[int, list[dict[str, Any]]] = {}
    for w in windows:
        by_seq.setdefault(w["seq"], []).append(w)
    errors, missing = [], 0
    bank_rows = [b.distance_mm for b in cfg.ejection.banks]
    bank_index = {b.name: i for i, b in enumerate(cfg.ejection.banks)}
    for t in truth:
        r = matched.get(t["id"])
        if not r or r["outcome"] != "accepted" or r["seq"] is None:
            continue
        same_seq = by_seq.get(r["seq"])
        if not same_seq:
            missing += 1
            continue
        at = t["s_mm"] + bank_rows[bank_index[r["bank"]]]
        errors.append(min(abs((w["p_open"] + w["p_close"]) / 2 - at) for w in same_seq))
    latencies = [r["latency_ms"] for r in records if r["latency_ms"] is not None]
    # its parts, over the same pieces (commands the PLC accepted): settle + field_wait + compute + plc = it
    parts = {
        part: percentiles(
            [r[f"{part}_ms"] for r in records if r["latency_ms"] is not None and r.get(f"{part}_ms") is not None]
        )
        for part in ("settle", "field_wait", "compute", "plc")
    }
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    accounted = sum(1 for t in binned if t["id"] in matched)
    plc = sim.get("plc", {})
    return {
        "pieces_fed": len(truth),
        "pieces_binned": len(binned),
        "pieces_accounted": accounted,
        "pieces_fed_late": sim.get("fed_late"),  # placed where a camera could already see them: a starved simulator
        "records": len(records),
        "records_unmatched": len(records) - len(matched),
        "fractions": fractions,
        "frames_captured": service.get("frames_captured"),
        "frames_dropped": service.get("frames_dropped"),
        "decision_latency_ms": percentiles(latencies),
        "compute_latency_ms": parts["compute"],  # the PC's time from a piece's last input to its command
        "latency_parts_ms": parts,
        "eject_error_mm": percentiles(errors),
        "ejects_sent": sum(1 for r in records if r["seq"] is not None),
        "ejects_executed": plc.get("executed"),
        "ejects_late": plc.get("late"),
        "ejects_without_window": missing,
        "eject_outcomes": outcomes,
        "classes_fed": {c: sum(1 for t in truth if t["cls"] == c) for c in sorted({t["cls"] for t in truth})},
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a benchmark sets side by side for each of its demo runs."""
    return {
        "latency_ms": report["decision_latency_ms"],
        "ejects_late": report["ejects_late"],
        "frames_dropped": report["frames_dropped"],
        "ndfeb_purity": report["fractions"]["ndfeb"]["purity"],
        "ndfeb_recovery": report["fractions"]["ndfeb"]["recovery"],
    }
