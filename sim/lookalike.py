"""A labelled dataset that deliberately does not look like the simulator's renders.

It exists to prove that `sorter model train` / `evaluate` work on data they were not
designed around (another plant's camera, belt, lighting and Hall bar), not to train the
line's model. Same five classes and the same ImageFolder layout with `sensors.csv`, but:

- 128 x 128 crops, the piece filling 40-80 % of the crop (the line's crops: 64 x 64,
  a 24 mm minimum field of view); so the absolute size cue is weaker,
- textured belts that are darker than the pieces but not black: dark green ribbed rubber,
  grey woven fabric, blue-black polyurethane with dust, each with its own brightness,
- directional light (azimuth and elevation per image, warm or cool white, intensity
  0.8-1.2, vignetting) with shading from a height map, specular highlights for glossy
  materials and a soft drop shadow on the belt; no mask: the belt is in the crop,
- shapes drawn with cv2 (rectangles, ellipses, rings, arc segments, shards, screws,
  washers, plates with holes, L-brackets, bent wires), supersampled,
- materials by class and variant: NdFeB Ni (warm bright silver, sharp highlight), Zn (dull
  bluish), black epoxy (black, white highlight), bare (grey grain, rust spots); ferrite
  (matte charcoal grain, chipped edges); SmCo (matte mid grey or brownish, small); steel
  (cold grey, machining marks, rust, threads); other (copper, brass, brushed aluminium,
  plastic, PCB); the look-alike pairs of the domain notes stay close,
- its own Hall bar: lift-off 3.5 mm, sensor pitch 10 mm, noise 1.2 mT, signed readings,
  its own remanence and demagnetisation shares, and 2 % of readings contaminated by a
  neighbouring magnet.

`write_lookalike(out, ...)` writes out/{train,val,test}/<class>/<n>.png, a sensors.csv per
split, a manifest.csv (variant, shape, size, field) and dataset.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sim.magnet import axial_field_mT
from sorter.config import CLASSES
from sorter.ml.dataset import SPLITS

SS = 4  # supersampling of the shape masks

VARIANTS: dict[str, dict[str, float]] = {
    "ndfeb": {"ni": 0.4, "zn": 0.2, "epoxy": 0.2, "bare": 0.2},
    "ferrite": {"matte": 0.6, "dusty": 0.4},
    "smco": {"grey": 0.6, "brown": 0.4},
    "steel": {"screw": 0.2, "washer": 0.2, "bracket": 0.15, "plate": 0.2, "rusty": 0.25},
    "other": {"copper": 0.25, "brass": 0.2, "aluminium": 0.25, "plastic": 0.15, "pcb": 0.15},
}
SHAPES: dict[str, dict[str, float]] = {
    "ndfeb": {"block": 0.35, "disc": 0.15, "ring": 0.1, "arc": 0.2, "shard": 0.2},
    "ferrite": {"arc": 0.35, "block": 0.3, "ring": 0.15, "shard": 0.2},
    "smco": {"cylinder": 0.4, "disc": 0.3, "block": 0.3},
    "steel": {},  # by variant
    "other": {},
}
STEEL_SHAPES = {
    "screw": {"screw": 1.0},
    "washer": {"washer": 1.0},
    "bracket": {"bracket": 1.0},
    "plate": {"plate": 1.0},
    "rusty": {"block": 0.5, "plate": 0.5},
}
OTHER_SHAPES = {
    "copper": {"wire": 0.5, "plate": 0.3, "shard": 0.2},
    "brass": {"screw": 0.3, "ring": 0.3, "plate": 0.4},
    "aluminium": {"plate": 0.4, "bracket": 0.3, "shard": 0.3},
    "plastic": {"shard": 0.5, "block": 0.3, "ring": 0.2},
    "pcb": {"plate": 1.0},
}
SIZE_MM = {
    "ndfeb": (8.0, 40.0),
    "ferrite": (12.0, 45.0),
    "smco": (5.0, 15.0),
    "steel": (6.0, 40.0),
    "other": (6.0, 40.0),
}

# the look-alike plant's Hall bar
LIFT_OFF_MM = 3.5
PITCH_MM = 10.0
NOISE_MT = 1.2
CONTAMINATED_SHARE = 0.02
REMANENCE_T = {"ndfeb": (1.10, 1.45), "smco": (0.85, 1.10), "ferrite": (0.20, 0.40)}
PARTIAL = {"ndfeb": (0.5, 1.0), "smco": (0.6, 1.0), "ferrite": (0.7, 1.0)}
DEMAGNETISED = {"ndfeb": 0.08, "smco": 0.04, "ferrite": 0.02}
STEEL_RESIDUAL_T = 0.02


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Unit-variance smooth noise with features about `scale` px across."""
    scale = max(scale, 1.0)
    g = rng.standard_normal((int(h / scale) + 3, int(w / scale) + 3)).astype(np.float32)
    big = cv2.resize(g, (int(g.shape[1] * scale), int(g.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return (big - big.mean()) / max(float(big.std()), 1e-6)


# --- shapes: masks (supersampled, then area-averaged) with a few shape parameters ---


def _rot_pts(pts: np.ndarray, ang: float, c: tuple[float, float]) -> np.ndarray:
    ca, sa = math.cos(ang), math.sin(ang)
    r = pts @ np.array([[ca, sa], [-sa, ca]])
    return r + np.asarray(c)


def _fill(canvas: np.ndarray, pts: np.ndarray, value: int = 255) -> None:
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], value, lineType=cv2.LINE_AA, shift=4)


def _shape_mask(rng: np.random.Generator, shape: str, size_px: float, n: int) -> tuple[np.ndarray, dict[str, float]]:
    """A float32 0..1 mask (n x n) of `shape`, longest side `size_px`, centred, random orientation."""
    big = np.zeros((n * SS, n * SS), np.uint8)
    s = size_px * SS
    c = (n * SS / 2 + rng.uniform(-0.04, 0.04) * n * SS, n * SS / 2 + rng.uniform(-0.04, 0.04) * n * SS)
    ang = rng.uniform(0, 2 * math.pi)
    info: dict[str, float] = {"angle": ang}
    match shape:
        case "block" | "plate" | "cylinder":
            w = s * rng.uniform(0.35, 1.0) if shape != "cylinder" else s * rng.uniform(0.3, 0.6)
            pts = np.array([[-s / 2, -w / 2], [s / 2, -w / 2], [s / 2, w / 2], [-s / 2, w / 2]])
            _fill(big, _rot_pts(pts, ang, c))
            info["w"] = w / SS
            if shape == "plate" and rng.random() < 0.7:
                for _ in range(int(rng.integers(1, 3))):
                    d = min(w, s) * rng.uniform(0.15, 0.25)
                    hx, hy = rng.uniform(-0.3, 0.3) * s, rng.uniform(-0.25, 0.25) * w
                    hc = _rot_pts(np.array([[hx, hy]]), ang, c)[0]
                    cv2.circle(big, (int(hc[0]), int(hc[1])), int(d / 2), 0, -1, cv2.LINE_AA)
        case "disc":
            ratio = rng.uniform(0.85, 1.0)  # a slightly tilted disc
            cv2.ellipse(
                big, (int(c[0]), int(c[1])), (int(s / 2), int(s / 2 * ratio)), math.degrees(ang), 0, 360, 255, -1
            )
        case "ring" | "washer":
            inner = rng.uniform(0.35, 0.6) if shape == "ring" else rng.uniform(0.4, 0.55)
            cv2.circle(big, (int(c[0]), int(c[1])), int(s / 2), 255, -1, cv2.LINE_AA)
            cv2.circle(big, (int(c[0]), int(c[1])), int(s / 2 * inner), 0, -1, cv2.LINE_AA)
            info["inner"] = inner
        case "arc":
            span = rng.uniform(50, 110)
            r_out = s / (2 * math.sin(math.radians(span) / 2))
            t = r_out * rng.uniform(0.2, 0.4)
            a = np.radians(np.linspace(-span / 2, span / 2, 40)) + ang
            outer = np.column_stack([np.cos(a), np.sin(a)]) * r_out
            inner_pts = np.column_stack([np.cos(a[::-1]), np.sin(a[::-1])]) * (r_out - t)
            pts = np.vstack([outer, inner_pts])
            pts -= pts.mean(axis=0)
            _fill(big, pts + np.asarray(c))
        case "shard":
            k = int(rng.integers(5, 10))
            a = np.sort(rng.uniform(0, 2 * math.pi, k))
            r = s / 2 * rng.uniform(0.55, 1.0, k)
            _fill(big, np.column_stack([np.cos(a) * r, np.sin(a) * r]) + np.asarray(c))
        case "screw":
            d = s * rng.uniform(0.16, 0.25)
            hw, hl = d * rng.uniform(1.6, 2.0), d * rng.uniform(0.5, 0.8)
            pts = np.array(
                [
                    [-s / 2, -hw / 2],
                    [-s / 2 + hl, -hw / 2],
                    [-s / 2 + hl, -d / 2],
                    [s / 2 - d * 0.5, -d / 2],
                    [s / 2, 0],
                    [s / 2 - d * 0.5, d / 2],
                    [-s / 2 + hl, d / 2],
                    [-s / 2 + hl, hw / 2],
                    [-s / 2, hw / 2],
                ]
            )
            _fill(big, _rot_pts(pts, ang, c))
            info.update(w=d / SS, head=hl / SS)
        case "bracket":
            w = s * rng.uniform(0.22, 0.35)
            arm = s * rng.uniform(0.6, 1.0)
            pts = np.array([[0, 0], [w, 0], [w, arm - w], [s, arm - w], [s, arm], [0, arm]]) - [s / 2, arm / 2]
            _fill(big, _rot_pts(pts, ang, c))
            info["w"] = w / SS
        case "wire":
            d = max(s * rng.uniform(0.08, 0.15), 2.5 * SS)
            k = int(rng.integers(2, 4))
            xs = np.linspace(-s / 2, s / 2, k + 1)
            ys = rng.uniform(-0.15, 0.15, k + 1) * s
            pts = _rot_pts(np.column_stack([xs, ys]), ang, c)
            cv2.polylines(big, [np.round(pts).astype(np.int32)], False, 255, int(d), cv2.LINE_AA)
            info["w"] = d / SS
        case _:
            raise ValueError(shape)
    mask = cv2.resize(big, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return mask, info


# --- materials ---


def _material(
    rng: np.random.Generator, cls: str, variant: str, shape: str, mask: np.ndarray, info: dict[str, float], px_mm: float
) -> dict[str, object]:
    """Albedo (BGR float 0..255 per pixel), specular strength, shininess, tinted specular, relief."""
    h, w = mask.shape
    ang = info["angle"]
    along = np.cos(ang) * np.arange(w)[None, :] + np.sin(ang) * np.arange(h)[:, None]
    across = -np.sin(ang) * np.arange(w)[None, :] + np.cos(ang) * np.arange(h)[:, None]

    def tone(bgr: tuple[float, float, float], jitter: float = 0.08, tint: float = 0.03) -> np.ndarray:
        return np.array(bgr, np.float32) * rng.uniform(1 - jitter, 1 + jitter) * rng.uniform(1 - tint, 1 + tint, 3)

    def flat(col: np.ndarray) -> np.ndarray:
        return np.broadcast_to(col, (h, w, 3)).astype(np.float32).copy()

    def grain(col: np.ndarray, amount: float) -> np.ndarray:
        g = 1 + amount * (0.6 * _noise(rng, h, w, 1.2) + 0.4 * _noise(rng, h, w, 6.0))
        return flat(col) * g[..., None]

    def rust(img: np.ndarray, cover: float, scale: float) -> np.ndarray:
        n = _noise(rng, h, w, scale) + 0.4 * _noise(rng, h, w, 1.5)
        m = np.clip((n - np.quantile(n, 1 - cover)) / 0.4, 0, 1)[..., None]
        r = tone((35, 65, 135), 0.15, 0.06)
        return img * (1 - m) + r * m

    def streaks(img: np.ndarray, coord: np.ndarray, amount: float, period: float) -> np.ndarray:
        grid = np.arange(coord.min() - 2 * period, coord.max() + 2 * period, period)
        s = np.interp(coord, grid, rng.standard_normal(grid.size)).astype(np.float32)
        return img * (1 + amount * s)[..., None]

    relief = 0.3  # how domed the top face looks: 0 flat with bevels, 1 a cylinder/dome
    spec, shin, metal = 0.1, 8.0, False
    match cls, variant:
        case "ndfeb", "ni":
            alb = flat(tone((170, 178, 192), 0.08)) * (1 + 0.12 * _noise(rng, h, w, 25))[..., None]
            spec, shin, metal = 1.0, 60.0, True
        case "ndfeb", "zn":
            alb = flat(tone((178, 164, 148), 0.08)) * (1 + 0.08 * _noise(rng, h, w, 18))[..., None]
            alb[..., 0] += 6 * _noise(rng, h, w, 12)
            spec, shin, metal = 0.45, 18.0, True
        case "ndfeb", "epoxy":
            alb = flat(tone((30, 30, 34), 0.12))
            spec, shin, metal = 1.3, 90.0, False
        case "ndfeb", _:  # bare, corroded
            alb = rust(grain(tone((96, 99, 104), 0.1), 0.12), rng.uniform(0.05, 0.25), 1.2)
            spec, shin, metal = 0.35, 25.0, True
        case "ferrite", _:
            alb = grain(tone((60, 60, 64), 0.12), 0.16)
            if variant == "dusty":
                dust = np.clip(_noise(rng, h, w, 5) - rng.uniform(0, 0.8), 0, 1)
                alb += (rng.uniform(15, 35) * dust)[..., None]
            spec, shin = 0.04, 5.0
        case "smco", _:
            base = (112, 116, 121) if variant == "grey" else (92, 106, 126)
            alb = grain(tone(base, 0.1), 0.07)
            spec, shin, metal = 0.2, 12.0, True
        case "steel", _:
            alb = flat(tone((140, 137, 132), 0.12))
            if shape == "screw":
                pitch = rng.uniform(1.0, 1.6) / px_mm
                thread = 0.3 * np.sin(2 * np.pi * along / max(pitch, 2.0))
                alb *= (1 + thread)[..., None]
            elif shape == "washer":
                r = np.hypot(*(np.indices((h, w)) - np.array([h / 2, w / 2])[:, None, None]))
                alb = streaks(alb, r, 0.12, 0.6 / px_mm)
            else:
                alb = streaks(alb, along, 0.1, rng.uniform(0.3, 0.9) / px_mm)
            cover = (
                rng.uniform(0.35, 0.8) if variant == "rusty" else (rng.uniform(0.02, 0.2) if rng.random() < 0.4 else 0)
            )
            if cover:
                alb = rust(alb, cover, 3.0)
            spec, shin, metal = 0.55, 25.0, True
        case "other", "copper":
            alb = flat(tone((70, 112, 196), 0.1)) * (1 - 0.3 * np.clip(_noise(rng, h, w, 6), 0, 1))[..., None]
            spec, shin, metal = 0.8, 35.0, True
        case "other", "brass":
            alb = flat(tone((72, 162, 200), 0.1))
            spec, shin, metal = 0.8, 35.0, True
        case "other", "aluminium":
            alb = streaks(flat(tone((186, 186, 184), 0.06)), across, 0.06, rng.uniform(0.2, 0.5) / px_mm)
            spec, shin, metal = 0.35, 10.0, True
        case "other", "plastic":
            hsv = np.array([[[rng.uniform(0, 180), rng.uniform(120, 255), rng.uniform(110, 230)]]], np.uint8)
            alb = flat(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32))
            spec, shin = 0.5, 30.0
        case "other", _:  # pcb
            alb = flat(tone((45, 115, 35), 0.15))
            layer = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(3, 10))):
                x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
                a = math.radians(45 * int(rng.integers(0, 8)))
                ln = rng.uniform(3, 12) / px_mm
                cv2.line(
                    layer,
                    (int(x0), int(y0)),
                    (int(x0 + ln * math.cos(a)), int(y0 + ln * math.sin(a))),
                    255,
                    max(1, int(0.4 / px_mm)),
                )
            alb += (layer[..., None] / 255.0) * np.array([30, 60, 60], np.float32)
            spec, shin = 0.3, 20.0
        case _:
            raise ValueError((cls, variant))
    if shape in ("cylinder", "wire", "screw", "disc", "arc") or (cls == "ndfeb" and variant == "epoxy"):
        relief = rng.uniform(0.5, 1.0)
    return {"albedo": alb, "spec": spec, "shininess": shin, "metal": metal, "relief": relief}


