"""How pieces look: per-class appearance sprites, and whole camera frames.

A sprite is rendered once per piece (a few ms) and then only blended into
frames, because two cameras at 60 fps run in real time beside the service:
a frame is a copy of a precomputed noisy belt plus a few small blends.

Appearance follows the domain notes, and the look-alikes are deliberately
close: Ni-plated NdFeB, machined steel and aluminium are all light grey
metals (told apart by warmth, gloss, machining marks, brushing and shape);
epoxy NdFeB and ferrite are both dark (gloss and smoothness against matte
grain). Every body is kept above the segmenter's threshold (max channel >= 48).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from sim.feed import SimPiece
from sorter.core.geometry import CameraGeometry

BODY_FLOOR = 48.0  # the darkest a body pixel may be (max channel): the segmenter cuts at 34
_PAD_PX = 3
BELT_LEVEL = 18.0


@dataclass(frozen=True, eq=False)
class Sprite:
    """A piece's image in belt axes: BGR, coverage alpha, and where its area centroid is (px)."""

    bgr: np.ndarray  # H x W x 3 uint8
    alpha: np.ndarray  # H x W uint8, antialiased coverage
    cx: float  # centroid column, pixel centres at integer coordinates
    cy: float
    mm_per_px: float
    # blending terms, precomputed once: each camera shows a piece in ~5 frames at 2.5 m/s and 60 fps
    _a: np.ndarray = field(init=False, repr=False)
    _premul: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        a = self.alpha.astype(np.float32)[..., None] / 255.0
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_premul", self.bgr.astype(np.float32) * a)


# --- texture helpers (float32 images, local millimetre coordinates) ---


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale_px: float) -> np.ndarray:
    """Unit-variance noise with features about `scale_px` pixels across."""
    scale_px = max(scale_px, 1.0)
    gh, gw = int(h / scale_px) + 3, int(w / scale_px) + 3
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(g, (int(gw * scale_px), int(gh * scale_px)), interpolation=cv2.INTER_CUBIC)
    out = big[:h, :w]
    sd = float(out.std())
    return (out - out.mean()) / (sd if sd > 1e-6 else 1.0)


def _streaks(rng: np.random.Generator, coord: np.ndarray, period_mm: float) -> np.ndarray:
    """Unit noise that varies only along `coord` (mm): brushing, machining and turning marks."""
    lo, hi = float(coord.min()), float(coord.max())
    n = max(int((hi - lo) / period_mm) + 4, 4)
    grid = np.linspace(lo - period_mm, hi + period_mm, n)
    vals = rng.standard_normal(n)
    return np.interp(coord, grid, vals).astype(np.float32)


def _rust(
    rng: np.random.Generator,
    h: int,
    w: int,
    mm_per_px: float,
    coverage: float,
    scale_mm: tuple[float, float] = (1.0, 3.0),
) -> np.ndarray:
    """Soft 0..1 mask of rust patches `scale_mm` across, covering about `coverage` of the sprite."""
    n = _smooth_noise(rng, h, w, rng.uniform(*scale_mm) / mm_per_px) + 0.35 * _smooth_noise(rng, h, w, 0.4 / mm_per_px)
    t = float(np.quantile(n, 1.0 - coverage))
    return np.clip((n - t) / 0.35, 0.0, 1.0)


def _band(coord: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-(((coord - centre) / max(width, 1e-3)) ** 2)).astype(np.float32)


def _tone(
    base: tuple[float, float, float], rng: np.random.Generator, bright: tuple[float, float], tint: float = 0.04
) -> np.ndarray:
    """A per-piece colour: base BGR scaled by a brightness and a small per-channel tint."""
    return np.array(base, np.float32) * rng.uniform(*bright) * rng.uniform(1 - tint, 1 + tint, 3).astype(np.float32)


def _hsv_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(150, 255), rng.uniform(130, 235)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


