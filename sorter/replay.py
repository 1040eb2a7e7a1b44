"""`sorter replay`: a recording run through the unchanged pipeline in virtual time, and what-if comparisons.

The line is built by the product's wiring (sorter/app.py `build_line`), with `Transports` that take the
plant's side from the recording instead of the world (docs/recording.md):
- time: a `VirtualClock` starting where the recording started (its monotonic and wall clocks), the loop's
  clock and the line's Timebase; work is done in place (sorter/line/virtualtime.py);
- frames: each camera's recorded frames, delivered at their recorded arrival times (`ReplaySource`);
- the PLC: the link's register transport answers from the recorded encoder polls and accepts every eject
  command at once (`sorter/drivers/plc/replay.py`, which says what it does not model);
- the Hall bar: the recorded bytes handed to `HallBar.receive` at their recorded arrival times.

Decisions are compared with the recorded live ones piece by piece, matched on the belt (the count at which
the piece crossed the camera line, and its across position); where the recording came from the simulator
(`truth.sqlite` beside it), with the true class of each piece: the purity and recovery of the *decisions*
(where the line meant each piece to go; the ejection physics is not replayed).
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import math
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from sorter.app import build_line, virtual_transports
from sorter.config import CameraConfig, LineConfig, PlcConfig, load_config
from sorter.core.geometry import unwrap, wrap32
from sorter.core.messages import Decision
from sorter.drivers.plc.replay import ReplayPlc
from sorter.line.recording import Recording, RecordingError, ReplaySource
from sorter.line.records import load_pieces
from sorter.line.virtualtime import VirtualClock, VirtualTimeLoop
from sorter.vision.segment import materialise

MATCH_MM = 6.0  # two decisions closer than this along and across the belt are about the same piece
DRAIN_S = 10.0  # virtual seconds after the last recorded frame for the line to decide what it still tracks
STEP_S = 0.05


class ReplayError(Exception):
    """A replay that cannot run: the message says which input and why."""


@dataclass
class Variant:
    """What one replay runs with: the recording's config and model unless told otherwise."""

    config: Path | None = None
    model: Path | None = None
    all_frames: bool = False  # give the pipeline every recorded frame, also those the live line dropped

    @staticmethod
    def parse(arg: Path) -> Variant:
        """A --compare argument: an ONNX model file, or a line config (YAML)."""
        if not arg.exists():
            raise ReplayError(f"{arg}: no such file (a model .onnx or a line config .yaml)")
        return Variant(model=arg) if arg.suffix == ".onnx" else Variant(config=arg)

    @property
    def label(self) -> str:
        return " + ".join(str(p) for p in (self.config, self.model) if p is not None) or "as recorded"


def replay_config(rec: Recording, variant: Variant, out: Path) -> LineConfig:
    path = variant.config or rec.config_path
    cfg: LineConfig = load_config(path)
    updates: dict[str, Any] = {"records": cfg.records.model_copy(update={"path": (out / "records.sqlite").resolve()})}
    if variant.model is not None:
        updates["classifier"] = cfg.classifier.model_copy(update={"model": variant.model.resolve()})
    return cfg.model_copy(update=updates)


async def _feed_bar(chunks: list[tuple[float, bytes]], receive: Any, now: Any) -> None:
    for t, data in chunks:
        if t > now():
            await asyncio.sleep(t - now())
        receive(data, t)


