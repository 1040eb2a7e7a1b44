"""`sorter sim envelope`: the simulated line over a grid of its operating envelope, one demo per point.

Each point (belt speed x feed rate x touching share) is one `sorter demo` in its own process, so that
its CPU time and peak memory are its own (resource.getrusage of the child). In lockstep (the default)
a point's figures are those of the line's vision, tracking, decisions and ejection alone — the same on
any machine, under any load — and its CPU seconds per piece are the simulator's and the service's
work together. In real time (`--real-time`) a point also shows what the computer costs: frames
dropped, late ejects, decision latency; run those on a quiet machine.

Writes `envelope.csv`, `envelope.md` (the table, and each point that misses a target with the figures
that miss it) and `envelope.png` beside each point's run folder. A command people run on purpose (a
few minutes a point), never a CI test.
"""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the targets at every point of the envelope (docs/results.md)
TARGETS: dict[str, tuple[str, float]] = {
    "ndfeb_purity": (">=", 0.99),
    "ndfeb_recovery": (">=", 0.95),
    "ferrite_smco_purity": (">=", 0.99),
    "ferrite_smco_recovery": (">=", 0.93),
    "accounted": (">=", 0.998),
    "frames_dropped": ("<=", 0),
    "eject_error_p99_mm": ("<=", 1.0),
    "ejects_late": ("<=", 0),
}


@dataclass(frozen=True)
class Point:
    speed_mm_s: float
    rate_per_s: float
    touching: float

    @property
    def name(self) -> str:
        return f"v{self.speed_mm_s:g}-r{self.rate_per_s:g}-t{self.touching:g}"


def grid(speeds: Sequence[float], rates: Sequence[float], touching: Sequence[float]) -> list[Point]:
    return [Point(v, r, t) for v in speeds for r in rates for t in touching]


def run_point(config: Path, point: Point, *, duration: float, seed: int, out: Path, lockstep: bool) -> dict[str, Any]:
    """One demo at this point, in a child process; its report's figures, CPU and memory in one row."""
    run_dir = out / point.name
    cmd = [sys.executable, "-m", "sorter", "demo", "--config", str(config), "--duration", str(duration)]
    cmd += ["--seed", str(seed), "--speed", str(point.speed_mm_s), "--rate", str(point.rate_per_s)]
    cmd += ["--touching", str(point.touching), "--json", "--out", str(run_dir)]
    if lockstep:
        cmd.append("--lockstep")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return {**point.__dict__, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    rep = json.loads(proc.stdout)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**point_row(point, rep, seed=seed, cpu_s=cpu_s), "wall_s": round(wall, 1)}


def point_row(point: Point, rep: dict[str, Any], *, seed: int, cpu_s: float) -> dict[str, Any]:
    """One grid point's row from its demo report and the CPU its processes used."""
    fr = rep["fractions"]
    fed = rep["pieces_fed"]
    return {
        **point.__dict__,
        "seed": seed,
        "pieces_fed": fed,
        "accounted": round(rep["pieces_accounted"] / fed, 4) if fed else None,
        "records_unmatched": rep["records_unmatched"],
        "ndfeb_purity": fr["ndfeb"]["purity"],
        "ndfeb_recovery": fr["ndfeb"]["recovery"],
        "ferrite_smco_purity": fr["ferrite_smco"]["purity"],
        "ferrite_smco_recovery": fr["ferrite_smco"]["recovery"],
        "frames_dropped": rep["frames_dropped"],
        # frames whose touching pieces were parted on the half-size image: the vision thread was behind
        "frames_parted_coarse": rep.get("frames_parted_coarse", 0),
        "eject_error_p99_mm": rep["eject_error_mm"]["p99"],
        "ejects_late": rep["ejects_late"],
        "conflicts": rep["eject_outcomes"].get("conflict", 0),
        "latency_p99_ms": rep["decision_latency_ms"]["p99"],
        # the demo's processes: the service and the simulator (in lockstep one process)
        "cpu_ms_per_piece": round(1000 * cpu_s / fed, 2) if fed else None,
        # the service's own peak as it measured it (in lockstep: the one process, simulator included); not
        # ru_maxrss, which is the largest of all children so far (the simulator's ~650 MB in real time)
        "service_rss_mb": (rep.get("service_rss_mb") or {}).get("peak"),
    }


def misses(row: dict[str, Any]) -> list[str]:
    """The targets this point misses, each with its figure."""
    out = []
    for key, (op, bound) in TARGETS.items():
        v = row.get(key)
        if v is None:
            continue
        if (op == ">=" and v < bound) or (op == "<=" and v > bound):
            out.append(f"{key} {v} (target {op} {bound})")
    return out


COLUMNS = (
    "speed_mm_s", "rate_per_s", "touching", "pieces_fed", "accounted", "ndfeb_purity", "ndfeb_recovery",
    "ferrite_smco_purity", "ferrite_smco_recovery", "frames_dropped", "frames_parted_coarse",
    "eject_error_p99_mm", "ejects_late", "conflicts", "latency_p99_ms", "cpu_ms_per_piece", "service_rss_mb",
)  # fmt: skip


def write_table(rows: list[dict[str, Any]], out: Path, *, lockstep: bool, seed: int, duration: float) -> None:
    with (out / "envelope.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    mode = "lockstep (virtual time)" if lockstep else "real time"
    lines = [
        f"# Operating envelope: {mode}, seed {seed}, {duration:g} s of feed per point",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Points short of a target", ""]
    short = [(r, misses(r)) for r in rows]
    lines += [
        f"- {Point(r['speed_mm_s'], r['rate_per_s'], r['touching']).name}: " + "; ".join(m) for r, m in short if m
    ]
    lines += [
        f"- {Point(r['speed_mm_s'], r['rate_per_s'], r['touching']).name}: run failed: {r['error']}"
        for r in rows
        if "error" in r
    ]
    if not any(m for _, m in short):
        lines.append("- none")
    (out / "envelope.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    panels = (
        ("ndfeb_recovery", "NdFeB recovery", 0.95),
        ("ndfeb_purity", "NdFeB purity", 0.99),
        ("ferrite_smco_recovery", "ferrite/SmCo recovery", 0.93),
        ("accounted", "pieces accounted", 0.998),
        ("eject_error_p99_mm", "eject error p99 (mm)", 1.0),
        ("cpu_ms_per_piece", "CPU ms per piece (service + simulator)", None),
    )
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (key, title, target) in zip(axes.flat, panels, strict=True):
        for speed in sorted({r["speed_mm_s"] for r in ok}):
            for touch in sorted({r["touching"] for r in ok}):
                pts = sorted(
                    (r["rate_per_s"], r[key]) for r in ok if r["speed_mm_s"] == speed and r["touching"] == touch
                )
                style = "-" if touch == min(r["touching"] for r in ok) else "--"
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    marker="o",
                    label=f"{speed:g} mm/s, {touch:.0%} touching",
                )
        if target is not None:
            ax.axhline(target, color="grey", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("feed, pieces/s")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "envelope.png", dpi=110)
    plt.close(fig)


def run_envelope(
    config: Path,
    points: list[Point],
    *,
    duration: float,
    seed: int,
    out: Path,
    lockstep: bool = True,
    progress: Any = None,
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(points):
        if progress is not None:
            progress(i, len(points), p)
        rows.append(run_point(config, p, duration=duration, seed=seed, out=out, lockstep=lockstep))
        write_table(rows, out, lockstep=lockstep, seed=seed, duration=duration)  # a stopped sweep keeps its rows
    if rows:
        plot(rows, out)
    return rows