@dataclass
class _Canvas:
    """Per-pixel coordinates of a sprite in the piece's local frame (mm, centroid at 0)."""

    lx: np.ndarray
    ly: np.ndarray
    edge_mm: np.ndarray  # distance to the outline
    mm_per_px: float
    piece: SimPiece

    @property
    def shape(self) -> tuple[int, int]:
        return self.lx.shape  # type: ignore[return-value]

    def radial(self) -> np.ndarray:
        lc = self.piece.local
        return np.hypot(self.lx - lc.get("x_centre", 0.0), self.ly - lc.get("y_centre", 0.0))

    def gloss_coord(self, rng: np.random.Generator) -> np.ndarray:
        """The coordinate a highlight runs across: curvature for arcs/cylinders, else a random direction."""
        if self.piece.shape == "arc":
            return self.radial()
        if self.piece.shape in ("block", "cylinder", "wire", "screw"):
            return self.ly
        a = rng.uniform(0, np.pi)
        return self.lx * math.cos(a) + self.ly * math.sin(a)

    def cylinder_shade(self) -> np.ndarray:
        """Brightness across a lying cylinder (axis along local x)."""
        half = self.piece.local.get("w", 1.0) / 2
        t = np.clip(np.abs(self.ly) / max(half, 1e-3), 0, 1)
        return (0.55 + 0.45 * np.sqrt(1 - t**2)).astype(np.float32)


def _metal(
    c: _Canvas, rng: np.random.Generator, colour: np.ndarray, gloss: float, marks: float, mark_period: float, env: float
) -> np.ndarray:
    """A metallic surface: environment reflections, machining/brushing marks, a highlight, bright chamfers."""
    h, w = c.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = colour
    shade = 1.0 + env * _smooth_noise(rng, h, w, rng.uniform(3, 8) / c.mm_per_px)
    if marks:
        ang = rng.uniform(0, np.pi)
        shade += marks * _streaks(rng, c.lx * math.cos(ang) + c.ly * math.sin(ang), mark_period)
    if c.piece.shape in ("cylinder", "wire"):
        shade *= c.cylinder_shade()
    img *= shade[..., None]
    g = c.gloss_coord(rng)
    centre = rng.uniform(float(np.quantile(g, 0.2)), float(np.quantile(g, 0.8)))
    img += (gloss * _band(g, centre, rng.uniform(0.12, 0.3) * c.piece.size_mm))[..., None]
    img += (0.25 * gloss * (c.edge_mm < 0.5))[..., None].astype(np.float32)  # chamfers catch the light
    return img


def _grain(c: _Canvas, rng: np.random.Generator, colour: np.ndarray, fine: float, coarse: float) -> np.ndarray:
    """A matte sintered/ceramic surface: fine grain plus blotches, no highlight."""
    h, w = c.shape
    shade = (
        1.0
        + coarse * _smooth_noise(rng, h, w, rng.uniform(2, 5) / c.mm_per_px)
        + fine * _smooth_noise(rng, h, w, rng.uniform(0.25, 0.5) / c.mm_per_px)
        + 0.6 * fine * rng.standard_normal((h, w)).astype(np.float32)
    )
    if c.piece.shape == "cylinder":
        shade *= c.cylinder_shade()
    return colour[None, None, :] * shade[..., None]


def _add_rust(
    img: np.ndarray, c: _Canvas, rng: np.random.Generator, coverage: float, scale_mm: tuple[float, float] = (1.0, 3.0)
) -> np.ndarray:
    h, w = c.shape
    m = _rust(rng, h, w, c.mm_per_px, coverage, scale_mm)[..., None]
    rust = _tone((38, 68, 128), rng, (0.7, 1.25), 0.08)
    tex = rust[None, None, :] * (1 + 0.18 * _smooth_noise(rng, h, w, 0.4 / c.mm_per_px))[..., None]
    return img * (1 - m) + tex * m