# --- belts and light ---


@dataclass(frozen=True)
class Style:
    """What varies from crop to crop ("mixed", the default) or is fixed for a whole plant ("plant")."""

    belt: str | None = None  # green_rubber, grey_fabric, blue_pu; None: any, per crop
    fov_mm: float | None = (
        None  # fixed field of view (mm across the crop): absolute size visible; None: piece fills 40-80 %
    )
    warmth: float | None = None  # -1 cool .. 1 warm; None: per crop
    intensity: tuple[float, float] = (0.8, 1.2)


STYLES = {
    "mixed": Style(),
    # one plant: one belt, one warm light, one camera scale (64 mm across 128 px: a 5 mm SmCo is 10 px)
    "plant": Style(belt="grey_fabric", fov_mm=64.0, warmth=0.6, intensity=(0.95, 1.05)),
}


def _belt(rng: np.random.Generator, n: int, kind: str | None = None) -> tuple[np.ndarray, str]:
    kind = kind or _pick(rng, {"green_rubber": 0.35, "grey_fabric": 0.35, "blue_pu": 0.3})
    level = rng.uniform(28, 55)
    yy, xx = np.indices((n, n)).astype(np.float32)
    match kind:
        case "green_rubber":
            col = np.array([0.75, 1.0, 0.7], np.float32)
            a = rng.uniform(0, math.pi)
            ribs = np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * math.pi / rng.uniform(6, 12))
            tex = 1 + 0.06 * ribs + 0.05 * _noise(rng, n, n, 2) + 0.05 * _noise(rng, n, n, 20)
        case "grey_fabric":
            col = np.array([1.0, 1.0, 1.02], np.float32)
            p = rng.uniform(3, 5)
            weave = np.sin(xx * 2 * math.pi / p) * np.sin(yy * 2 * math.pi / p)
            tex = 1 + 0.07 * weave + 0.06 * _noise(rng, n, n, 1.5) + 0.04 * _noise(rng, n, n, 15)
        case _:
            col = np.array([1.2, 0.95, 0.8], np.float32)
            tex = 1 + 0.04 * _noise(rng, n, n, 3) + 0.06 * _noise(rng, n, n, 25)
            specks = (rng.random((n, n)) < 0.004).astype(np.float32)
            tex += 1.5 * cv2.GaussianBlur(specks, (0, 0), 0.7)
    return level * tex[..., None] * col[None, None, :], kind


