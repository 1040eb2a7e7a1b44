"""hw.calibrate_camera: each camera's pixel -> belt-mm mapping from a ChArUco target lying across the belt.

The product maps pixels to the belt with a similarity transform per camera (`sorter.core.geometry.
CameraGeometry`: image centre on the belt, mm per pixel, rotation). This script finds the target's
corners in every camera, fits that transform to the corners' known belt positions by least squares,
and writes `cameras[i].mapping`. All cameras are fitted to the one target, so they share its frame;
the corners two neighbouring cameras both see show whether they agree where they overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from hw.cameras import Grabbed, free_run, genicam_cameras, grab
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
from hw.target import ChArUcoTarget
from sorter.config import CameraConfig, LineConfig
from sorter.core.geometry import CameraGeometry
from sorter.logs import setup_logging

MIN_CORNERS = 12
MIN_SPAN = 0.4  # the corners must spread over this share of the image width, or scale and rotation extrapolate
MAX_TILT_DEG = 10.0  # image rows must run along the belt (the segmenter's partial-view edges assume it)
MAX_ASPECT_ERR = 0.01  # x and y scale this far apart: a tilted camera, which a similarity cannot map
MAX_JITTER_PX = 0.5  # a corner wandering more than this between frames: the target (or camera) moved


@dataclass(frozen=True)
class Fit:
    camera: str
    index: int
    geometry: CameraGeometry
    sigma_centre_mm: tuple[float, float]
    sigma_mm_per_px: float
    sigma_rotation_deg: float
    rms_mm: float
    max_mm: float
    corners: int
    aspect: float  # x scale / y scale of a free affine fit: 1 for a camera looking straight down


# --- finding the target ---
def find_corners(g: Grabbed, spec: ChArUcoTarget) -> dict[int, np.ndarray]:
    """Corner id -> its pixel position (median over the frames), for the corners this camera sees."""
    detector = cv2.aruco.CharucoDetector(spec.board())
    seen: dict[int, list[np.ndarray]] = {}
    for frame in g.frames:
        corners, ids, _, _ = detector.detectBoard(cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY))
        if ids is None:
            continue
        for i, p in zip(ids.ravel(), corners.reshape(-1, 2), strict=True):
            seen.setdefault(int(i), []).append(p.astype(np.float64))
    need = max(1, len(g.frames) // 2)  # a corner found in only a few frames is a doubtful one
    found = {i: np.array(ps) for i, ps in seen.items() if len(ps) >= need}
    cam = g.camera
    if len(found) < MIN_CORNERS:
        raise HwError(
            f"camera {cam.name} sees {len(found)} target corners (at least {MIN_CORNERS} needed)",
            "is the target under this camera, flat, lit, and the camera in focus (hw.camera_check)?",
        )
    jitter = max(float(np.abs(ps - np.median(ps, axis=0)).max()) for ps in found.values())
    if jitter > MAX_JITTER_PX:
        raise HwError(
            f"camera {cam.name}: the target moved while it was measured ({jitter:.1f} px)",
            "stop the belt and keep the target still (cameras in free-run)",
        )
    uv = np.array([np.median(ps, axis=0) for ps in found.values()])
    span = float(np.ptp(uv[:, 0])) / cam.width
    if span < MIN_SPAN:
        raise HwError(
            f"camera {cam.name}: the target's corners cover only {span:.0%} of its image width",
            "lay the target across the whole belt, under every camera",
        )
    return dict(zip(found, uv, strict=True))


def belt_xy(spec: ChArUcoTarget, ids: list[int], x_mm: float, y_mm: float) -> np.ndarray:
    """Belt (x, y) of corners `ids` with the pattern's left edge at x_mm and its centre line at y_mm."""
    pattern = spec.corners_mm()[ids]
    return np.column_stack([x_mm + pattern[:, 0], y_mm - spec.pattern_mm[1] / 2 + pattern[:, 1]])


