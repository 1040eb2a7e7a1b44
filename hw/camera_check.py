"""hw.camera_check: frame rate, delivery delay, focus and exposure of every configured camera.

Writes nothing to the config; see `main` (what `--help` shows) for what it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from hw.cameras import Grabbed, describe_source, genicam_facts, grab
from hw.common import HwError, config_option, console, load, prompt, run_app, script_errors
from sorter.config import GenICamSource, LineConfig
from sorter.config.precision import position_report
from sorter.core.geometry import diff32
from sorter.logs import setup_logging

MIN_CONTENT = 0.001  # a frame judges focus only if this share of it shows something brighter than the belt
_CONTENT_GROW_PX = 7  # the content mask grows by this much so that the edges around pieces count


@dataclass(frozen=True)
class Limits:
    min_fps: float
    max_lost: float
    max_delay_ms: float
    min_focus: float
    max_clipped: float


@dataclass
class CameraResult:
    camera: str
    source: str
    frames: int
    fps: float | None
    lost_share: float
    belt_mm_per_frame: float | None  # from the latched encoder counts; None without them
    field_along_mm: float
    delay_ms: dict[str, float] | None  # median, p95, max; None if the camera has no exposure time stamp
    focus: float | None  # variance of the Laplacian; None: nothing on the belt to judge it by
    focus_frames: int
    clipped_bright: float
    clipped_dark: float
    frame_png: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


# --- measures ---
def content_mask(grey: np.ndarray, threshold: int) -> np.ndarray:
    """What is brighter than the dark belt (the segmenter's own threshold), grown to take in its edges."""
    k = np.ones((_CONTENT_GROW_PX, _CONTENT_GROW_PX), np.uint8)
    return cv2.dilate((grey > threshold).astype(np.uint8), k).astype(bool)


def focus_measure(image: np.ndarray, threshold: int) -> float | None:
    """Variance of the Laplacian over the frame's content (None if it shows too little to judge).

    Only the content counts: the empty belt's sensor noise would otherwise pass for sharpness, and a
    mostly empty frame would dilute a sharp piece into a low figure.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    mask = content_mask(grey, threshold)
    if mask.mean() < MIN_CONTENT:
        return None
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    return float(lap[mask].var())


def clipped_shares(image: np.ndarray) -> tuple[float, float]:
    """Share of pixels saturated bright (any channel 255) and crushed dark (every channel 0 or 1)."""
    return float((image.max(axis=2) >= 255).mean()), float((image.max(axis=2) <= 1).mean())


def analyse(g: Grabbed, cfg: LineConfig, limits: Limits) -> tuple[CameraResult, np.ndarray | None]:
    cam = g.camera
    st = g.stamps
    n = len(st)
    span = st[-1].t_capture - st[0].t_capture if n > 1 else 0.0
    fps = (n - 1) / span if span > 0 else None
    lost = g.dropped / (n + g.dropped) if n + g.dropped else 0.0
    counts = [(s.seq, s.count) for s in st if s.count is not None]
    steps = [diff32(c1, c0) / (q1 - q0) for (q0, c0), (q1, c1) in itertools.pairwise(counts) if q1 > q0]
    travel = float(np.median(steps)) / cfg.belt.counts_per_mm if steps else None
    # only a camera that latches the encoder at exposure time-stamps the exposure; others stamp the grab
    # a GenICam camera placed by count or device timestamp stamps its frames with the exposure time too
    src = cam.source
    device_timed = isinstance(src, GenICamSource) and src.position != "arrival"
    exposed = [s for s in st if s.count is not None or device_timed]
    delay = None
    if exposed:
        d = np.array([s.t_received - s.t_capture for s in exposed]) * 1000.0
        delay = {"median": float(np.median(d)), "p95": float(np.percentile(d, 95)), "max": float(d.max())}
    threshold = cfg.vision.threshold
    focus = [(f, fr) for fr in g.frames if (f := focus_measure(fr.image, threshold)) is not None]
    clips = np.array([clipped_shares(fr.image) for fr in g.frames]) if g.frames else np.zeros((1, 2))
    best = max(
        g.frames,
        key=lambda fr: content_mask(cv2.cvtColor(fr.image, cv2.COLOR_BGR2GRAY), threshold).mean(),
        default=None,
    )
    r = CameraResult(
        camera=cam.name,
        source=describe_source(cam),
        frames=n,
        fps=fps,
        lost_share=lost,
        belt_mm_per_frame=travel,
        field_along_mm=cam.height * cam.mapping.mm_per_px,
        delay_ms=delay,
        focus=float(np.median([f for f, _ in focus])) if focus else None,
        focus_frames=len(focus),
        clipped_bright=float(clips[:, 0].mean()),
        clipped_dark=float(clips[:, 1].mean()),
    )
    if fps is None or fps < limits.min_fps:
        r.failures.append(f"frame rate {fps or 0:.1f}/s < {limits.min_fps:g}/s")
    if lost > limits.max_lost:
        r.failures.append(f"{lost:.1%} of frames lost > {limits.max_lost:.1%}")
    if travel is not None and travel > r.field_along_mm / 2:
        r.failures.append(
            f"the belt moves {travel:.0f} mm between frames: more than half the {r.field_along_mm:.0f} mm field, "
            "so parts of the belt are seen once or never (check the trigger divider)"
        )
    if delay is not None and delay["p95"] > limits.max_delay_ms:
        r.failures.append(f"delivery delay p95 {delay['p95']:.0f} ms > {limits.max_delay_ms:g} ms")
    if r.focus is None:
        r.failures.append("nothing on the belt to judge focus by: feed some pieces or lay the target")
    elif r.focus < limits.min_focus:
        r.failures.append(f"out of focus: sharpness {r.focus:.0f} < {limits.min_focus:g}")
    if r.clipped_bright > limits.max_clipped:
        r.failures.append(f"over-exposed: {r.clipped_bright:.2%} of pixels saturated > {limits.max_clipped:.2%}")
    if r.clipped_dark > limits.max_clipped:
        r.failures.append(f"under-exposed: {r.clipped_dark:.2%} of pixels black > {limits.max_clipped:.2%}")
    return r, (best.image if best is not None else None)


# --- local devices ---
def list_devices() -> list[str]:
    """Every /dev/video* node and what OpenCV makes of it (a plant PC's USB or frame-grabber cameras)."""
    nodes = sorted(Path("/dev").glob("video*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    rows = []
    for node in nodes:
        cap = cv2.VideoCapture(str(node), cv2.CAP_V4L2)
        try:
            if cap.isOpened():
                w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
                rows.append(f"{node}: {w}x{h} at {cap.get(cv2.CAP_PROP_FPS):g} fps")
            else:
                rows.append(f"{node}: cannot be opened (busy, or not a capture node)")
        finally:
            cap.release()
    return rows


def _table(results: list[CameraResult]) -> Table:
    t = Table(title="camera check")
    for col in ("camera", "frames", "fps", "lost", "mm/frame", "delay ms (med/p95)", "focus", "clipped", "result"):
        t.add_column(col, justify="left" if col in ("camera", "result") else "right")
    for r in results:
        t.add_row(
            r.camera,
            str(r.frames),
            f"{r.fps:.1f}" if r.fps else "-",
            f"{r.lost_share:.1%}",
            f"{r.belt_mm_per_frame:.1f}" if r.belt_mm_per_frame is not None else "-",
            f"{r.delay_ms['median']:.0f} / {r.delay_ms['p95']:.0f}" if r.delay_ms else "n/a",
            f"{r.focus:.0f}" if r.focus is not None else "-",
            f"{r.clipped_bright:.2%} / {r.clipped_dark:.2%}",
            "[green]pass[/]" if r.passed else "[red]FAIL[/]",
        )
    return t


CONFIG = config_option("the line config whose cameras to check (nothing is written to it)")
YES = typer.Option(False, "--yes", help="unattended: skip the prompt")
SECONDS = typer.Option(3.0, "--seconds", min=0.5, help="how long to measure each camera")
OUT = typer.Option(Path("camera-check"), "--out", help="folder for the test frames and camera-check.json")
MIN_FPS = typer.Option(25.0, "--min-fps", help="fail below this frame rate")
MAX_LOST = typer.Option(0.01, "--max-lost", help="fail if more than this share of frames is lost")
MAX_DELAY = typer.Option(150.0, "--max-delay-ms", help="fail if the 95th percentile delivery delay is longer")
MIN_FOCUS = typer.Option(
    300.0,
    "--min-focus",
    help="fail below this sharpness (variance of the Laplacian over pieces/target): a sharp camera shows about "
    "1000 on scrap and on the target, a defocused one falls towards 100, its sensor noise; compare against a "
    "camera known to be sharp",
)
MAX_CLIPPED = typer.Option(0.01, "--max-clipped", help="fail if more than this share of pixels is saturated or black")


def main(
    config: Path = CONFIG,
    yes: bool = YES,
    seconds: float = SECONDS,
    out: Path = OUT,
    min_fps: float = MIN_FPS,
    max_lost: float = MAX_LOST,
    max_delay_ms: float = MAX_DELAY,
    min_focus: float = MIN_FOCUS,
    max_clipped: float = MAX_CLIPPED,
) -> None:
    """Check the line's cameras: frame rate, delivery delay, focus, exposure; writes no config.

    Prepare: run the belt at its production speed with the cameras in their production (encoder)
    trigger, and feed some scrap so there is something on the belt to judge focus by. (Focus and
    exposure can also be judged on the calibration target of hw.calibrate_camera lying on the
    stopped belt with the cameras in free-run; the frame rate is then the free-run rate: lower
    --min-fps.)

    For each configured camera, opened exactly as the line service opens it, the script measures
    the frame rate and the frames lost, the delivery delay (frame received minus exposure, for
    cameras that time-stamp their exposure), the belt travel between frames (from the encoder
    counts the frames carry), focus (variance of the Laplacian over what lies on the belt, pieces
    or target; median over the frames that show some) and exposure (share of clipped pixels,
    bright and dark). It saves one test frame per camera as DIR/<camera>.png and all it measured
    as DIR/camera-check.json, prints a table, and exits 1 if a check fails, 2 if a camera cannot
    be reached.
    """
    setup_logging("error")
    limits = Limits(min_fps, max_lost, max_delay_ms, min_focus, max_clipped)
    with script_errors():
        cfg = load(config)
        devices = list_devices()
        console.print("local camera devices: " + ("none" if not devices else ""))
        for row in devices:
            console.print(f"  {row}")
        gige, facts = genicam_facts(cfg)
        if gige or facts:
            console.print(f"GenICam cameras found: {len(gige)}")
            for d in gige:
                console.print(f"  {d['vendor']} {d['model']} serial {d['serial']} at {d['address']}")
        failures: dict[str, list[str]] = {}
        for name, fact in facts.items():
            if "error" in fact:
                raise HwError(fact["error"], "`sorter cameras discover`; docs/cameras.md")
            console.print(
                f"{name}: trigger {fact['trigger_mode']} on {fact['trigger_source']}, {fact['pixel_format']}, "
                f"exposure {fact['exposure_us']} µs, chunks {'yes' if fact['chunks_available'] else 'no'}, "
                f"{fact['frame_id_bits']}-bit frame IDs, position from {fact['position']}"
            )
            if fact["position"] == "trigger" and fact["trigger_mode"] != "On":
                failures.setdefault(name, []).append("position `trigger` but the camera's trigger is off")
        positions = position_report(cfg)
        for pos in positions:
            if not pos["ok"]:
                failures.setdefault(str(pos["camera"]), []).append(
                    f"position `{pos['method']}` is off by ±{pos['error_mm']} mm > margin {pos['margin_mm']} mm"
                )
        prompt(
            "run the belt at production speed (cameras encoder-triggered) and feed some scrap: "
            "focus and exposure are judged on what lies on the belt",
            yes,
        )
        grabbed = asyncio.run(grab(cfg, seconds, keep=12, what="measuring the cameras"))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HwError(f"cannot create the output folder {out}: {exc.strerror}", "pass a writable --out") from None
        results = []
        for g in grabbed:
            r, image = analyse(g, cfg, limits)
            r.failures += failures.get(r.camera, [])
            if image is not None:
                png = out / f"{r.camera}.png"
                if not cv2.imwrite(str(png), image):
                    raise HwError(f"cannot write {png}", "pass a writable --out")
                r.frame_png = str(png)
            results.append(r)
        report: dict[str, Any] = {
            "config": str(config),
            "seconds": seconds,
            "limits": asdict(limits),
            "devices": devices,
            "genicam": {"found": gige, "cameras": facts},
            "positions": positions,
            "cameras": [asdict(r) for r in results],
            "passed": all(r.passed for r in results),
        }
        (out / "camera-check.json").write_text(json.dumps(report, indent=2))
        Console(highlight=False).print(_table(results))
        for r in results:
            for why in r.failures:
                console.print(f"[red]{r.camera}:[/] {why}")
        console.print(f"test frames and camera-check.json in {out}")
    if not report["passed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    run_app(main)