async def _replay(
    rec: Recording, cfg: LineConfig, clock: VirtualClock, run_id: str, keep_crops: bool, all_frames: bool
) -> tuple[dict[str, Any], ReplayPlc, dict[int, np.ndarray], Any]:
    log = structlog.get_logger("replay")
    for suffix in ("", "-wal", "-shm"):  # a rerun into the same folder starts from nothing
        Path(f"{cfg.records.path}{suffix}").unlink(missing_ok=True)
    frames = rec.frames()
    if not frames:
        raise ReplayError(f"{rec.folder}: the recording holds no frames (level {rec.level}); replay needs level frames")
    # By default the pipeline gets the frames the live pipeline took off its capture queues, when it took
    # them: a replay takes no time to process a frame, and a live PC that was behind dropped frames
    # from its capture queues and decided later, in another order across the cameras, in another state
    # of the line. --all-frames: every recorded frame at its arrival time, as a PC never late would have.
    seen = None if all_frames else rec.processed()
    by_cam: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    for row in frames:
        if seen is not None:
            t = seen.get((row["camera"], row["seq"]))
            if t is None:
                skipped += 1
                continue
            row = {**row, "t_deliver": t}
        by_cam.setdefault(row["camera"], []).append(row)
    # frames the live pipeline took that the recording lost (its queue was full, or its size bound came):
    # the replay cannot give them, so pieces seen in them may be decided on fewer views
    missing = 0 if seen is None else len(set(seen) - {(r["camera"], r["seq"]) for r in frames})
    unknown = set(by_cam) - {c.name for c in cfg.cameras}
    if unknown:
        raise ReplayError(f"the recording has cameras {sorted(unknown)} that the replay's config does not")
    sources: dict[str, ReplaySource] = {}

    def camera_source(cam: CameraConfig) -> ReplaySource:
        src = sources[cam.name] = ReplaySource(rec, cam.name, by_cam.get(cam.name, []), clock.now)
        return src

    plc_box: list[ReplayPlc] = []

    def plc_registers(plc_cfg: PlcConfig) -> ReplayPlc:
        plc = ReplayPlc(plc_cfg, rec.polls(), clock.now)
        plc_box.append(plc)
        return plc

    transports = virtual_transports(clock, camera_source, plc_registers)
    if cfg.plc.protocol != "modbus":  # the replay PLC is a register transport: the Modbus link runs on it
        cfg = cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"protocol": "modbus"})})
    line = build_line(cfg, run_id=run_id, north=False, transports=transports)
    service = line.service
    crops: dict[int, np.ndarray] = {}
    if keep_crops:

        def keep(decisions: list[Decision]) -> None:
            for d in decisions:
                if d.piece.crops:
                    crops[d.piece.id] = materialise(d.piece.crops[len(d.piece.crops) // 2])

        service.parts.decision_taps.append(keep)
    stop = asyncio.Event()
    wall0 = time.perf_counter()
    svc = asyncio.create_task(service.run(stop), name="service")
    bar = None
    if service.hallbar is not None:
        bar = asyncio.create_task(_feed_bar(rec.hallbar(), service.hallbar.receive, clock.now), name="bar")
    t_last = max(r.get("t_deliver", r["t_received"]) for rows in by_cam.values() for r in rows)
    try:
        while not all(s.done for s in sources.values()) or clock.now() < t_last:
            if svc.done():
                svc.result()
            await asyncio.sleep(STEP_S)
        deadline = clock.now() + DRAIN_S
        while not service.idle and clock.now() < deadline:
            await asyncio.sleep(STEP_S)
    finally:
        stop.set()
        await asyncio.gather(svc, return_exceptions=True)
        if bar is not None:
            bar.cancel()
            await asyncio.gather(bar, return_exceptions=True)
    if svc.exception() is not None:
        raise ReplayError(f"the replayed line failed: {svc.exception()!r}")
    stats = service.stats
    info = {
        "virtual_s": round(clock.now() - rec.manifest["started_monotonic"], 3),
        "wall_s": round(time.perf_counter() - wall0, 2),
        "frames_replayed": sum(s.delivered for s in sources.values()),
        "frames_in_recording": len(frames),
        "frames_skipped_as_live_dropped": skipped,
        "frames_missing_from_recording": missing,
        "frames_processed": stats.counters.frames_processed,
        "frames_dropped": sum(c.dropped for c in service.captures.values()),
        "model_version": service.classifier.version,
        "estimated_purity": {k: (None if math.isnan(v) else round(v, 4)) for k, v in stats.purity.items()},
    }
    log.info("replay done", **{k: v for k, v in info.items() if not isinstance(v, dict)})
    return info, plc_box[0], crops, line


def run_replay(
    folder: Path, variant: Variant, out: Path, *, keep_crops: bool = False
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Replay one recording with one variant into `out` (records.sqlite, report.json); returns the report."""
    rec = Recording(folder)
    if not rec.closed:
        structlog.get_logger("replay").warning(
            "the recording was not closed (its line did not stop cleanly): replaying what it holds"
        )
    out.mkdir(parents=True, exist_ok=True)
    cfg = replay_config(rec, variant, out)
    m = rec.manifest
    clock = VirtualClock(float(m["started_monotonic"]), float(m["started_wall"]))
    run_id = f"replay-{m.get('run_id', 'unknown')}"
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(clock)) as runner:
        info, plc, crops, _line = runner.run(_replay(rec, cfg, clock, run_id, keep_crops, variant.all_frames))
    replayed = load_pieces(cfg.records.path, run_id)
    report = build_replay_report(rec, cfg, variant, replayed, info, plc)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report, crops


# --- judging ---
def match_pieces(a: list[dict[str, Any]], b: list[dict[str, Any]], counts_per_mm: float) -> list[tuple[int, int]]:
    """Pairs (index in a, index in b) of the same physical piece: one to one, nearest first, within MATCH_MM
    along (by the count at the camera line, compared modulo 2**32) and across."""
    if not a or not b:
        return []
    ref = int(b[len(b) // 2]["count"])
    keys = sorted((unwrap(wrap32(int(r["count"])), ref), j) for j, r in enumerate(b))
    counts = [k for k, _ in keys]
    tol = MATCH_MM * counts_per_mm
    pairs = []
    for i, r in enumerate(a):
        c = unwrap(wrap32(int(r["count"])), ref)
        k = int(np.searchsorted(counts, c - tol))
        while k < len(keys) and counts[k] <= c + tol:
            j = keys[k][1]
            dx = abs(float(r["x_mm"]) - float(b[j]["x_mm"]))
            if dx <= MATCH_MM:
                pairs.append((abs(counts[k] - c) / counts_per_mm + dx, i, j))
            k += 1
    pairs.sort()
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return out


def load_truth(path: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT id, cls, count, x_mm, mass_g FROM pieces")]
    finally:
        db.close()


def truth_figures(cfg: LineConfig, truth: list[dict[str, Any]], decided: list[dict[str, Any]]) -> dict[str, Any]:
    """Purity and recovery of the decisions per fraction, against the simulator's true classes.

    Over the true pieces that the line decided (matched on the belt): purity of a fraction = the share of
    the pieces decided into it whose true class routes there; recovery = the share of the pieces whose true
    class routes to it that were decided into it."""
    routes = cfg.routing.classes
    default = cfg.routing.default_fraction
    pairs = match_pieces(truth, decided, cfg.belt.counts_per_mm)
    want = Counter(routes.get(truth[i]["cls"], default) for i, _ in pairs)
    got: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for i, j in pairs:
        f = decided[j]["fraction"]
        got[f] += 1
        right[f] += routes.get(truth[i]["cls"], default) == f
    fractions = {}
    for f in cfg.fractions:
        fractions[f] = {
            "count": got[f],
            "purity": round(right[f] / got[f], 4) if got[f] else None,
            "recovery": round(right[f] / want[f], 4) if want[f] else None,
        }
    return {"pieces_true": len(truth), "pieces_matched": len(pairs), "fractions": fractions}


def _decision_text(row: dict[str, Any]) -> str:
    """'class -> fraction (confidence)'; a piece decided without a classification has no confidence."""
    conf = row.get("confidence")
    return f"{row['cls']} -> {row['fraction']} ({'-' if conf is None else f'{conf:.3f}'})"


def agreement(cfg: LineConfig, live: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of the pieces the live line decided the replay decided the same (class and fraction)."""
    pairs = match_pieces(live, replayed, cfg.belt.counts_per_mm)
    same = [
        (i, j)
        for i, j in pairs
        if (live[i]["cls"], live[i]["fraction"]) == (replayed[j]["cls"], replayed[j]["fraction"])
    ]
    differ = [
        {
            "live_id": live[i]["id"],
            "replay_id": replayed[j]["id"],
            "count": live[i]["count"],
            "x_mm": round(float(live[i]["x_mm"]), 1),
            "live": _decision_text(live[i]),
            "replay": _decision_text(replayed[j]),
            "live_outcome": live[i].get("outcome"),
            "replay_outcome": replayed[j].get("outcome"),
            "views": replayed[j].get("n_views"),
        }
        for i, j in pairs
        if (i, j) not in set(same)
    ]
    matched_live = {i for i, _ in pairs}
    matched_replay = {j for _, j in pairs}
    return {
        "live_decided": len(live),
        "replay_decided": len(replayed),
        "matched": len(pairs),
        "same_decision": len(same),
        "agreement": round(len(same) / len(live), 4) if live else None,
        "live_unmatched": [
            {
                "id": live[i]["id"],
                "count": live[i]["count"],
                "x_mm": round(float(live[i]["x_mm"]), 1),
                "cls": live[i]["cls"],
            }
            for i in range(len(live))
            if i not in matched_live
        ],
        "replay_unmatched": len(replayed) - len(matched_replay),
        # a piece held (line not ejecting: PLC fault, stop...) on one side only: the same class, another
        # state of the line when it was decided
        "differ_held": sum(1 for d in differ if "held" in (d["live_outcome"], d["replay_outcome"])),
        "differ": differ,
    }


def build_replay_report(
    rec: Recording,
    cfg: LineConfig,
    variant: Variant,
    replayed: list[dict[str, Any]],
    info: dict[str, Any],
    plc: ReplayPlc,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "recording": str(rec.folder),
        "format_version": rec.manifest["format_version"],
        "variant": variant.label,
        "config": str(variant.config or rec.config_path),
        "model": str(cfg.classifier.model),
        "recorded_model_version": rec.manifest.get("model_version"),
        **info,
        "pieces": len(replayed),
        "by_fraction": dict(Counter(r["fraction"] for r in replayed)),
        "by_class": dict(Counter(r["cls"] for r in replayed)),
        "outcomes": dict(Counter(r["outcome"] for r in replayed)),
        "field_states": dict(Counter(r.get("field_state") for r in replayed)),
        "plc_commands_accepted": len(plc.commands),
        "records": str(cfg.records.path),
    }
    live = rec.decisions()
    if live:
        report["live"] = agreement(cfg, live, replayed)
    if rec.truth_path is not None:
        truth = load_truth(rec.truth_path)
        report["truth"] = truth_figures(cfg, truth, replayed)
        if live:
            report["truth_live"] = truth_figures(cfg, truth, live)
    return report


# --- what-if: two variants on the same recording ---
def compare(folder: Path, a: Variant, b: Variant, out: Path) -> dict[str, Any]:
    """Replay the recording with a and with b; what changes: counts, purity, the pieces decided otherwise."""
    rec = Recording(folder)
    ra, crops_a = run_replay(folder, a, out / "a", keep_crops=True)
    rb, _ = run_replay(folder, b, out / "b")
    cfg: LineConfig = load_config(a.config or rec.config_path)
    pa = load_pieces(Path(ra["records"]), None)
    pb = load_pieces(Path(rb["records"]), None)
    truth = load_truth(rec.truth_path) if rec.truth_path is not None else None
    true_cls: dict[int, str] = {}
    if truth is not None:
        true_cls = {j: truth[i]["cls"] for i, j in match_pieces(truth, pa, cfg.belt.counts_per_mm)}
    changed = []
    for i, j in match_pieces(pa, pb, cfg.belt.counts_per_mm):
        x, y = pa[i], pb[j]
        if (x["cls"], x["fraction"]) != (y["cls"], y["fraction"]):
            changed.append(
                {
                    "id_a": x["id"],
                    "id_b": y["id"],
                    "count": x["count"],
                    "x_mm": round(float(x["x_mm"]), 1),
                    "a": {"cls": x["cls"], "fraction": x["fraction"], "confidence": round(x["confidence"], 3)},
                    "b": {"cls": y["cls"], "fraction": y["fraction"], "confidence": round(y["confidence"], 3)},
                    "true_cls": true_cls.get(i),
                }
            )
    fractions = {}
    for f in cfg.fractions:
        row: dict[str, Any] = {
            "count_a": ra["by_fraction"].get(f, 0),
            "count_b": rb["by_fraction"].get(f, 0),
            "estimated_purity_a": ra["estimated_purity"].get(f),
            "estimated_purity_b": rb["estimated_purity"].get(f),
        }
        if "truth" in ra:
            row["purity_a"] = ra["truth"]["fractions"][f]["purity"]
            row["purity_b"] = rb["truth"]["fractions"][f]["purity"]
            row["recovery_a"] = ra["truth"]["fractions"][f]["recovery"]
            row["recovery_b"] = rb["truth"]["fractions"][f]["recovery"]
        fractions[f] = row
    result = {
        "recording": str(folder),
        "a": a.label,
        "b": b.label,
        "model_a": ra["model_version"],
        "model_b": rb["model_version"],
        "pieces_a": ra["pieces"],
        "pieces_b": rb["pieces"],
        "fractions": fractions,
        "changed_fraction": sum(1 for c in changed if c["a"]["fraction"] != c["b"]["fraction"]),
        "changed": changed,
        "html": str(out / "compare.html"),
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.html").write_text(compare_html(result, crops_a))
    return result


def _img(crop: np.ndarray | None) -> str:
    if crop is None:
        return "(no crop)"
    ok, png = cv2.imencode(".png", crop)
    if not ok:
        return "(no crop)"
    return f'<img src="data:image/png;base64,{base64.b64encode(png.tobytes()).decode()}" width="96">'


def compare_html(result: dict[str, Any], crops: dict[int, np.ndarray]) -> str:
    """One self-contained page: the per-fraction table and each changed piece with its crop (inline PNG)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(f)}</td>" + "".join(f"<td>{e(str(v))}</td>" for v in r.values()) + "</tr>"
        for f, r in result["fractions"].items()
    )
    head = "".join(f"<th>{e(k)}</th>" for k in next(iter(result["fractions"].values()), {}))
    pieces = "".join(
        f"<tr><td>{_img(crops.get(c['id_a']))}</td><td>{c['id_a']}</td><td>{c['count']}</td><td>{c['x_mm']}</td>"
        f"<td>{e(c['a']['cls'])} &rarr; {e(c['a']['fraction'])} ({c['a']['confidence']})</td>"
        f"<td>{e(c['b']['cls'])} &rarr; {e(c['b']['fraction'])} ({c['b']['confidence']})</td>"
        f"<td>{e(str(c['true_cls'] or '-'))}</td></tr>"
        for c in result["changed"]
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sorter replay --compare</title>
<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:3px 6px}}
table{{border-collapse:collapse}}</style>
</head><body><h1>What changes: A = {e(result["a"])} ({e(str(result["model_a"]))}),
B = {e(result["b"])} ({e(str(result["model_b"]))})</h1>
<p>recording {e(result["recording"])}; pieces decided: A {result["pieces_a"]}, B {result["pieces_b"]};
decided otherwise: {len(result["changed"])}</p>
<table><tr><th>fraction</th>{head}</tr>{rows}</table>
<h2>Pieces decided otherwise</h2>
<table><tr><th>crop</th><th>piece (A)</th><th>count</th><th>x mm</th><th>A</th><th>B</th><th>true class</th></tr>
{pieces}</table></body></html>
"""


def check_recording(folder: Path) -> None:
    """Raise RecordingError (clear message) if the folder is not a recording this sorter can replay."""
    Recording(folder)


__all__ = ["RecordingError", "ReplayError", "Variant", "compare", "run_replay"]