# --- fitting ---
def fit_mapping(cam: CameraConfig, index: int, uv: np.ndarray, xy: np.ndarray) -> Fit:
    """Least-squares similarity pixel -> belt mm, as `CameraGeometry.px_to_mm` defines it.

    x = a*du - b*dv + cx, y = b*du + a*dv + cy with (du, dv) the pixel offset from the image centre,
    a = s*cos(rot), b = s*sin(rot): linear in (a, b, cx, cy), so one lstsq solves it exactly.
    """
    du = uv[:, 0] - (cam.width - 1) / 2
    dv = uv[:, 1] - (cam.height - 1) / 2
    n = len(uv)
    design = np.zeros((2 * n, 4))
    design[:n] = np.column_stack([du, -dv, np.ones(n), np.zeros(n)])
    design[n:] = np.column_stack([dv, du, np.zeros(n), np.ones(n)])
    obs = np.concatenate([xy[:, 0], xy[:, 1]])
    p, *_ = np.linalg.lstsq(design, obs, rcond=None)
    res = (design @ p - obs).reshape(2, n)
    dist = np.hypot(res[0], res[1])
    a, b, cx, cy = (float(v) for v in p)
    cov = float((res**2).sum()) / max(2 * n - 4, 1) * np.linalg.inv(design.T @ design)
    scale = math.hypot(a, b)
    j_scale = np.array([a, b]) / scale
    j_rot = np.array([-b, a]) / scale**2
    # a free affine fit tells a tilted (or mirrored) camera from a merely rotated one
    affine, *_ = np.linalg.lstsq(np.column_stack([du, dv, np.ones(n)]), xy, rcond=None)
    m = affine[:2].T  # [[dx/du, dx/dv], [dy/du, dy/dv]]
    if np.linalg.det(m) < 0:
        raise HwError(
            f"camera {cam.name}: its image is mirrored",
            "switch off the image flip (ReverseX/ReverseY) in the camera's settings",
        )
    return Fit(
        camera=cam.name,
        index=index,
        geometry=CameraGeometry(cam.width, cam.height, (cx, cy), scale, math.degrees(math.atan2(b, a))),
        sigma_centre_mm=(math.sqrt(cov[2, 2]), math.sqrt(cov[3, 3])),
        sigma_mm_per_px=math.sqrt(j_scale @ cov[:2, :2] @ j_scale),
        sigma_rotation_deg=math.degrees(math.sqrt(j_rot @ cov[:2, :2] @ j_rot)),
        rms_mm=float(np.sqrt((dist**2).mean())),
        max_mm=float(dist.max()),
        corners=n,
        aspect=float(np.linalg.norm(m[:, 0]) / np.linalg.norm(m[:, 1])),
    )


def check_orientation(fits: list[Fit]) -> None:
    rots = [f.geometry.rotation_deg for f in fits]
    if all(abs(r) > 90 for r in rots):
        raise HwError(
            f"every camera finds the target turned by about {rots[0]:.0f} deg",
            "lay it with the grey strip upstream (towards the feeder) and its pattern's left edge at the left guide",
        )
    for f in fits:
        if abs(f.geometry.rotation_deg) > MAX_TILT_DEG:
            raise HwError(
                f"camera {f.camera} is turned by {f.geometry.rotation_deg:.1f} deg on the belt",
                "mount it so that image rows run along the belt (downstream = down in the image)",
            )
        if abs(f.aspect - 1) > MAX_ASPECT_ERR:
            console.print(
                f"[yellow]camera {f.camera}: across and along scales differ by {abs(f.aspect - 1):.1%}: it looks at "
                "the belt at a slant; level it, the mapping assumes a camera looking straight down[/]"
            )


# --- neighbours ---
@dataclass(frozen=True)
class Overlap:
    left: str
    right: str
    width_mm: float  # across the belt; negative: a gap no camera sees
    shared: int  # corners both cameras see
    mean_mm: float | None  # how far apart the two cameras put the same corners
    max_mm: float | None


def overlaps(fits: list[Fit], corners: dict[str, dict[int, np.ndarray]]) -> list[Overlap]:
    order = sorted(fits, key=lambda f: f.geometry.centre_mm[0])
    out = []
    for a, b in itertools.pairwise(order):
        width = a.geometry.field_mm()[1] - b.geometry.field_mm()[0]
        ids = sorted(set(corners[a.camera]) & set(corners[b.camera]))
        mean = mx = None
        if ids:
            ua = np.array([corners[a.camera][i] for i in ids])
            ub = np.array([corners[b.camera][i] for i in ids])
            xa, ya = a.geometry.px_to_mm(ua[:, 0], ua[:, 1])
            xb, yb = b.geometry.px_to_mm(ub[:, 0], ub[:, 1])
            d = np.hypot(xa - xb, ya - yb)
            mean, mx = float(d.mean()), float(d.max())
        out.append(Overlap(a.camera, b.camera, float(width), len(ids), mean, mx))
    return out