def _ndfeb(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    match c.piece.variant:
        case "ni":
            # nickel is a warm silver: red above blue, unlike cold steel and neutral aluminium
            return _metal(c, rng, _tone((160, 174, 190), rng, (0.85, 1.05), 0.03), rng.uniform(40, 75), 0.0, 1.0, 0.05)
        case "zn":
            img = _metal(c, rng, _tone((172, 158, 144), rng, (0.8, 1.05), 0.04), rng.uniform(15, 35), 0.0, 1.0, 0.08)
            h, w = c.shape
            hue = 3.0 * _smooth_noise(rng, h, w, 4 / c.mm_per_px)  # the iridescent patchiness of passivated zinc
            img[..., 0] += hue
            img[..., 2] -= hue
            return img
        case "epoxy":
            h, w = c.shape
            img = np.empty((h, w, 3), np.float32)
            img[:] = _tone((52, 53, 56), rng, (0.92, 1.15), 0.05)
            img *= (1 + 0.03 * _smooth_noise(rng, h, w, 3 / c.mm_per_px))[..., None]
            g = c.gloss_coord(rng)
            lo, hi = float(np.quantile(g, 0.15)), float(np.quantile(g, 0.85))
            # reflections widen with the piece (flatter curvature), so large pieces keep a visible
            # gloss after the crop is shrunk
            size = c.piece.size_mm
            stripe = rng.uniform(0.4, 1.2) + 0.015 * size
            img += (rng.uniform(90, 170) * _band(g, rng.uniform(lo, hi), stripe))[..., None]
            img += (rng.uniform(15, 35) * _band(g, rng.uniform(lo, hi), rng.uniform(1.5, 4) + 0.05 * size))[..., None]
            img += (25.0 * (c.edge_mm < max(0.35, 0.015 * size)))[..., None].astype(np.float32)
            return img
        case _:  # bare / corroded: dark sintered grain that glitters, pitted with small rust spots
            img = _grain(c, rng, _tone((100, 102, 106), rng, (0.75, 1.0), 0.03), 0.08, 0.05)
            h, w = c.shape
            glitter = (rng.random((h, w)) < rng.uniform(0.03, 0.06)) * rng.uniform(30, 70)
            img += glitter.astype(np.float32)[..., None]
            return _add_rust(img, c, rng, rng.uniform(0.1, 0.3), scale_mm=(0.3, 0.8))


def _ferrite(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    img = _grain(c, rng, _tone((70, 70, 73), rng, (0.9, 1.2), 0.04), 0.09, 0.06)
    img *= (0.85 + 0.15 * np.clip(c.edge_mm / 0.6, 0, 1))[..., None]  # rough edges scatter light away
    if c.piece.variant == "dusty":
        h, w = c.shape
        dust = np.clip(_smooth_noise(rng, h, w, rng.uniform(1, 3) / c.mm_per_px) - rng.uniform(0.0, 0.8), 0, 1)
        img += (rng.uniform(10, 25) * dust)[..., None]
    return img


def _smco(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    base = (112, 117, 124) if c.piece.variant == "grey" else (96, 108, 128)  # never the cold tint of steel
    return _grain(c, rng, _tone(base, rng, (0.9, 1.15), 0.04), 0.035, 0.04)


def _steel(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    p = c.piece
    colour = _tone((138, 136, 132), rng, (0.62, 0.92), 0.03)  # cold grey, duller than plating
    if p.shape == "screw":
        img = _metal(c, rng, colour, rng.uniform(25, 50), 0.0, 1.0, 0.06)
        shank = (c.lx >= p.local["x_shank"]).astype(np.float32)
        pitch = rng.uniform(0.7, 1.5)
        thread = 0.35 * np.sin(2 * np.pi * (c.lx - rng.uniform(0, pitch)) / pitch)
        shade = 1 + shank * (thread - 0.3 * (1 - c.cylinder_shade()))
        slot = ((c.lx < p.local["x_shank"]) & (np.abs(c.ly) < rng.uniform(0.3, 0.5))).astype(np.float32)
        img *= (shade * (1 - 0.5 * slot))[..., None]
    elif p.shape == "washer":
        img = _metal(c, rng, colour, rng.uniform(25, 50), 0.0, 1.0, 0.05)
        img *= (1 + 0.15 * _streaks(rng, c.radial(), rng.uniform(0.4, 0.9)))[..., None]  # turning marks
    else:
        img = _metal(c, rng, colour, rng.uniform(25, 50), 0.15, rng.uniform(0.4, 1.0), 0.06)
    if p.variant == "rusty":
        coverage = rng.uniform(0.4, 0.85)
    else:
        coverage = rng.uniform(0.03, 0.25) if rng.random() < 0.45 else 0.0
    return _add_rust(img, c, rng, coverage, scale_mm=(2.0, 4.0)) if coverage else img


def _other(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    h, w = c.shape
    match c.piece.variant:
        case "copper":
            img = _metal(c, rng, _tone((72, 118, 196), rng, (0.8, 1.1), 0.05), rng.uniform(30, 60), 0.04, 0.5, 0.08)
            tarnish = _rust(rng, h, w, c.mm_per_px, rng.uniform(0.0, 0.3) + 1e-3)[..., None]
            return img * (1 - 0.45 * tarnish)
        case "brass":
            return _metal(c, rng, _tone((78, 168, 204), rng, (0.8, 1.1), 0.05), rng.uniform(30, 60), 0.04, 0.5, 0.07)
        case "aluminium":
            # satin: bright, neutral, little gloss, brushed in one direction
            return _metal(
                c,
                rng,
                _tone((188, 188, 186), rng, (0.85, 1.05), 0.02),
                rng.uniform(8, 22),
                0.1,
                rng.uniform(0.3, 0.8),
                0.03,
            )
        case "plastic":
            img = np.empty((h, w, 3), np.float32)
            img[:] = _hsv_colour(rng)
            img *= (1 + 0.04 * _smooth_noise(rng, h, w, 3 / c.mm_per_px))[..., None]
            g = c.gloss_coord(rng)
            img += (rng.uniform(10, 40) * _band(g, rng.uniform(g.min(), g.max()), rng.uniform(1, 4)))[..., None]
            return img
        case _:  # pcb
            return _pcb(c, rng)


def _pcb(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    h, w = c.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = _tone((48, 118, 36), rng, (0.8, 1.2), 0.08)
    px = 1.0 / c.mm_per_px
    layer = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 12))):  # traces run at multiples of 45 degrees, as routed
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        ang = math.radians(45 * int(rng.integers(0, 8)))
        length = rng.uniform(3, 15) * px
        x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
        cv2.line(layer, (int(x0), int(y0)), (int(x1), int(y1)), 255, max(1, int(rng.uniform(0.3, 0.7) * px)))
        cv2.circle(layer, (int(x1), int(y1)), max(2, int(0.6 * px)), 255, -1)
    img += (layer[..., None] / 255.0) * np.array([25, 45, 25], np.float32)
    for _ in range(int(rng.integers(0, 3))):  # a black chip here and there
        cw, ch = rng.uniform(3, 8) * px, rng.uniform(3, 8) * px
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + cw), int(y0 + ch)), (30, 30, 30), -1)
    return img


