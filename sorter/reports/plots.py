"""The report's plots (matplotlib, Agg): throughput over time, composition, confidence, decision latency."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sorter.config import LineConfig
from sorter.reports.events import overlap_s, state_periods
from sorter.reports.load import ShiftData
from sorter.reports.times import iso

FRACTION_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]
CLASS_COLOURS = {"ndfeb": "#4c72b0", "ferrite": "#55a868", "smco": "#c44e52", "steel": "#8172b2", "other": "#ccb974"}
OTHER_CLASS_COLOUR = "#999999"


def make_figures(data: ShiftData, summary: dict[str, Any], cfg: LineConfig) -> dict[str, Any]:
    """The figures by name: throughput, composition, confidence, and latency if any piece has one."""
    figs = {
        "throughput": throughput_figure(data, summary),
        "composition": composition_figure(data.pieces, summary),
        "confidence": confidence_figure(data.pieces, summary, cfg),
    }
    lat = [p["latency_ms"] for p in data.pieces if p["latency_ms"] is not None]
    if lat:
        figs["latency"] = latency_figure(lat)
    return figs


def close_figures(figs: dict[str, Any]) -> None:
    plt = _pyplot()
    for f in figs.values():
        plt.close(f)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_bin_s(span_s: float) -> float:
    """Bin width of the throughput plot: the first of 1, 5, 15, 30, 60 min that gives at most 150 bins."""
    for b in (60, 300, 900, 1800, 3600):
        if span_s / b <= 150:
            return float(b)
    return 3600.0 * math.ceil(span_s / 3600 / 150)


def throughput_figure(data: ShiftData, summary: dict[str, Any]) -> Any:
    """Pieces/min stacked by the fraction they ended in, estimated kg/h, periods not in Execute, alarms."""
    plt = _pyplot()
    pieces, lo, hi = data.pieces, data.t_from, data.t_to
    fractions = list(summary["fractions"])
    colour = {f: FRACTION_COLOURS[i % len(FRACTION_COLOURS)] for i, f in enumerate(fractions)}
    step = throughput_bin_s(hi - lo)
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
        if st != "Execute" and overlap_s(t0, t1, lo, hi) > 0:
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
    return fig


def composition_figure(pieces: list[dict[str, Any]], summary: dict[str, Any]) -> Any:
    """Decided classes per fraction the pieces ended in: counts (left) and estimated kg (right)."""
    plt = _pyplot()
    fractions = list(summary["fractions"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, by_mass, xlabel in ((axes[0], False, "pieces"), (axes[1], True, "estimated kg")):
        left = np.zeros(len(fractions))
        for c in summary["classes"]:
            vals = np.array(
                [
                    sum((p["mass_est_g"] / 1000 if by_mass else 1) for p in pieces if p["dest"] == f and p["cls"] == c)
                    for f in fractions
                ]
            )
            ax.barh(fractions, vals, left=left, color=CLASS_COLOURS.get(c, OTHER_CLASS_COLOUR), label=c)
            left += vals
        ax.set_xlabel(xlabel)
        ax.invert_yaxis()
    axes[0].legend(fontsize=8, title="decided class", title_fontsize=8)
    fig.suptitle("Composition of each fraction by decided class", fontsize=10)
    fig.tight_layout()
    return fig


def confidence_figure(pieces: list[dict[str, Any]], summary: dict[str, Any], cfg: LineConfig) -> Any:
    """Histogram of decision confidence per decided class, with the routing thresholds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.0))
    bins = [i / 50 for i in range(51)]
    for c in summary["classes"]:
        conf = [p["confidence"] for p in pieces if p["cls"] == c and p["confidence"] is not None]
        ax.hist(conf, bins=bins, histtype="step", lw=1.4, color=CLASS_COLOURS.get(c, OTHER_CLASS_COLOUR), label=c)
    for thr, style in ((cfg.routing.min_confidence, "--"), (cfg.routing.fallback_min_confidence, ":")):
        ax.axvline(thr, color="k", ls=style, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("decision confidence (dashed: min_confidence, dotted: fallback without the field)")
    ax.set_ylabel("pieces")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Confidence histogram", fontsize=10)
    fig.tight_layout()
    return fig


def latency_figure(latencies_ms: list[float]) -> Any:
    """Histogram of decision latency (last view's capture -> command accepted by the PLC)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 2.6))
    ax.hist(latencies_ms, bins=60, color="#4c72b0")
    ax.set_xlabel("decision latency ms (last view's capture -> command accepted by the PLC)")
    ax.set_ylabel("pieces")
    ax.set_title("Decision latency", fontsize=10)
    fig.tight_layout()
    return fig