# --- white balance ---
def grey_gains(g: Grabbed, fit: Fit, spec: ChArUcoTarget, x_mm: float, y_mm: float) -> dict[str, Any] | None:
    """Mean BGR of the target's grey strip as this camera sees it, and the gains that would make it neutral."""
    x0, x1, y0, y1 = spec.grey_strip_mm
    inset = 2.0  # stay clear of the strip's blurred edges
    xs, ys = np.meshgrid(np.arange(x0 + inset, x1 - inset, 1.0), np.arange(y0 + inset, y1 - inset + 1e-9, 1.0))
    bx = x_mm + xs.ravel()
    by = y_mm - spec.pattern_mm[1] / 2 + ys.ravel()
    u, v = fit.geometry.mm_to_px(bx, by)
    inside = (u >= 3) & (u <= g.camera.width - 4) & (v >= 3) & (v <= g.camera.height - 4)
    if inside.sum() < 50:
        return None
    cols, rows = np.round(u[inside]).astype(int), np.round(v[inside]).astype(int)
    bgr = np.mean([f.image[rows, cols].astype(np.float64).mean(axis=0) for f in g.frames], axis=0)
    gains = bgr[1] / bgr  # normalised to green, as cameras set their white balance
    return {"mean_bgr": [round(float(c), 1) for c in bgr], "gains_bgr": [round(float(k), 3) for k in gains]}


# --- report ---
def _table(fits: list[Fit]) -> Table:
    t = Table(title="camera mapping (pixel -> belt mm)")
    for col in ("camera", "centre mm", "mm/px", "rotation deg", "corners", "error mm rms/max"):
        t.add_column(col, justify="left" if col == "camera" else "right")
    for f in fits:
        g = f.geometry
        t.add_row(
            f.camera,
            f"{g.centre_mm[0]:.2f}, {g.centre_mm[1]:.2f}",
            f"{g.mm_per_px:.5f}",
            f"{g.rotation_deg:.3f}",
            str(f.corners),
            f"{f.rms_mm:.3f} / {f.max_mm:.3f}",
        )
    return t


CONFIG = config_option("the line config whose camera mappings to calibrate")
YES = yes_option()
SQUARE = typer.Option(15.0, "--square-mm", help="the printed pattern's square size (measure it on the print)")
MARKER = typer.Option(11.0, "--marker-mm", help="the printed markers' size")
SQUARES_X = typer.Option(38, "--squares-x", help="squares across the belt")
SQUARES_Y = typer.Option(7, "--squares-y", help="squares along the belt")
DICTIONARY = typer.Option("DICT_4X4_250", "--dictionary", help="the ArUco dictionary the target was printed with")
TARGET_X = typer.Option(
    None,
    "--target-x-mm",
    help="belt x of the pattern's left edge (default: the plate's margin, 15 mm: the plate against the left guide)",
)
TARGET_Y = typer.Option(0.0, "--target-y-mm", help="belt y of the pattern's centre line (its ticks)")
SECONDS = typer.Option(1.5, "--seconds", min=0.2, help="how long to look at the target")
FRAMES = typer.Option(6, "--frames", min=1, help="frames per camera to average the corners over")
MAX_RESIDUAL = typer.Option(0.3, "--max-residual-mm", help="write nothing if a camera's rms residual exceeds this")
MAKE_TARGET = typer.Option(None, "--make-target", help="write the printable target to this PNG and exit")
PX_PER_MM = typer.Option(10.0, "--px-per-mm", help="resolution of --make-target (10 px/mm = 254 dpi)")