_APPEARANCE = {"ndfeb": _ndfeb, "ferrite": _ferrite, "smco": _smco, "steel": _steel, "other": _other}


def _coverage(polys: list[np.ndarray], w: int, h: int, rows_per_px: int = 8) -> np.ndarray:
    """Exact-area antialiasing across, `rows_per_px` scanlines per pixel along (even-odd rule).

    Polygons are in sprite pixels with pixel centres at integer coordinates. OpenCV's
    fillPoly would do, except that it fills boundary pixels inclusively, which grows
    every piece by half a (sub)pixel and biases area and extents.
    """
    ys = (np.arange(h * rows_per_px) + 0.5) / rows_per_px - 0.5
    p = np.vstack(polys)
    q = np.vstack([np.roll(poly, -1, axis=0) for poly in polys])
    x0, y0, x1, y1 = p[:, 0], p[:, 1], q[:, 0], q[:, 1]
    y = ys[:, None]
    crosses = ((y0 <= y) & (y < y1)) | ((y1 <= y) & (y < y0))
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, x0 + (y - y0) * (x1 - x0) / (y1 - y0), np.inf)
    xs.sort(axis=1)
    n = int(crosses.sum(axis=1).max(initial=0))
    xs = xs[:, : n + (n % 2)]
    a, b = xs[:, 0::2], xs[:, 1::2]
    unused = ~np.isfinite(b)
    a, b = np.where(unused, 0.0, a), np.where(unused, 0.0, b)
    bounds = np.arange(w + 1) - 0.5
    covered = (np.clip(bounds[None, None, :], a[..., None], b[..., None]) - a[..., None]).sum(axis=1)
    per_row = np.diff(covered, axis=1)
    return per_row.reshape(h, rows_per_px, w).mean(axis=1)