def render_piece(
    rng: np.random.Generator, cls: str, n: int = 128, style: Style = STYLES["mixed"]
) -> tuple[np.ndarray, dict[str, object]]:
    """One crop (BGR uint8 n x n) of a random piece of `cls`, and what it shows."""
    variant = _pick(rng, VARIANTS[cls])
    shapes = STEEL_SHAPES[variant] if cls == "steel" else OTHER_SHAPES[variant] if cls == "other" else SHAPES[cls]
    shape = _pick(rng, shapes)
    lo, hi = SIZE_MM[cls]
    size_mm = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    # field of view: the piece fills 40-80 % of the crop, never less than 16 mm across
    fov_mm = style.fov_mm or max(size_mm / rng.uniform(0.4, 0.8), 16.0)
    size_mm = min(size_mm, 0.8 * fov_mm)
    px_mm = fov_mm / n
    mask, info = _shape_mask(rng, shape, size_mm / px_mm, n)
    mat = _material(rng, cls, variant, shape, mask, info, px_mm)

    # light: direction, colour, intensity
    az = rng.uniform(0, 2 * math.pi)
    el = math.radians(rng.uniform(30, 65))
    light = np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)], np.float32)
    warmth = style.warmth if style.warmth is not None else rng.uniform(-1, 1)
    light_col = np.array([1 - 0.07 * warmth, 1.0, 1 + 0.07 * warmth], np.float32) * rng.uniform(*style.intensity)

    # height map: bevelled edges, domed by `relief`
    inside = (mask > 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(cv2.copyMakeBorder(inside, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), cv2.DIST_L2, 5)[
        1:-1, 1:-1
    ]
    r = max(float(dist.max()), 1.0)
    bevel = np.clip(dist / max(2.0, 0.15 * r), 0, 1)
    dome = np.sqrt(np.clip(dist / r, 0, 1))
    relief = float(mat["relief"])  # type: ignore[arg-type]
    height = (1 - relief) * bevel * 0.15 * r + relief * dome * 0.6 * r
    height = cv2.GaussianBlur(height.astype(np.float32), (0, 0), 1.0)
    gy, gx = np.gradient(height)
    rough = 0.15 if cls in ("ferrite", "smco") or variant in ("bare", "rusty") else 0.03
    gx = gx + rough * _noise(rng, n, n, 1.0)
    gy = gy + rough * _noise(rng, n, n, 1.0)
    normal = np.dstack([-gx, -gy, np.ones_like(gx)])
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    ndl = np.clip(normal @ light, 0, 1)
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    ndh = np.clip(normal @ half, 0, 1)
    alb = mat["albedo"]
    assert isinstance(alb, np.ndarray)
    diffuse = alb * (0.35 + 0.75 * ndl)[..., None]
    spec_col = alb / max(float(alb.mean()), 1.0) if mat["metal"] else np.ones(3, np.float32)
    specular = 255.0 * float(mat["spec"]) * (ndh ** float(mat["shininess"]))[..., None] * spec_col  # type: ignore[arg-type]
    piece = (diffuse + specular) * light_col

    belt, belt_kind = _belt(rng, n, style.belt)
    # soft shadow away from the light
    off = 2.0 + 4.0 * (1 - math.sin(el))
    m = np.array([[1, 0, -math.cos(az) * off], [0, 1, -math.sin(az) * off]], np.float32)
    shadow = cv2.GaussianBlur(cv2.warpAffine(mask, m, (n, n)), (0, 0), 2.0)
    belt = belt * (1 - rng.uniform(0.3, 0.55) * shadow)[..., None] * light_col
    img = belt * (1 - mask[..., None]) + piece * mask[..., None]
    # optics and sensor: vignetting, blur, noise
    yy, xx = (np.indices((n, n)) - n / 2) / n
    img *= (1 - rng.uniform(0.05, 0.2) * (xx**2 + yy**2) * 2)[..., None]
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.4, 1.0))
    img += rng.normal(0, rng.uniform(1.5, 4.0), img.shape).astype(np.float32)
    crop = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    area_mm2 = float(mask.sum()) * px_mm * px_mm
    return crop, {
        "variant": variant,
        "shape": shape,
        "size_mm": size_mm,
        "area_mm2": area_mm2,
        "mm_per_px": px_mm,
        "belt": belt_kind,
        "width_mm": float(info.get("w", size_mm / px_mm)) * px_mm if "w" in info else size_mm,
    }