def main(
    config: Path = CONFIG,
    yes: bool = YES,
    square_mm: float = SQUARE,
    marker_mm: float = MARKER,
    squares_x: int = SQUARES_X,
    squares_y: int = SQUARES_Y,
    dictionary: str = DICTIONARY,
    target_x_mm: float | None = TARGET_X,
    target_y_mm: float = TARGET_Y,
    seconds: float = SECONDS,
    frames: int = FRAMES,
    max_residual_mm: float = MAX_RESIDUAL,
    make_target: Path | None = MAKE_TARGET,
    px_per_mm: float = PX_PER_MM,
) -> None:
    """Calibrate every camera's pixel -> belt-mm mapping (centre, mm/px, rotation) with a ChArUco target.

    Print: `--make-target target.png` writes the target (default: a 600 x 127.5 mm plate, a
    ChArUco pattern of 38 x 7 squares of 15 mm with 11 mm DICT_4X4_250 markers, 15 mm white
    margins left and right, a 15 mm grey strip along its upstream edge, centre-line ticks at both
    ends). Print it at 100 % (10 px/mm = 254 dpi) on matte paper and glue it flat on a rigid plate
    (aluminium composite); measure a run of 10 squares and pass --square-mm if the printer scaled
    it. A photographic 18 % grey card glued on the strip makes the white-balance reading trustworthy.

    Lay it: belt stopped, the plate across the belt under every camera, its left edge against the
    left belt-edge guide (the pattern's left edge is then the plate's margin from the belt edge:
    --target-x-mm), the grey strip upstream (towards the feeder), the centre-line ticks on the
    cameras' centre-line mark (the line the valve-bank distances are measured from: --target-y-mm).
    Switch the cameras to free-run (trigger mode off) in their configuration tool, since an
    encoder-triggered camera sends nothing while the belt stands; switch them back afterwards.
    GenICam cameras need none of that: the script opens them free-running itself.

    Found per camera: centre (belt x, y of the image centre), mm per pixel and rotation, each with
    its fit uncertainty (the target's placement adds its own to centre and rotation), and the
    reprojection error in mm over every corner. Neighbouring cameras: how wide their overlap is and
    how far apart they put the corners both see. Grey strip: per-channel white-balance gains,
    reported only (the line has no white-balance setting: set it in the camera if a gain is off 1
    by more than ~5 %). Lens distortion is not modelled (the product maps pixels by scale, rotation
    and offset; the simulator's cameras have none): a max error well above the rms points at
    distortion or a slanted camera. Writes each camera's mapping in the config (diff shown; confirm,
    or --yes); nothing is written if a camera's rms error exceeds --max-residual-mm.

    Latency: a GenICam camera placed by time (`position: timestamp` or `arrival`) is then triggered 40
    times by software and its trigger -> stamp latency (median) written as `cameras[].latency_ms`, with
    its spread reported (set `timing_jitter_ms` from it: docs/cameras.md). Cameras placed by count need
    none.
    """
    setup_logging("error")
    with script_errors():
        try:
            spec = ChArUcoTarget(squares_x, squares_y, square_mm, marker_mm, dictionary)
            spec.board()
        except (ValueError, AttributeError, cv2.error) as exc:
            raise HwError(
                f"bad target layout: {exc}", "check --squares-x/-y, --square-mm, --marker-mm, --dictionary"
            ) from None
        if make_target is not None:
            if not cv2.imwrite(str(make_target), spec.image(px_per_mm)):
                raise HwError(f"cannot write {make_target}", "pass a writable .png path")
            console.print(f"wrote {make_target}: {spec.describe()}; print at {px_per_mm * 25.4:.0f} dpi, 100 %")
            return
        cfg = load(config)
        x_mm = spec.margin_mm if target_x_mm is None else target_x_mm
        console.print(f"target: {spec.describe()}")
        prompt(
            "stop the belt; lay the target across it under every camera: left edge against the left guide, "
            "grey strip upstream, centre-line ticks on the cameras' centre-line mark; switch the cameras that are "
            "not GenICam to free-run (trigger off): the script sets GenICam cameras itself",
            yes,
        )
        # GenICam cameras are switched to free-run here (and left in their configured trigger by the line)
        grabbed = asyncio.run(grab(free_run(cfg), seconds, keep=frames, what="looking at the target"))
        corners = {g.camera.name: find_corners(g, spec) for g in grabbed}
        fits = []
        for g in grabbed:
            ids = list(corners[g.camera.name])
            uv = np.array([corners[g.camera.name][i] for i in ids])
            fits.append(fit_mapping(g.camera, g.index, uv, belt_xy(spec, ids, x_mm, target_y_mm)))
        check_orientation(fits)
        ov = overlaps(fits, corners)
        grey = {g.camera.name: grey_gains(g, f, spec, x_mm, target_y_mm) for g, f in zip(grabbed, fits, strict=True)}
        _report(fits, ov, grey)
        Console(highlight=False).print(_table(fits))
        bad = [f for f in fits if f.rms_mm > max_residual_mm]
        bad_ov = [o for o in ov if o.max_mm is not None and o.max_mm > 2 * max_residual_mm]
        console.print("[bold cyan]>[/] switch the cameras back to encoder trigger for production")
        if bad or bad_ov:
            for f in bad:
                console.print(f"[red]{f.camera}: rms error {f.rms_mm:.3f} mm > {max_residual_mm:g} mm[/]")
            for o in bad_ov:
                console.print(f"[red]{o.left}/{o.right} disagree by up to {o.max_mm:.3f} mm where they overlap[/]")
            console.print("[yellow]nothing written: is the target flat and still, the lens free of distortion?[/]")
            raise typer.Exit(1)
        changes = []
        for f in fits:
            geom = f.geometry
            key = f"cameras[{f.index}].mapping"
            changes += [
                Change(f"{key}.centre_mm", [round(geom.centre_mm[0], 3), round(geom.centre_mm[1], 3)]),
                Change(f"{key}.mm_per_px", round(geom.mm_per_px, 7)),
                Change(f"{key}.rotation_deg", round(geom.rotation_deg, 4)),
            ]
        latencies = camera_latencies(cfg)
        for i, lat in latencies.items():
            changes.append(Change(f"cameras[{i}].latency_ms", lat["median_ms"]))
        write_changes(
            config,
            changes,
            script="calibrate_camera",
            yes=yes,
            residuals={
                **{f.camera: {"rms_mm": round(f.rms_mm, 4), "max_mm": round(f.max_mm, 4)} for f in fits},
                "overlaps": [asdict(o) for o in ov],
            },
            measured={
                "target": asdict(spec) | {"x_mm": x_mm, "y_mm": target_y_mm},
                **{f.camera: _measured(f) | {"grey": grey[f.camera]} for f in fits},
                "latency": {cfg.cameras[i].name: lat for i, lat in latencies.items()},
            },
        )


