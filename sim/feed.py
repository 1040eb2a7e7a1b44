"""The seeded feed: which pieces land on the belt, where, and what they are.

Everything is decided in belt-fixed coordinates (x across, s along), so the
feed is a pure function of the seed: how often the line asks for new pieces
does not change which pieces it gets.

Shapes are polygons (with holes) in millimetres around the piece's area
centroid, already rotated into belt axes (x across, y downstream). The
renderer rasterises exactly these polygons, so the extents and the centroid
here are those of the rendered piece.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from sim.config import SimFeedConfig
from sorter.config import CLASSES

Poly = np.ndarray  # (K, 2) float64, mm

# g/cm3; "other" pieces take the density of their material (the variant)
DENSITY: dict[str, float] = {
    "ndfeb": 7.5,
    "ferrite": 4.9,
    "smco": 8.4,
    "steel": 7.85,
    "copper": 8.9,
    "brass": 8.5,
    "aluminium": 2.7,
    "plastic": 1.2,
    "pcb": 1.9,
}

# max-dimension range (mm) per class, intersected with the feed's size range
CLASS_SIZE_MM: dict[str, tuple[float, float]] = {
    "ndfeb": (8.0, 50.0),
    "ferrite": (10.0, 50.0),
    "smco": (5.0, 15.0),
    "steel": (6.0, 50.0),
    "other": (6.0, 50.0),
}

VARIANTS: dict[str, dict[str, float]] = {
    "ndfeb": {"ni": 0.5, "zn": 0.15, "epoxy": 0.15, "bare": 0.2},
    "ferrite": {"matte": 0.7, "dusty": 0.3},
    "smco": {"grey": 0.7, "brown": 0.3},
    "steel": {"screw": 0.25, "washer": 0.2, "bracket": 0.15, "plate": 0.2, "rusty": 0.2},
    "other": {"copper": 0.25, "brass": 0.2, "aluminium": 0.25, "plastic": 0.15, "pcb": 0.15},
}

_NDFEB_SHAPES = {"block": 0.35, "arc": 0.2, "disc": 0.15, "ring": 0.1, "broken": 0.2}
SHAPES: dict[tuple[str, str], dict[str, float]] = {
    **{("ndfeb", v): _NDFEB_SHAPES for v in VARIANTS["ndfeb"]},
    **{("ferrite", v): {"arc": 0.35, "ring": 0.15, "block": 0.3, "shard": 0.2} for v in VARIANTS["ferrite"]},
    **{("smco", v): {"cylinder": 0.4, "disc": 0.3, "block": 0.3} for v in VARIANTS["smco"]},
    ("steel", "screw"): {"screw": 1.0},
    ("steel", "washer"): {"washer": 1.0},
    ("steel", "bracket"): {"bracket": 1.0},
    ("steel", "plate"): {"plate": 1.0},
    ("steel", "rusty"): {"block": 0.5, "plate": 0.5},
    ("other", "copper"): {"wire": 0.5, "plate": 0.25, "shard": 0.25},
    ("other", "brass"): {"screw": 0.3, "ring": 0.3, "plate": 0.4},
    ("other", "aluminium"): {"plate": 0.4, "bracket": 0.3, "shard": 0.3},
    ("other", "plastic"): {"shard": 0.5, "block": 0.3, "ring": 0.2},
    ("other", "pcb"): {"plate": 1.0},
}

MIN_FEATURE_MM = 3.0  # narrower strips vanish in the opening of a segmenter at `vision.downscale` 2
MIN_HOLE_MM = 2.5
TOUCH_OVERLAP_MM = 0.15  # "a hair": touching pieces must merge into one blob, not interpenetrate
_GAP_MM = 1.0  # clearance between the bounding circles of pieces that do not touch
_LOOKAHEAD_MM = 200.0  # pieces are generated this far ahead; a touching piece may land downstream of its partner


@dataclass(frozen=True, eq=False)
class SimPiece:
    """One piece on the simulated belt.

    `outline`/`holes` are polygons in belt mm relative to the area centroid
    (x across, y downstream), rotated by `angle_deg` from the shape's local
    frame; `local` holds shape parameters in that local, centroid-centred frame
    (e.g. where a screw's shank starts) for the renderer's texture.
    """

    id: int
    cls: str
    variant: str
    shape: str
    x_mm: float
    s_mm: float
    angle_deg: float
    area_mm2: float
    thickness_mm: float
    mass_g: float
    size_mm: float
    dx0: float
    dx1: float
    dy_lead: float
    dy_trail: float
    outline: Poly
    holes: tuple[Poly, ...] = ()
    local: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0  # appearance seed: the same piece renders the same way every time

    @cached_property
    def radius_mm(self) -> float:
        """Radius of the bounding circle around the centroid."""
        return float(np.sqrt((self.outline**2).sum(axis=1)).max())

    def y_mm(self, belt_pos_mm: float) -> float:
        """Along-belt centroid position relative to the camera centre line."""
        return belt_pos_mm - self.s_mm

    def placed(self, x_mm: float, s_mm: float, id: int | None = None) -> SimPiece:
        """The same piece at another belt position (and optionally with another id)."""
        return replace(self, x_mm=x_mm, s_mm=s_mm, id=self.id if id is None else id)


# --- polygon geometry ---


def poly_area_centroid(poly: Poly) -> tuple[float, float, float]:
    """Signed area and area centroid of a simple polygon."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    return float(a), float(((x + xn) * cross).sum() / (6 * a)), float(((y + yn) * cross).sum() / (6 * a))


def area_centroid(outline: Poly, holes: tuple[Poly, ...] = ()) -> tuple[float, float, float]:
    """Area and centroid of an outline minus its holes (holes lie inside the outline)."""
    a, cx, cy = poly_area_centroid(outline)
    a, mx, my = abs(a), abs(a) * cx, abs(a) * cy
    for h in holes:
        ha, hx, hy = poly_area_centroid(h)
        a, mx, my = a - abs(ha), mx - abs(ha) * hx, my - abs(ha) * hy
    return a, mx / a, my / a


def _rot(poly: Poly, deg: float) -> Poly:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return poly @ np.array([[c, s], [-s, c]])


def _circle(d: float, cx: float = 0.0, cy: float = 0.0, n: int | None = None) -> Poly:
    n = n or max(24, min(96, int(d * 3)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + d / 2 * np.cos(t), cy + d / 2 * np.sin(t)])


def _rect(w: float, h: float, cx: float = 0.0, cy: float = 0.0, chamfer: float = 0.0) -> Poly:
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    if chamfer <= 0:
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    c = chamfer
    return np.array(
        [
            [x0 + c, y0],
            [x1 - c, y0],
            [x1, y0 + c],
            [x1, y1 - c],
            [x1 - c, y1],
            [x0 + c, y1],
            [x0, y1 - c],
            [x0, y0 + c],
        ],
        dtype=np.float64,
    )


def _segments_cross(a: Poly, b: Poly) -> bool:
    p, r = a, np.roll(a, -1, axis=0) - a
    q, s = b, np.roll(b, -1, axis=0) - b
    rxs = r[:, None, 0] * s[None, :, 1] - r[:, None, 1] * s[None, :, 0]
    qp = q[None, :, :] - p[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (qp[..., 0] * s[None, :, 1] - qp[..., 1] * s[None, :, 0]) / rxs
        u = (qp[..., 0] * r[:, None, 1] - qp[..., 1] * r[:, None, 0]) / rxs
    return bool(np.any((rxs != 0) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)))


def _inside(pt: np.ndarray, poly: Poly) -> bool:
    x, y = pt
    xs, ys = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    crosses = (ys > y) != (yn > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = xs + (y - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(crosses & (x < xi)) % 2)


def outlines_intersect(a: Poly, b: Poly) -> bool:
    """Whether two outlines (holes ignored) overlap, including containment."""
    return _segments_cross(a, b) or _inside(a[0], b) or _inside(b[0], a)


# --- shape builders: local frame, size = longest side of the local bounding box ---

Shape = tuple[Poly, tuple[Poly, ...], dict[str, float]]


def _jag(p: np.ndarray, q: np.ndarray, rng: np.random.Generator, amp: float, step: float = 1.2) -> Poly:
    """Points strictly between p and q, jittered sideways: a fracture edge."""
    n = max(int(np.linalg.norm(q - p) / step), 1)
    t = np.linspace(0, 1, n + 1)[1:-1]
    if not len(t):
        return np.empty((0, 2))
    d = q - p
    normal = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-12)
    off = rng.uniform(-amp, amp, len(t))
    return p + t[:, None] * d + off[:, None] * normal


def _roughen(poly: Poly, rng: np.random.Generator, amp: float) -> Poly:
    pts = []
    for i in range(len(poly)):
        p, q = poly[i], poly[(i + 1) % len(poly)]
        pts.append(p[None])
        pts.append(_jag(p, q, rng, amp))
    return np.vstack(pts)


def _fracture(poly: Poly, rng: np.random.Generator, amp: float) -> Poly:
    """Cut a convex polygon along a random line, keeping 55-80 % of its area, with a jagged cut."""
    a_full = abs(poly_area_centroid(poly)[0])
    for _ in range(20):
        ang = rng.uniform(0, 2 * np.pi)
        n = np.array([math.cos(ang), math.sin(ang)])
        proj = poly @ n
        off = rng.uniform(proj.min() + 0.25 * np.ptp(proj), proj.max() - 0.2 * np.ptp(proj))
        out: list[np.ndarray] = []
        k = len(poly)
        for i in range(k):
            p, q = poly[i], poly[(i + 1) % k]
            dp, dq = p @ n - off, q @ n - off
            if dp <= 0:
                out.append(p[None])
            if dp * dq < 0:
                cut = p + (q - p) * (dp / (dp - dq))
                out.append(cut[None])
                if dp <= 0:  # leaving the kept side: the fracture runs from here to the re-entry point
                    out.append(np.full((1, 2), np.nan))
        pts = np.vstack(out)
        gap = np.flatnonzero(np.isnan(pts[:, 0]))
        if len(gap) != 1:
            continue
        g = int(gap[0])
        p, q = pts[g - 1], pts[(g + 1) % len(pts)]
        clipped = np.vstack([pts[:g], _jag(p, q, rng, amp), pts[g + 1 :]])
        if 0.55 <= abs(poly_area_centroid(clipped)[0]) / a_full <= 0.8:
            return clipped
    return poly


def _block(rng: np.random.Generator, size: float, ratio: tuple[float, float] = (0.3, 1.0)) -> Shape:
    w = max(size * rng.uniform(*ratio), MIN_FEATURE_MM)
    return _rect(size, w, chamfer=min(0.6, 0.08 * w)), (), {"w": w, "l": size}


def _arc(rng: np.random.Generator, size: float) -> Shape:
    span = math.radians(rng.uniform(40, 100))
    r_out = size / (2 * math.sin(span / 2))
    t = min(max(r_out * rng.uniform(0.15, 0.35), MIN_FEATURE_MM), 0.8 * r_out)
    a = np.linspace(-span / 2, span / 2, 32) - np.pi / 2
    outer = np.column_stack([r_out * np.cos(a), r_out * np.sin(a)])
    inner = np.column_stack([(r_out - t) * np.cos(a[::-1]), (r_out - t) * np.sin(a[::-1])])
    # local frame: arc centre at (0, 0), segment below it; "r_mid" lets textures follow the curvature
    return np.vstack([outer, inner]), (), {"x_centre": 0.0, "y_centre": 0.0, "r_mid": r_out - t / 2, "w": t}


def _disc(rng: np.random.Generator, size: float) -> Shape:
    return _circle(size), (), {"x_centre": 0.0, "y_centre": 0.0}


def _ring(rng: np.random.Generator, size: float, inner: tuple[float, float] = (0.4, 0.65)) -> Shape:
    d_in = min(size * rng.uniform(*inner), size - 2 * MIN_FEATURE_MM)
    if d_in < MIN_HOLE_MM:
        return _disc(rng, size)
    return _circle(size), (_circle(d_in)[::-1],), {"x_centre": 0.0, "y_centre": 0.0, "d_in": d_in}


def _shard(rng: np.random.Generator, size: float, amp: float) -> Shape:
    base = _circle(size, n=int(rng.integers(5, 9))) if rng.random() < 0.4 else _block(rng, size, (0.5, 1.0))[0]
    poly = _fracture(base, rng, amp)
    if amp > 0.2:
        poly = _roughen(poly, rng, amp * 0.5)
    return poly, (), {}


def _cylinder(rng: np.random.Generator, size: float) -> Shape:
    """A cylinder lying on the belt, seen from above: its axis is local x."""
    d = min(max(size * rng.uniform(0.3, 0.8), MIN_FEATURE_MM), size)
    return _rect(size, d, chamfer=min(0.5, 0.1 * d)), (), {"w": d, "l": size}


def _screw(rng: np.random.Generator, size: float) -> Shape:
    d = max(size * rng.uniform(0.14, 0.25), MIN_FEATURE_MM)
    head_w = min(d * rng.uniform(1.6, 2.1), size * 0.6)
    head_l = max(d * rng.uniform(0.5, 0.8), 1.5)
    x0 = -size / 2
    tip = x0 + size - d * 0.6
    poly = np.array(
        [
            [x0, -head_w / 2],
            [x0 + head_l, -head_w / 2],
            [x0 + head_l, -d / 2],
            [tip, -d / 2],
            [x0 + size, -d * 0.15],
            [x0 + size, d * 0.15],
            [tip, d / 2],
            [x0 + head_l, d / 2],
            [x0 + head_l, head_w / 2],
            [x0, head_w / 2],
        ]
    )
    return poly, (), {"x_shank": x0 + head_l, "x_tip": x0 + size, "x_head": x0, "w": d}


def _washer(rng: np.random.Generator, size: float) -> Shape:
    return _ring(rng, size, (0.4, 0.55))


def _holes_near_corners(rng: np.random.Generator, w: float, h: float, max_holes: int) -> tuple[Poly, ...]:
    d = min(rng.uniform(2.5, 6.0), 0.35 * min(w, h))
    if d < MIN_HOLE_MM:
        return ()
    inset = d / 2 + max(1.5, 0.12 * min(w, h))
    if min(w, h) < 2 * inset:
        return ()
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    # holes must neither overlap each other (area and rasterising assume disjoint holes) nor merge
    spaced = min(w, h) - 2 * inset >= d + 1.0
    n = int(rng.integers(1, max_holes + 1)) if spaced else 1
    pick = rng.permutation(4)[:n]
    return tuple(_circle(d, sx * (w / 2 - inset), sy * (h / 2 - inset))[::-1] for sx, sy in (corners[i] for i in pick))


def _plate(rng: np.random.Generator, size: float) -> Shape:
    h = max(size * rng.uniform(0.4, 1.0), MIN_FEATURE_MM)
    holes = _holes_near_corners(rng, size, h, 4) if rng.random() < 0.75 else ()
    return _rect(size, h, chamfer=min(0.4, 0.05 * h)), holes, {"w": h, "l": size}


def _bracket(rng: np.random.Generator, size: float) -> Shape:
    w = max(size * rng.uniform(0.2, 0.35), MIN_FEATURE_MM + 1)
    arm = max(size * rng.uniform(0.5, 1.0), 2 * w)
    x0, y0 = -size / 2, -arm / 2
    poly = np.array(
        [
            [x0, y0],
            [x0 + w, y0],
            [x0 + w, y0 + arm - w],
            [x0 + size, y0 + arm - w],
            [x0 + size, y0 + arm],
            [x0, y0 + arm],
        ]
    )
    holes: tuple[Poly, ...] = ()
    d = 0.45 * w
    if d >= MIN_HOLE_MM:
        holes = (
            _circle(d, x0 + w / 2, y0 + (arm - w) / 2)[::-1],
            _circle(d, x0 + (w + size) / 2, y0 + arm - w / 2)[::-1],
        )
    return poly, holes, {"w": w, "l": size}


def _wire(rng: np.random.Generator, size: float) -> Shape:
    d = rng.uniform(MIN_FEATURE_MM, max(MIN_FEATURE_MM, min(6.0, size * 0.3)))
    return _rect(size, d, chamfer=0.3 * d), (), {"w": d, "l": size}


_BUILDERS: dict[str, Callable[[np.random.Generator, float], Shape]] = {
    "block": _block,
    "arc": _arc,
    "disc": _disc,
    "ring": _ring,
    "broken": lambda rng, size: _shard(rng, size, 0.2),
    "shard": lambda rng, size: _shard(rng, size, 0.5),
    "cylinder": _cylinder,
    "screw": _screw,
    "washer": _washer,
    "plate": _plate,
    "bracket": _bracket,
    "wire": _wire,
}


def _thickness(shape: str, local: Mapping[str, float], size: float, rng: np.random.Generator) -> float:
    """Mean thickness (mm): volume = area x this."""
    w = local.get("w", size)
    match shape:
        case "cylinder" | "wire":
            return math.pi * w / 4  # a lying cylinder: volume / projected area
        case "screw":
            return math.pi * w / 4
        case "washer":
            return rng.uniform(1.0, 3.0)
        case "plate" | "bracket":
            return rng.uniform(1.0, 4.0)
        case _:
            return rng.uniform(0.2, 0.6) * min(w, size) + 1.0


def _pick(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    p = np.array([max(weights[k], 0.0) for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def class_size_range(cls: str, feed_size_mm: tuple[float, float] = (5.0, 50.0)) -> tuple[float, float]:
    lo, hi = CLASS_SIZE_MM[cls]
    lo2, hi2 = max(lo, feed_size_mm[0]), min(hi, feed_size_mm[1])
    return (lo2, hi2) if lo2 <= hi2 else (lo, hi)


def make_piece(
    rng: np.random.Generator,
    cls: str,
    variant: str | None = None,
    shape: str | None = None,
    size_mm: tuple[float, float] | None = None,
    id: int = 0,
) -> SimPiece:
    """A random piece of class `cls` at x = s = 0 (place it with `SimPiece.placed`)."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; known: {list(CLASSES)}")
    variant = variant or _pick(rng, VARIANTS[cls])
    if variant not in VARIANTS[cls]:
        raise ValueError(f"unknown {cls} variant {variant!r}; known: {list(VARIANTS[cls])}")
    shape = shape or _pick(rng, SHAPES[(cls, variant)])
    lo, hi = size_mm or class_size_range(cls)
    size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))  # small pieces are more common in scrap
    outline, holes, local = _BUILDERS[shape](rng, size)
    area, cx, cy = area_centroid(outline, holes)
    c = np.array([cx, cy])
    outline, holes = outline - c, tuple(h - c for h in holes)
    # local "x_*"/"y_*" entries are coordinates and move with the centroid; the rest are lengths
    local = {k: v - (cx if k.startswith("x_") else cy if k.startswith("y_") else 0.0) for k, v in local.items()}
    angle = float(rng.uniform(0, 360))
    outline, holes = _rot(outline, angle), tuple(_rot(h, angle) for h in holes)
    thickness = float(_thickness(shape, local, size, rng))
    density = DENSITY[variant if cls == "other" else cls]
    return SimPiece(
        id=id,
        cls=cls,
        variant=variant,
        shape=shape,
        x_mm=0.0,
        s_mm=0.0,
        angle_deg=angle,
        area_mm2=float(area),
        thickness_mm=thickness,
        mass_g=float(area * thickness * density / 1000.0),
        size_mm=size,
        dx0=float(outline[:, 0].min()),
        dx1=float(outline[:, 0].max()),
        dy_lead=float(outline[:, 1].max()),
        dy_trail=float(outline[:, 1].min()),
        outline=outline,
        holes=holes,
        local=local,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


class FeedGenerator:
    """Pieces arriving on the belt as a Poisson process, in belt-fixed coordinates.

    Deterministic for a seed, whatever the sequence of `pieces_until` calls.
    Pieces never overlap; a `touching_share` of them is placed against the
    previous piece so that the two form one blob for the segmenter.
    """

    def __init__(self, feed: SimFeedConfig, belt_width_mm: float, nominal_speed_mm_s: float, seed: int) -> None:
        unknown = set(feed.composition) - set(CLASSES)
        if unknown:
            raise ValueError(f"feed composition names unknown classes {sorted(unknown)}")
        if belt_width_mm - 2 * feed.margin_mm < 2 * feed.size_mm[1]:
            raise ValueError(f"belt of {belt_width_mm} mm is too narrow for {feed.size_mm[1]} mm pieces")
        self.feed = feed
        self.width = belt_width_mm
        self.spacing_mm = nominal_speed_mm_s / feed.rate_per_s
        self._rng = np.random.default_rng(seed)
        self._composition = {c: feed.composition.get(c, 0.0) for c in CLASSES}
        if sum(self._composition.values()) <= 0:
            raise ValueError("feed composition has no positive share")
        self._arrival = 0.0
        self._next_id = 0
        self._recent: list[SimPiece] = []  # generated pieces that later ones could still collide with
        self._pending: list[SimPiece] = []  # generated but not yet handed out
        self._max_radius = 0.0

    def pieces_until(self, s_mm: float) -> list[SimPiece]:
        """New pieces with s <= `s_mm` since the last call, in s order."""
        while self._arrival <= s_mm + _LOOKAHEAD_MM:
            self._generate_one()
        out = sorted((p for p in self._pending if p.s_mm <= s_mm), key=lambda p: p.s_mm)
        self._pending = [p for p in self._pending if p.s_mm > s_mm]
        return out

    def _generate_one(self) -> None:
        rng = self._rng
        self._arrival += float(rng.exponential(self.spacing_mm))
        cls = _pick(rng, self._composition)
        piece = make_piece(rng, cls, size_mm=class_size_range(cls, self.feed.size_mm), id=self._next_id)
        self._next_id += 1
        placed = None
        if self._recent and rng.random() < self.feed.touching_share:
            placed = self._place_touching(piece, self._recent[-1])
        if placed is None:
            placed = self._place_free(piece)
        self._arrival = max(self._arrival, placed.s_mm)
        self._max_radius = max(self._max_radius, placed.radius_mm)
        self._recent.append(placed)
        self._pending.append(placed)
        # pieces farther back than this cannot touch any later one (which lands at s >= arrival - lookahead)
        horizon = self._arrival - _LOOKAHEAD_MM - 2 * self._max_radius - _GAP_MM
        self._recent = [p for p in self._recent if p.s_mm >= horizon]

    def _x_range(self, p: SimPiece) -> tuple[float, float]:
        m = self.feed.margin_mm
        return m - p.dx0, self.width - m - p.dx1

    def _clear_of(self, p: SimPiece, x: float, s: float, ignore: SimPiece | None = None) -> bool:
        r = p.radius_mm
        for q in self._recent:
            if q is ignore:
                continue
            # belt frame: the along coordinate of a piece is -s, so distances use s directly
            if math.hypot(q.x_mm - x, q.s_mm - s) < r + q.radius_mm + _GAP_MM:
                return False
        return True

    def _place_free(self, p: SimPiece) -> SimPiece:
        lo, hi = self._x_range(p)
        s = self._arrival
        while True:
            for _ in range(24):
                x = float(self._rng.uniform(lo, hi))
                if self._clear_of(p, x, s):
                    return p.placed(x, s)
            s += 5.0  # crowded here: let the piece arrive a little later

    def _place_touching(self, p: SimPiece, prev: SimPiece) -> SimPiece | None:
        lo, hi = self._x_range(p)
        for _ in range(8):
            ang = float(self._rng.uniform(0, 2 * np.pi))
            u = np.array([math.cos(ang), math.sin(ang)])  # (across, along-s) direction from prev to p
            # outlines in (x, s) coordinates: s grows upstream, i.e. opposite to belt y
            a = prev.outline * np.array([1.0, -1.0])
            b = p.outline * np.array([1.0, -1.0])
            d_lo, d_hi = 0.0, prev.radius_mm + p.radius_mm + 0.1
            for _ in range(30):
                mid = (d_lo + d_hi) / 2
                if outlines_intersect(a, b + mid * u):
                    d_lo = mid
                else:
                    d_hi = mid
            d = d_hi - TOUCH_OVERLAP_MM
            x, s = prev.x_mm + d * u[0], prev.s_mm + d * u[1]
            # never behind the lookahead window: those s may already have been handed out
            if lo <= x <= hi and s >= self._arrival - _LOOKAHEAD_MM and self._clear_of(p, x, s, ignore=prev):
                return p.placed(x, s)
        return None