def field_reading(rng: np.random.Generator, cls: str, desc: dict[str, object]) -> float:
    """Signed peak field (mT) the look-alike plant's bar reports for a piece."""
    area = float(desc["area_mm2"])  # type: ignore[arg-type]
    size = float(desc["size_mm"])  # type: ignore[arg-type]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if cls in REMANENCE_T:
        br = rng.uniform(*REMANENCE_T[cls]) * rng.uniform(*PARTIAL[cls])
        if rng.random() < DEMAGNETISED[cls]:
            br *= rng.uniform(0.0, 0.02)
    elif cls == "steel":
        br = rng.exponential(STEEL_RESIDUAL_T)
    else:
        br = 0.0
    shape = str(desc["shape"])
    width = float(desc["width_mm"])  # type: ignore[arg-type]
    thickness = (
        math.pi * width / 4
        if shape in ("cylinder", "wire", "screw")
        else rng.uniform(1.0, 3.5)
        if shape in ("plate", "bracket", "washer")
        else rng.uniform(0.25, 0.5) * min(width, size) + 1.0
    )
    radius = math.sqrt(area / math.pi)
    b = axial_field_mT(br, radius, thickness, LIFT_OFF_MM) if br else 0.0
    e = max(0.0, abs(rng.uniform(-PITCH_MM / 2, PITCH_MM / 2)) - radius)
    b *= (LIFT_OFF_MM**2 / (LIFT_OFF_MM**2 + e * e)) ** 1.5
    if rng.random() < CONTAMINATED_SHARE:
        b += rng.uniform(10, 150) * (1 if rng.random() < 0.5 else -1) * sign
    return sign * b + rng.normal(0, NOISE_MT)