def camera_latencies(cfg: LineConfig) -> dict[int, dict[str, Any]]:
    """Trigger -> stamp latency of each GenICam camera placed by time (position `timestamp` or `arrival`), by
    software triggers: camera index -> the measurement of its method (median_ms is written as latency_ms).

    Cameras placed by count (`chunk`, `trigger`) need none; OpenCV sources cannot be triggered from the PC, so
    their latency stays as configured (docs/cameras.md)."""
    timed = [(i, src) for i, _, src in genicam_cameras(cfg) if src.position in ("timestamp", "arrival")]
    if not timed:
        return {}
    try:
        from sorter.drivers.cameras.genicam import GenICamError, measure_latency
    except ImportError as exc:
        raise HwError(f"cannot measure the GenICam cameras' latency: {exc}", "`make genicam`") from None
    out: dict[int, dict[str, Any]] = {}
    for i, src in timed:
        try:
            m = measure_latency(src.device, 40)
        except GenICamError as exc:
            raise HwError(str(exc), "is the camera free (the line service stopped)?") from None
        got = m[src.position]
        out[i] = got | {"trigger_command_ms": m["trigger_command_ms"], "method": src.position}
        console.print(
            f"{cfg.cameras[i].name}: trigger -> {src.position} latency {got['median_ms']:.2f} ms "
            f"(±{got['jitter_ms']:.2f} ms; the trigger command itself {m['trigger_command_ms']:.2f} ms)"
        )
    return out


def _measured(f: Fit) -> dict[str, Any]:
    g = f.geometry
    return {
        "centre_mm": [g.centre_mm[0], g.centre_mm[1]],
        "sigma_centre_mm": list(f.sigma_centre_mm),
        "mm_per_px": g.mm_per_px,
        "sigma_mm_per_px": f.sigma_mm_per_px,
        "rotation_deg": g.rotation_deg,
        "sigma_rotation_deg": f.sigma_rotation_deg,
        "corners": f.corners,
        "aspect": f.aspect,
    }


def _report(fits: list[Fit], ov: list[Overlap], grey: dict[str, dict[str, Any] | None]) -> None:
    for f in fits:
        g = f.geometry
        console.print(f"[bold]{f.camera}[/] ({f.corners} corners)")
        show_measurement("centre x", g.centre_mm[0], f.sigma_centre_mm[0], "mm", digits=5)
        show_measurement("centre y", g.centre_mm[1], f.sigma_centre_mm[1], "mm", digits=3)
        show_measurement("scale", g.mm_per_px, f.sigma_mm_per_px, "mm/px", digits=6)
        show_measurement("rotation", g.rotation_deg, f.sigma_rotation_deg, "deg", digits=3)
        show_measurement("reprojection error rms", f.rms_mm, None, "mm", digits=2)
        show_measurement("reprojection error max", f.max_mm, None, "mm", digits=2)
        wb = grey[f.camera]
        if wb is None:
            console.print("  white balance: the grey strip is not in view")
        else:
            b, gr, r = wb["gains_bgr"]
            console.print(
                f"  white balance (grey strip at BGR {wb['mean_bgr']}): gains B {b:.3f} G {gr:.3f} R {r:.3f} "
                "(reported only: set them in the camera if one is off 1 by more than ~5 %)"
            )
    for o in ov:
        what = f"overlap {o.width_mm:.1f} mm" if o.width_mm > 0 else f"[red]GAP of {-o.width_mm:.1f} mm: unseen belt[/]"
        agree = (
            f"{o.shared} shared corners agree within {o.mean_mm:.3f} mm (max {o.max_mm:.3f} mm)"
            if o.mean_mm is not None and o.max_mm is not None
            else "[yellow]no corner seen by both: their agreement cannot be checked[/]"
        )
        console.print(f"{o.left} / {o.right}: {what}; {agree}")


if __name__ == "__main__":
    run_app(main)