def _rasterise(piece: SimPiece, mm_per_px: float) -> tuple[np.ndarray, float, float]:
    """Antialiased coverage of the piece's polygons, and its centroid in sprite pixels."""
    w = math.ceil((piece.dx1 - piece.dx0) / mm_per_px) + 2 * _PAD_PX
    h = math.ceil((piece.dy_lead - piece.dy_trail) / mm_per_px) + 2 * _PAD_PX
    cx, cy = _PAD_PX - piece.dx0 / mm_per_px, _PAD_PX - piece.dy_trail / mm_per_px
    polys = [
        np.column_stack([cx + poly[:, 0] / mm_per_px, cy + poly[:, 1] / mm_per_px])
        for poly in (piece.outline, *piece.holes)
    ]
    alpha = np.clip(_coverage(polys, w, h) * 255 + 0.5, 0, 255).astype(np.uint8)
    return alpha, cx, cy


def render_sprite(piece: SimPiece, mm_per_px: float, rng: np.random.Generator | None = None) -> Sprite:
    """Render one piece (in belt axes) at `mm_per_px`; `rng` defaults to one seeded by `piece.seed`."""
    rng = rng if rng is not None else np.random.default_rng(piece.seed)
    alpha, cx, cy = _rasterise(piece, mm_per_px)
    h, w = alpha.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    bx, by = (u - cx) * mm_per_px, (v - cy) * mm_per_px
    ca, sa = math.cos(math.radians(piece.angle_deg)), math.sin(math.radians(piece.angle_deg))
    inside = (alpha >= 128).astype(np.uint8)
    edge = cv2.distanceTransform(cv2.copyMakeBorder(inside, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), cv2.DIST_L2, 3)[
        1:-1, 1:-1
    ]
    canvas = _Canvas(
        lx=ca * bx + sa * by, ly=-sa * bx + ca * by, edge_mm=edge * mm_per_px, mm_per_px=mm_per_px, piece=piece
    )
    img = _APPEARANCE[piece.cls](canvas, rng)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)  # optics: no real lens resolves single-pixel texture
    peak = img.max(axis=2, keepdims=True)
    img *= np.maximum(BODY_FLOOR / np.maximum(peak, 1.0), 1.0)  # lift too-dark pixels, keeping their hue
    bgr = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return Sprite(bgr=bgr, alpha=alpha, cx=float(cx), cy=float(cy), mm_per_px=mm_per_px)


# --- frames ---