def write_lookalike(
    out: Path,
    per_class: int = 700,
    seed: int = 0,
    splits: tuple[int, int, int] = (400, 100, 200),
    size: int = 128,
    progress: Callable[[int, int], None] | None = None,
    sensors: bool = True,
    style: str = "mixed",
) -> dict[str, object]:
    """Render the look-alike dataset (see the module's notes); `splits` are per-class counts summing to `per_class`.

    `style`: "mixed" (belt, light and scale vary from crop to crop) or "plant" (one belt, one light,
    one camera scale: the absolute size of a piece is visible, as on a real line).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    if sum(splits) != per_class:  # the same shares for another total, at least one crop per split
        if per_class < 3:
            raise ValueError(f"per_class must be at least 3 (one crop per split), got {per_class}")
        counts = [max(1, round(per_class * s / sum(splits))) for s in splits]
        counts[0] = per_class - counts[1] - counts[2]
        splits = (counts[0], counts[1], counts[2])
    out = Path(out)
    rng = np.random.default_rng([seed, 0x4C4F4F4B])
    manifest = ["file,class,variant,shape,size_mm,belt,field_mT"]
    total, done = per_class * len(CLASSES), 0
    for split, count in zip(SPLITS, splits, strict=True):
        rows = ["file,field_mT"]
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            for cls in CLASSES:
                crop, desc = render_piece(rng, cls, size, STYLES[style])
                field = field_reading(rng, cls, desc)
                name = f"{cls}/{k:05d}.png"
                cv2.imwrite(str(out / split / name), crop)
                rows.append(f"{name},{field:.2f}")
                manifest.append(
                    f"{split}/{name},{cls},{desc['variant']},{desc['shape']},{float(desc['size_mm']):.2f},"  # type: ignore[arg-type]
                    f"{desc['belt']},{field:.2f}"
                )
                done += 1
                if progress:
                    progress(done, total)
        if sensors:
            (out / split / "sensors.csv").write_text("\n".join(rows) + "\n")
    summary: dict[str, object] = {
        "kind": "lookalike",
        "style": style,
        "seed": seed,
        "per_class": per_class,
        "counts": dict(zip(SPLITS, splits, strict=True)),
        "crop_size": size,
        "hall_bar": {"lift_off_mm": LIFT_OFF_MM, "pitch_mm": PITCH_MM, "noise_mT": NOISE_MT},
    }
    (out / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
