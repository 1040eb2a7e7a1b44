"""Encoder resolution (`belt.counts_per_mm`), measured with the encoder-triggered cameras.

Every frame of the line's cameras carries the encoder count latched at its exposure. A bright mark
riding the belt crosses the image rows at a rate proportional to the belt's travel, so its row is a
straight line in the latched count; where two such lines reach the same image row tells how many
counts lie between two belt positions a known distance apart:

- target (`--distance-mm D`): a strip laid on the belt with two bright round dots D mm apart
  (centre to centre) along the belt. counts/mm = (counts between the dots crossing the same row) / D.
- belt loop (`--belt-length-mm L`): one bright dot on the belt itself, seen once per revolution.
  counts/mm = (counts between passes) / L, over `--passes` revolutions.

Each dot is located to a fraction of a pixel (intensity centroid) in every frame it is fully in view;
per camera one straight-line fit (a shared slope, one intercept per dot or pass) gives the counts
between the crossings and, from its residuals, their uncertainty. Neither the camera's scale nor the
belt's speed enter the result (only a strip laid askew does, slightly: its across-belt offset is
measured and the along-belt distance corrected). Cameras that saw the dots are combined by their
uncertainties.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import structlog
import typer
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from hw.cameras import describe_source
from hw.common import (
    Change,
    HwError,
    config_option,
    console,
    load,
    prompt,
    run_app,
    script_errors,
    show_measurement,
    write_changes,
    yes_option,
)
from hw.plc import connected_plc, run_belt, stop_belt
from sorter.config import CameraConfig, LineConfig, QueueConfig
from sorter.core.geometry import unwrap
from sorter.core.messages import Frame
from sorter.drivers.cameras.capture import CameraCapture, CaptureClosed
from sorter.logs import setup_logging
from sorter.vision.segment import segment

SCRIPT = "calibrate_encoder"
_POLL_S = 0.05
_CLEAR_MM = 150.0  # after the last dot left every camera's view by this much of belt, nothing more can come
_GAP_SHARE = 0.3  # sightings further apart than this share of the mark spacing belong to different dots/passes


@dataclass(frozen=True, slots=True)
class Sighting:
    """One dot fully in view in one frame: where (sub-pixel) and at which latched count."""

    count: int  # unwrapped
    u: float  # column
    v: float  # row (downstream = increasing row)


@dataclass(frozen=True)
class CameraResult:
    camera: str
    counts: float  # between the first and the last dot/pass crossing the same image row
    sigma: float
    steps: int  # mark spacings between them (1 for the target; revolutions for the belt loop)
    across_mm: float  # across-belt offset of the last dot from the first (a strip laid askew)
    sightings: list[int]  # per dot/pass
    rms_px: float


def dots(image: np.ndarray, cam: CameraConfig, cfg: LineConfig) -> list[tuple[float, float]]:
    """Sub-pixel centres of the bright dots fully in view: the line's segmenter finds them, an intensity
    centroid over the full-resolution pixels places them (the segmenter's centroid is on a binary,
    downscaled mask)."""
    thr = cfg.vision.threshold
    if int(image[::8, ::8].max()) < 2 * thr:  # nothing bright: most frames, skipped cheaply
        return []
    out = []
    for b in segment(image, cfg.vision, cam.mapping.mm_per_px, crop_size=None):
        if b.touches_top_bottom or b.touches_left_right:
            continue
        u0, v0 = max(int(b.u0) - 3, 0), max(int(b.v0) - 3, 0)
        u1, v1 = min(int(b.u1) + 4, image.shape[1]), min(int(b.v1) + 4, image.shape[0])
        roi = image[v0:v1, u0:u1]
        m = cv2.max(cv2.max(roi[..., 0], roi[..., 1]), roi[..., 2]).astype(np.float64)
        w = np.clip(m - thr, 0.0, None)  # the belt (and its noise) stays below the threshold: weight 0
        total = w.sum()
        if total <= 0:
            continue
        vv, uu = np.mgrid[v0:v1, u0:u1]
        out.append((float((w * uu).sum() / total), float((w * vv).sum() / total)))
    return out


def rows_per_count(cam: CameraConfig, counts_per_mm: float) -> float:
    """How fast a mark riding the belt moves down the image, as the config has it (only used to sort marks)."""
    return math.cos(math.radians(cam.mapping.rotation_deg)) / (cam.mapping.mm_per_px * counts_per_mm)


def group_marks(sightings: list[Sighting], slope: float, spacing_counts: float) -> dict[int, list[Sighting]]:
    """Sightings by mark index: 0 for the first dot (or pass) to cross, 1 for the next spacing, ...

    `q = count - row / slope` is the count at which the dot was at row 0: the same for every
    sighting of one dot. Groups split at gaps in q; each group's index is its distance from the first
    in mark spacings (the config's counts/mm is good to far better than half a spacing).
    """
    if not sightings:
        return {}
    pts = sorted(sightings, key=lambda s: s.count - s.v / slope)
    q = np.array([s.count - s.v / slope for s in pts])
    cuts = np.nonzero(np.diff(q) > _GAP_SHARE * spacing_counts)[0] + 1
    groups: dict[int, list[Sighting]] = {}
    for part, qs in zip(np.split(np.arange(len(pts)), cuts), np.split(q, cuts), strict=True):
        steps = (float(qs.mean()) - float(q[: cuts[0] if len(cuts) else len(q)].mean())) / spacing_counts
        k = round(steps)
        if abs(steps - k) > 0.25 or k in groups:
            raise HwError(
                f"marks {steps:.2f} spacings apart: not the marks described (or something else is on the belt)",
                "check --distance-mm / --belt-length-mm, and clear the belt of everything but the marks",
            )
        groups[k] = [pts[i] for i in part]
    return groups


def fit_camera(name: str, cam: CameraConfig, groups: dict[int, list[Sighting]]) -> CameraResult | None:
    """Rows (and columns) against counts: one slope, one intercept per mark; None if too few sightings."""
    usable = {k: g for k, g in groups.items() if len(g) >= 2}
    if len(usable) < 2:
        return None
    ks = sorted(usable)
    pts = [(i, s) for i, k in enumerate(ks) for s in usable[k]]
    n, m = len(pts), len(ks)
    if n <= m + 1:
        return None
    c0 = float(np.mean([s.count for _, s in pts]))
    x = np.zeros((n, m + 1))
    for r, (i, s) in enumerate(pts):
        x[r, i] = 1.0
        x[r, m] = s.count - c0  # centred: keeps the normal equations well conditioned
    v = np.array([s.v for _, s in pts])
    u = np.array([s.u for _, s in pts])
    theta, *_ = np.linalg.lstsq(x, v, rcond=None)
    res = v - x @ theta
    dof = n - m - 1
    # a floor for the centroid scatter: a perfect fit of few points must not claim perfect knowledge
    s2 = max(float(res @ res) / dof, 0.01**2)
    cov = s2 * np.linalg.inv(x.T @ x)
    a1, ak, b = theta[0], theta[m - 1], theta[m]
    counts = (a1 - ak) / b  # crossing count of row r: c = c0 + (r - a) / b
    grad = np.zeros(m + 1)
    grad[0], grad[m - 1], grad[m] = 1 / b, -1 / b, -(a1 - ak) / b**2
    sigma = float(math.sqrt(grad @ cov @ grad))
    phi, *_ = np.linalg.lstsq(x, u, rcond=None)
    across_px = (phi[m - 1] - phi[0]) + phi[m] * counts  # column offset where each crosses the same row
    mp = cam.mapping
    return CameraResult(
        name,
        float(counts),
        sigma,
        ks[-1] - ks[0],
        float(across_px * mp.mm_per_px * math.cos(math.radians(mp.rotation_deg))),
        [len(usable[k]) for k in ks],
        float(math.sqrt(float(res @ res) / n)),
    )


def along_distance(spacing_mm: float, steps: int, across_mm: float, rotation_deg: float, askew: bool) -> float:
    """Belt travel between the first and the last mark crossing the same image row.

    A strip laid askew puts its second dot `across_mm` to the side: it lies sqrt(D^2 - dx^2) along, and a
    camera rotated by rho sees it cross a given row after dx * tan(rho) more of travel.
    """
    d = spacing_mm * steps
    if not askew:
        return d
    return math.sqrt(max(d * d - across_mm * across_mm, 0.0)) + across_mm * math.tan(math.radians(rotation_deg))


class Watcher:
    """Collects every camera's dot sightings while the belt runs."""

    def __init__(self, cfg: LineConfig, spacing_mm: float) -> None:
        self.cfg = cfg
        self.spacing_counts = spacing_mm * cfg.belt.counts_per_mm
        self.sightings: dict[str, list[Sighting]] = {c.name: [] for c in cfg.cameras}
        self.frames: dict[str, int] = {c.name: 0 for c in cfg.cameras}
        self.latest: int | None = None  # unwrapped count of the newest frame
        self.last_seen: int | None = None

    def marks_seen(self) -> int:
        best = 0
        for cam in self.cfg.cameras:
            s = self.sightings[cam.name]
            try:
                groups = group_marks(s, rows_per_count(cam, self.cfg.belt.counts_per_mm), self.spacing_counts)
            except HwError:
                continue  # judged at the end, with everything seen
            if groups:
                best = max(best, max(groups) - min(groups) + 1)
        return best

    def passed(self) -> bool:
        """Has the belt carried everything seen out of every camera's view?"""
        if self.latest is None or self.last_seen is None:
            return False
        field = max(c.height * c.mapping.mm_per_px for c in self.cfg.cameras)
        return self.latest - self.last_seen > (field + _CLEAR_MM) * self.cfg.belt.counts_per_mm

    def add(self, cam: CameraConfig, frame: Frame, count: int, found: list[tuple[float, float]]) -> None:
        self.frames[cam.name] += 1
        self.latest = count if self.latest is None else max(self.latest, count)
        if found:
            self.last_seen = count
            self.sightings[cam.name] += [Sighting(count, u, v) for u, v in found]


async def watch(cfg: LineConfig, spacing_mm: float, marks_needed: int, timeout_s: float) -> Watcher:
    """Run the belt and collect sightings until `marks_needed` marks have passed (or HwError)."""
    log = structlog.get_logger("hw.encoder")
    w = Watcher(cfg, spacing_mm)
    # a deep queue: a frame lost is a sighting lost, and the dots pass in a second
    queues = QueueConfig(frames_per_camera=64, drop_policy="drop_newest")
    captures = [CameraCapture(cam, queues, log) for cam in cfg.cameras]
    ref: list[int] = []  # the last unwrapped count: frames of every camera unwrap against it

    async def pump(cam: CameraConfig, cap: CameraCapture) -> None:
        while True:
            try:
                frame = await cap.get()
            except CaptureClosed:
                return
            if frame.count is None:
                raise HwError(
                    f"camera {cam.name} ({describe_source(cam)}) latches no encoder count",
                    "this calibration needs encoder-triggered cameras that report the count of each exposure",
                )
            count = unwrap(frame.count, ref[0]) if ref else frame.count
            ref[:] = [count]
            w.add(cam, frame, count, await asyncio.to_thread(dots, frame.image, cam, cfg))

    async with connected_plc(cfg) as link:
        pumps: list[asyncio.Task[None]] = []
        try:
            for cam, cap in zip(cfg.cameras, captures, strict=True):
                await cap.__aenter__()
                pumps.append(asyncio.create_task(pump(cam, cap)))
            await run_belt(cfg, link)  # encoder-triggered cameras expose only while the belt moves
            t0 = time.monotonic()
            columns = (SpinnerColumn(), TextColumn("{task.description}"))
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("waiting for the marks")
                while not (w.marks_seen() >= marks_needed and w.passed()):
                    for p in pumps:
                        if p.done() and p.exception() is not None:
                            raise p.exception()  # type: ignore[misc]
                    elapsed = time.monotonic() - t0
                    if elapsed > timeout_s:
                        raise _timed_out(cfg, w, captures, marks_needed, timeout_s)
                    frames = sum(w.frames.values())
                    bar.update(task, description=f"marks seen {w.marks_seen()}/{marks_needed}, {frames} frames")
                    await asyncio.sleep(_POLL_S)
        finally:
            await stop_belt(link)
            for cap in captures:
                await cap.stop()
            await asyncio.gather(*pumps, return_exceptions=True)
    return w


def _timed_out(cfg: LineConfig, w: Watcher, captures: list[CameraCapture], needed: int, timeout_s: float) -> HwError:
    silent = [
        f"camera {cam.name} ({describe_source(cam)}): no frames ({cap.offline_reason or 'nothing received'})"
        for cam, cap in zip(cfg.cameras, captures, strict=True)
        if not w.frames[cam.name]
    ]
    if silent:
        return HwError("\n".join(silent), "is each camera powered, connected, and triggered by the encoder?")
    return HwError(
        f"only {w.marks_seen()} of {needed} marks passed the cameras within {timeout_s:g} s",
        "lay the marks upstream of the cameras, under at least one of them, bright dots on the dark belt; "
        "is the belt running?",
    )


def results_table(results: list[CameraResult], spacing_mm: float, counts_per_mm: list[float]) -> Table:
    t = Table(title="counts between the marks crossing the same image row")
    for col in ("camera", "counts", "±", "marks", "sightings", "across mm", "fit rms px", "counts/mm"):
        t.add_column(col, justify="right")
    for r, cpm in zip(results, counts_per_mm, strict=True):
        t.add_row(
            r.camera,
            f"{r.counts:.1f}",
            f"{r.sigma:.2f}",
            str(r.steps + 1),
            "/".join(map(str, r.sightings)),
            f"{r.across_mm:.1f}",
            f"{r.rms_px:.3f}",
            f"{cpm:.4f}",
        )
    return t


def combine(values: list[float], sigmas: list[float]) -> tuple[float, float]:
    """Inverse-variance mean; its uncertainty is scaled up when the cameras disagree beyond theirs."""
    w = np.array([1 / s**2 for s in sigmas])
    x = np.array(values)
    mean = float((w * x).sum() / w.sum())
    sigma = float(1 / math.sqrt(w.sum()))
    if len(x) > 1:
        chi2 = float((w * (x - mean) ** 2).sum()) / (len(x) - 1)
        sigma *= max(1.0, math.sqrt(chi2))
    return mean, sigma


def main(
    config: Path = config_option(),
    yes: bool = yes_option(),
    distance_mm: float | None = typer.Option(
        None, "--distance-mm", help="target method: the dots' distance D, centre to centre (know it to 0.1 mm)"
    ),
    belt_length_mm: float | None = typer.Option(
        None, "--belt-length-mm", help="belt-loop method: the belt's length L (one revolution)"
    ),
    passes: int = typer.Option(2, "--passes", min=1, max=20, help="belt-loop method: revolutions to time"),
    tolerance_mm: float = typer.Option(
        0.1, "--tolerance-mm", min=0.0, help="how well D (or L) is known; adds to the result's uncertainty"
    ),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="give up when the marks have not passed by then"),
) -> None:
    """Measure the encoder's counts per mm of belt travel and write belt.counts_per_mm.

    Prepare EITHER a target and run with --distance-mm D:

    a strip with two bright round dots (e.g. 10 mm white dots on dark tape) D mm apart, centre to centre;

    lay it straight along the belt, at least 1 m upstream of the cameras and under one; the belt otherwise empty.

    OR a mark on the belt loop and run with --belt-length-mm L (slower: L/speed per revolution):

    a bright dot stuck on the belt itself where a camera sees it; L is the belt's length.

    The script starts the belt through the PLC and watches the encoder-triggered cameras until the marks passed.
    """
    setup_logging("warning")
    with script_errors():
        cfg = load(config)
        if (distance_mm is None) == (belt_length_mm is None):
            raise HwError("give one of --distance-mm (target) or --belt-length-mm (belt loop)", "see --help")
        askew = distance_mm is not None
        spacing = float(distance_mm if distance_mm is not None else belt_length_mm)  # type: ignore[arg-type]
        if spacing < 20.0:
            raise HwError(f"a mark spacing of {spacing:g} mm is too short to measure", "use at least 200 mm")
        needed = 2 if askew else passes + 1
        nominal_s = spacing * needed / cfg.belt.nominal_speed_mm_s
        timeout = timeout_s or (30.0 if askew else 20.0 + 1.5 * nominal_s)
        if askew:
            prompt(
                f"lay the target (two dots {spacing:g} mm apart) straight along the belt, upstream of the "
                "cameras; clear the belt of everything else",
                yes,
            )
        else:
            prompt(
                f"stick a bright dot on the belt where a camera sees it (belt length {spacing:g} mm); "
                "clear the belt of everything else",
                yes,
            )
        w = asyncio.run(watch(cfg, spacing, needed, timeout))
        cams = {c.name: c for c in cfg.cameras}
        results: list[CameraResult] = []
        for name, s in w.sightings.items():
            cam = cams[name]
            groups = group_marks(s, rows_per_count(cam, cfg.belt.counts_per_mm), spacing * cfg.belt.counts_per_mm)
            r = fit_camera(name, cam, groups)
            if r is not None:
                results.append(r)
        if not results:
            raise HwError(
                "no camera saw two marks fully in view in enough frames",
                "lay the marks under a camera, not at the edge of its view",
            )
        cpms = [
            r.counts / along_distance(spacing, r.steps, r.across_mm, cams[r.camera].mapping.rotation_deg, askew)
            for r in results
        ]
        sig = [r.sigma / along_distance(spacing, r.steps, 0.0, 0.0, False) for r in results]
        cpm, sigma_fit = combine(cpms, sig)
        # the marks' own distance is known only so well: a systematic error no number of frames averages out
        sigma_d = cpm * tolerance_mm / (spacing * max(r.steps for r in results))
        sigma = math.hypot(sigma_fit, sigma_d)
        console.print(results_table(results, spacing, cpms))
        show_measurement("encoder resolution", cpm, sigma, "counts/mm", digits=6)
        console.print(
            f"  (from the fits ± {sigma_fit:.2g}, from the ±{tolerance_mm:g} mm of the marks' distance ± {sigma_d:.2g})"
        )
        old = cfg.belt.counts_per_mm
        console.print(f"  config has {old:g} counts/mm: {100 * (cpm - old) / old:+.3f} %")
        if askew and any(abs(r.across_mm) > 0.05 * spacing for r in results):
            console.print("[yellow]the strip lies askew: corrected, but lay it straighter for the best result[/]")
        write_changes(
            config,
            [Change("belt.counts_per_mm", round(cpm, 5))],
            script=SCRIPT,
            yes=yes,
            residuals={
                "sigma_counts_per_mm": sigma,
                "sigma_fit_counts_per_mm": sigma_fit,
                "rms_px": {r.camera: round(r.rms_px, 4) for r in results},
            },
            measured={
                "method": "target" if askew else "belt_loop",
                "spacing_mm": spacing,
                "cameras": {r.camera: {"counts": r.counts, "sigma": r.sigma, "steps": r.steps} for r in results},
                "counts_per_mm": cpm,
            },
        )


if __name__ == "__main__":
    run_app(main)