def belt_bank(height: int, width: int, noise_sigma: float, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Noisy frames of empty dark belt: a fixed rubber texture plus fresh sensor noise per frame."""
    texture = BELT_LEVEL + 2.0 * _smooth_noise(rng, height, width, 10.0) + 1.0 * _smooth_noise(rng, height, width, 1.5)
    bank = []
    for _ in range(n):
        noise = rng.standard_normal((height, width, 3), dtype=np.float32) * noise_sigma
        bank.append(np.clip(texture[..., None] + noise + 0.5, 0, 255).astype(np.uint8))
    return bank


class FrameRenderer:
    """Renders one camera's frames: belt background, sensor noise, and the pieces in view.

    The sprites must be rendered at this camera's mm/px without rotation; a
    camera with a rotation or another scale gets each sprite warped once and cached.
    """

    def __init__(self, geom: CameraGeometry, noise_sigma: float, seed: int, bank_size: int = 12) -> None:
        self.geom = geom
        self.noise_sigma = noise_sigma
        rng = np.random.default_rng(seed)
        self._rng = rng
        self._bank = belt_bank(geom.height, geom.width, noise_sigma, bank_size, rng)
        self._noise = rng.standard_normal((768, 768, 3), dtype=np.float32) * noise_sigma
        self._frame = 0
        self._warped: dict[int, tuple[Sprite, Sprite]] = {}
        # something lying flat on the belt under the pieces, e.g. a calibration target (sim/target.py);
        # called as underlay(out, belt_pos_mm, gain) from the camera's thread
        self.underlay: Callable[[np.ndarray, float, float], None] | None = None
        self.blur_px = 0.0  # a defocused lens: Gaussian blur of this sigma before the sensor's noise
        self._defocus_noise: np.ndarray | None = None

    def render(
        self, pieces: Iterable[tuple[SimPiece, Sprite]], belt_pos_mm: float, out: np.ndarray, gain: float = 1.0
    ) -> None:
        """Write the frame at belt position `belt_pos_mm` into `out` (H x W x 3 uint8), in place."""
        g = self.geom
        if out.shape != (g.height, g.width, 3) or out.dtype != np.uint8:
            raise ValueError(f"out must be {(g.height, g.width, 3)} uint8, got {out.shape} {out.dtype}")
        np.copyto(out, self._bank[self._frame % len(self._bank)])
        self._frame += 1
        if self.underlay is not None:
            self.underlay(out, belt_pos_mm, gain)
        for piece, sprite in pieces:
            self._blend(out, piece, self._oriented(sprite), belt_pos_mm, gain)
        if self.blur_px > 0:
            self._defocus(out)

    def _defocus(self, out: np.ndarray) -> None:
        """Blur the optical image, then lay fresh sensor noise on it (the sensor is not out of focus)."""
        if self._defocus_noise is None or self._defocus_noise.shape != out.shape:
            noise = self._rng.standard_normal(out.shape, dtype=np.float32) * self.noise_sigma
            self._defocus_noise = np.round(noise).astype(np.int16)
        # a box about as wide as a Gaussian of sigma blur_px (sigma = k / sqrt(12)), and ~2 ms a frame
        # whatever its size: two cameras at 60 fps leave no CPU for a true Gaussian or disc blur
        k = 2 * round(math.sqrt(3) * self.blur_px) + 1
        cv2.blur(out, (k, k), dst=out)
        cv2.add(out, self._defocus_noise, dst=out, dtype=cv2.CV_8U)  # saturating, in place

    def _blend(self, out: np.ndarray, piece: SimPiece, sp: Sprite, belt_pos_mm: float, gain: float) -> None:
        u, v = self.geom.mm_to_px(piece.x_mm, belt_pos_mm - piece.s_mm)
        h, w = sp.alpha.shape
        u0, v0 = round(float(u) - sp.cx), round(float(v) - sp.cy)
        a0, b0 = max(u0, 0), max(v0, 0)
        a1, b1 = min(u0 + w, out.shape[1]), min(v0 + h, out.shape[0])
        if a0 >= a1 or b0 >= b1:
            return
        ss = np.s_[b0 - v0 : b1 - v0, a0 - u0 : a1 - u0]
        region = out[b0:b1, a0:a1]
        a = sp._a[ss]
        blended = region * (1.0 - a) + sp._premul[ss] * np.float32(gain)
        if self.noise_sigma > 0:  # the sensor's noise lies on the pieces too
            nh, nw = self._noise.shape[:2]
            oy = int(self._rng.integers(0, max(nh - (b1 - b0), 1)))
            ox = int(self._rng.integers(0, max(nw - (a1 - a0), 1)))
            noise = self._noise[oy : oy + b1 - b0, ox : ox + a1 - a0]
            if noise.shape[:2] == blended.shape[:2]:
                blended += noise * a
        np.clip(blended + 0.5, 0, 255, out=blended)
        region[:] = blended.astype(np.uint8)

    def _oriented(self, sp: Sprite) -> Sprite:
        g = self.geom
        k = sp.mm_per_px / g.mm_per_px
        if abs(g.rotation_deg) < 1e-9 and abs(k - 1) < 1e-9:
            return sp
        hit = self._warped.get(id(sp))
        if hit is not None and hit[0] is sp:
            return hit[1]
        if len(self._warped) > 512:
            self._warped.clear()
        warped = warp_sprite(sp, g.rotation_deg, g.mm_per_px)
        self._warped[id(sp)] = (sp, warped)
        return warped


def warp_sprite(sp: Sprite, rotation_deg: float, mm_per_px: float) -> Sprite:
    """The sprite as seen by a camera rotated by `rotation_deg` at `mm_per_px` (see CameraGeometry.mm_to_px)."""
    k = sp.mm_per_px / mm_per_px
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    lin = np.array([[k * c, k * s], [-k * s, k * c]])
    h, w = sp.alpha.shape
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]]) - [sp.cx, sp.cy]
    t = corners @ lin.T
    ncx, ncy = -t[:, 0].min() + 1.5, -t[:, 1].min() + 1.5
    nw, nh = math.ceil(t[:, 0].max() + ncx + 1.5), math.ceil(t[:, 1].max() + ncy + 1.5)
    m = np.hstack([lin, (np.array([ncx, ncy]) - lin @ np.array([sp.cx, sp.cy]))[:, None]])
    bgr = cv2.warpAffine(sp.bgr, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(sp.alpha, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0)
    return Sprite(bgr=bgr, alpha=alpha, cx=float(ncx), cy=float(ncy), mm_per_px=mm_per_px)
