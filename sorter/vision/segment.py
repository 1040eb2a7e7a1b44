"""Segmentation of pieces against the dark belt.

Finds pieces where any colour channel is bright (coloured pieces such as PCB green
or copper stay bright there) on an image `vision.downscale` times smaller, parts
touching pieces at narrow necks, between notches of the outline and on from a
sharp crevice on the full-resolution frame (`vision.split_full_res`), and cuts a
classifier crop for each blob from the full-resolution frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np
from skimage.segmentation import watershed

from sorter.config import VisionConfig

BELT_FILL = (20, 20, 20)  # what crops show outside their piece's mask (BGR)
Crop = np.ndarray | Callable[[], np.ndarray]  # a crop, or a function that cuts it on demand
Point = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Blob:
    """One piece in image pixels (full-resolution coordinates)."""

    cu: float  # centroid column
    cv: float  # centroid row
    u0: float
    u1: float
    v0: float
    v1: float
    area_px: float
    touches_top_bottom: bool
    touches_left_right: bool
    crop: Crop | None


def _max_channel(img: np.ndarray) -> np.ndarray:
    b, g, r = cv2.split(img)
    return cv2.max(cv2.max(b, g), r)


# Two distance-map peaks are separate pieces when every path between them narrows below a share of the
# smaller peak: below `vision.neck_sure` always; below `vision.neck_colour` only if the two sides also
# differ in colour by `vision.colour_step` (a screw's head and shank have a moderate neck but one colour;
# a magnet touching a steel plate along an edge has a moderate neck and two colours).


def _peaks(dist: np.ndarray) -> list[tuple[int, int, float]]:
    """Local peaks of the distance map, found as the components that appear while lowering a threshold
    step by step (x 0.8).

    A component that appears at a level has its maximum between that level and the one before, and that
    maximum is a local maximum of the map: levels without such a local maximum are not labelled."""
    seeds: list[tuple[int, int, float]] = []
    local = dist[(dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8))) & (dist >= 2.0)]
    level, prev = float(dist.max()), np.inf
    while level >= 2.0:
        if np.any((local >= level) & (local < prev)):
            above = (dist >= level).astype(np.uint8)
            x, y, w, h = cv2.boundingRect(above)  # label only the box around what is above the level
            n, lab = cv2.connectedComponents(above[y : y + h, x : x + w], connectivity=8)
            win = dist[y : y + h, x : x + w]
            # a component holding a peak already found rose above the last level: it is no new peak
            old = {int(lab[sy - y, sx - x]) for sy, sx, _ in seeds if y <= sy < y + h and x <= sx < x + w}
            for k in range(1, n):
                if k in old:
                    continue
                flat = np.where(lab == k, win, -1.0)
                i = int(flat.argmax())
                if flat.flat[i] < prev:  # nothing of it was above the level before: a new peak
                    dy, dx = divmod(i, w)
                    seeds.append((y + dy, x + dx, float(win[dy, dx])))
        prev = level
        level *= 0.8
    return seeds


class _Groups:
    """Union-find over peak indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.root(j)] = self.root(i)


def _connect_peaks(dist: np.ndarray, seeds: list[tuple[int, int, float]], neck: float) -> _Groups:
    """Group peaks that stay connected above `neck` x the smaller peak (seeds sorted by peak, descending)."""
    groups = _Groups(len(seeds))
    cache: dict[float, np.ndarray] = {}
    for j in range(1, len(seeds)):
        yj, xj, pj = seeds[j]
        level = round(neck * pj, 2)
        if level not in cache:
            cache[level] = cv2.connectedComponents((dist >= level).astype(np.uint8), connectivity=8)[1]
        lab = cache[level]
        for i in range(j):
            if lab[seeds[i][0], seeds[i][1]] == lab[yj, xj]:
                groups.union(i, j)
    return groups


def _filled(comp: np.ndarray) -> tuple[np.ndarray, bool]:
    """A blob's mask with its holes filled, and whether that covers nearly all of its convex hull (one
    piece: nothing to part)."""
    filled = comp.copy()
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    hull_area = cv2.contourArea(cv2.convexHull(np.vstack(contours)))
    return filled, hull_area <= 0 or cv2.countNonZero(filled) / hull_area > 0.97


def _may_be_parted(comp: np.ndarray, notch_px: float) -> bool:
    """Whether `_split_touching` or `_cut_concavities` has anything to look at: a blob that is not convex,
    has a hole, or has a notch `notch_px` deep (`vision.cut_depth_mm`, the shallowest a cut is made at).

    The notch is asked for apart: a small piece pressed on another hardly dents the blob's share of its
    hull (and the pixel count adds half the outline to the blob, a tenth or more of a piece under 10 mm at
    half resolution), so such blobs were never parted (`sorter sim touching`: 23 touching pieces lost
    against 27, for 2.4 blobs a frame looked at on the frame against 2.1 at 128 pieces/s; docs/results.md)."""
    filled, convex = _filled(comp)
    if not convex or cv2.countNonZero(filled) > cv2.countNonZero(comp):
        return True
    outline = _outline_defects(comp)
    return outline is not None and len(outline[1]) > 0 and int(outline[1][:, 3].max()) >= notch_px * 256


def _outline_defects(part: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A one-piece mask's outline and its convexity defects (start, end, deepest point, depth x 256); None
    for a mask of several outlines, a tiny one, or one whose outline touches itself."""
    contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if len(contours) != 1 or len(contours[0]) < 8:
        return None
    c = contours[0]
    try:
        defects = cv2.convexityDefects(c, cv2.convexHull(c, returnPoints=False))
    except cv2.error:  # a self-touching outline ("hull indices are not monotonous"): leave it whole
        return None
    return c, np.zeros((0, 4), np.int32) if defects is None else defects.reshape(-1, 4)


def _split_touching(comp: np.ndarray, colour: np.ndarray, cfg: VisionConfig, flood_scale: int = 1) -> list[np.ndarray]:
    """Split one component mask where pieces touch; one mask per piece.

    `colour` is the BGR image under `comp` (same shape), used to tell materials apart at moderate necks.
    Holes are filled first so that a ring or washer stays one piece. A blob with a hole that stays whole
    gets a second look with its hole open: pieces touching at both ends (an arc leaning on a screw)
    enclose a hole too, and are parted there by colour alone, under the strict terms of `_encloses_between`.
    """
    filled, convex = _filled(comp)
    parts = [comp] if convex else _split_at_necks(comp, filled, colour, cfg, False, flood_scale)
    holed = cv2.countNonZero(filled) > cv2.countNonZero(comp)
    if len(parts) == 1 and holed and _may_hold_two_colours(comp, colour, cfg):
        opened = _split_at_necks(comp, comp, colour, cfg, True, flood_scale)
        if len(opened) > 1 and _encloses_between(opened, filled & ~comp, colour, cfg):
            parts = opened
    return parts


# A blob with a hole is parted by colour alone only where the hole lies between big sides of plainly
# different materials that meet along a dark seam (every piece's edge is darker than its face). On the
# simulated feed (seeds 7, 8, 11, 12), splits of single pieces by colour alone leave a side under 15 % of
# the blob, differ by under 55 in mean BGR, leave the hole inside one side (a plate's bolt hole), or meet
# where one side is darker than the seam (a ring cut along its highlight); an arc resting on a screw:
# 25 % of the blob, 66 apart, the hole's rim shared about half and half, the seam at 0.83 x the darker side.
# Hence the defaults of `vision.hole_min_share` (0.15), `vision.hole_colour_step` (56) and
# `vision.hole_rim_max_share` (0.8).


def _may_hold_two_colours(comp: np.ndarray, colour: np.ndarray, cfg: VisionConfig) -> bool:
    """A cheap necessary condition for `_encloses_between`: sides of shares w and 1 - w whose means differ
    by d spread the blob's colour by at least d * sqrt(w (1 - w)) (most holed blobs are one material)."""
    _, sd = cv2.meanStdDev(colour, mask=comp)
    least = cfg.hole_colour_step * np.sqrt(cfg.hole_min_share * (1 - cfg.hole_min_share))
    return float(np.sqrt((sd**2).sum())) >= least


def _encloses_between(parts: list[np.ndarray], hole: np.ndarray, colour: np.ndarray, cfg: VisionConfig) -> bool:
    """Whether colour-parted `parts` of a blob are separate pieces around `hole` (see `vision.hole_*`)."""
    sizes = np.array([cv2.countNonZero(q) for q in parts], dtype=np.float64)
    if sizes.min() < cfg.hole_min_share * sizes.sum():
        return False
    k = np.ones((3, 3), np.uint8)
    rim = cv2.dilate(hole, k)
    on_rim = np.array([cv2.countNonZero(rim & q) for q in parts], dtype=np.float64)
    if on_rim.sum() == 0 or on_rim.max() > cfg.hole_rim_max_share * on_rim.sum():
        return False
    means = [_mean_colour(colour, q) for q in parts]
    bright = _max_channel(colour)
    for a in range(len(parts)):
        for b in range(a):
            if float(np.linalg.norm(means[a] - means[b])) < cfg.hole_colour_step:
                return False
            seam = (cv2.dilate(parts[a], k) & parts[b]) | (cv2.dilate(parts[b], k) & parts[a])
            faces = [cv2.erode(parts[i], k, iterations=2) for i in (a, b)]
            if not cv2.countNonZero(seam) or not all(cv2.countNonZero(f) for f in faces):
                return False
            darker_face = min(float(np.median(bright[f > 0])) for f in faces)
            if float(bright[seam > 0].mean()) > darker_face:
                return False
    return True


def _flood(height: np.ndarray, markers: np.ndarray, shape: np.ndarray, scale: int) -> np.ndarray:
    """A watershed of `height` from `markers` (int32 labels) over `shape`'s pixels; with `scale` k > 1, on a
    grid k times coarser (each cell: its pixels' mean height, any marker, in the shape where any pixel is)
    and taken back to every pixel of `shape`. The flood was most of the cost of parting a big blob at full
    resolution: at k = 2, a third of it. Where pieces meet at necks, each piece's centroid stays within a pixel
    and a border between two within a few (tests/test_segment.py); where blobs bulge into each other the ridge
    between them is flat and either flood's border there is arbitrary. `sorter sim touching` counts the same
    pieces lost, off and fragmented as with the full-resolution flood (docs/results.md)."""
    if scale == 1:
        return np.asarray(watershed(height, markers=markers, mask=shape > 0, connectivity=2))
    h, w = shape.shape
    eh, ew = -h % scale, -w % scale  # sides padded to whole cells
    if eh or ew:
        height = cv2.copyMakeBorder(height, 0, eh, 0, ew, cv2.BORDER_REPLICATE)
        markers = cv2.copyMakeBorder(markers, 0, eh, 0, ew, cv2.BORDER_CONSTANT, value=0)
        shape = cv2.copyMakeBorder(shape, 0, eh, 0, ew, cv2.BORDER_CONSTANT, value=0)
    cells = cv2.resize(height, ((w + ew) // scale, (h + eh) // scale), interpolation=cv2.INTER_AREA)
    # a cell's maximum: dilated by a k x k window anchored at its corner, then every k-th pixel
    cell = np.ones((scale, scale), np.uint8)
    cell_markers = cv2.dilate(markers.astype(np.float32), cell, anchor=(0, 0))[::scale, ::scale].astype(np.int32)
    cell_shape = cv2.dilate(shape, cell, anchor=(0, 0))[::scale, ::scale] > 0
    labels = watershed(cells, markers=cell_markers, mask=cell_shape, connectivity=2)
    full = cv2.resize(labels.astype(np.int32), (w + ew, h + eh), interpolation=cv2.INTER_NEAREST)[:h, :w]
    return np.where(shape[:h, :w] > 0, full, 0)


def _split_at_necks(
    comp: np.ndarray, shape: np.ndarray, colour: np.ndarray, cfg: VisionConfig, colour_only: bool, flood_scale: int
) -> list[np.ndarray]:
    """`_split_touching` on the distance map of `shape` (comp, or comp with its holes filled); with
    `colour_only`, peaks part only where their colours differ, however narrow the neck. The border
    between pieces is flooded on a grid `flood_scale` times coarser (`_flood`)."""
    # a blob's mask is cut to its bounding box: pad it, or the box's edge would count as inside and put
    # peaks on the outline (an L-shaped bracket then had a "neck" at its corner)
    padded = cv2.copyMakeBorder(shape, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    seeds = sorted(_peaks(dist), key=lambda s: -s[2])
    if len(seeds) < 2:
        return [comp]
    fine = _connect_peaks(dist, seeds, cfg.neck_colour)
    roots = sorted({fine.root(i) for i in range(len(seeds))})
    if len(roots) < 2:
        return [comp]
    # candidates joined by a moderate neck stay one piece unless their colours differ; each candidate's
    # colour is read around its peaks, so most blobs (a screw, an arc) are settled before any flooding
    cores = np.zeros(dist.shape, dtype=np.int32)
    for i, (y, x, p) in enumerate(seeds):
        cv2.circle(cores, (x, y), max(1, int(0.5 * p)), roots.index(fine.root(i)) + 1, -1)
    cores[shape == 0] = 0
    inside = comp > 0
    means = []
    for k in range(len(roots)):
        px = colour[(cores == k + 1) & inside].reshape(-1, 3)
        if not len(px):  # a core that falls in a hole of the mask: read the colour at its peak
            y, x, _ = next(seeds[i] for i in range(len(seeds)) if roots.index(fine.root(i)) == k)
            px = colour[y : y + 1, x : x + 1].reshape(-1, 3)
        means.append(px.astype(np.float64).mean(axis=0))
    sure = _connect_peaks(dist, seeds, cfg.neck_sure)
    final = _Groups(len(roots))
    for a in range(len(roots)):
        for b in range(a):
            joined = colour_only or sure.root(roots[a]) == sure.root(roots[b])
            if joined and np.linalg.norm(means[a] - means[b]) < cfg.colour_step:
                final.union(b, a)
    groups = sorted({final.root(k) for k in range(len(roots))})
    if len(groups) < 2:
        return [comp]
    # flood the distance map from one marker per piece (a watershed): borders settle on the necks
    markers = np.zeros(dist.shape, dtype=np.int32)
    for k in range(len(roots)):
        markers[cores == k + 1] = groups.index(final.root(k)) + 1
    labels = _flood(-dist, markers, shape, flood_scale)
    parts = []
    for g in range(1, len(groups) + 1):
        part = ((labels == g) & inside).astype(np.uint8) * 255
        if cv2.countNonZero(part):
            parts.append(part)
    return parts or [comp]


# Two touching pieces leave a pair of concavities in the outline, one at each end of the contact, with a
# short gap between them for how deep the deeper one reaches into the blob; one piece's own concavities
# (an arc's inside, a bracket's corner) are far apart for their depth. Measured on the simulated feed
# (seeds 7 and 8, 3,800 pieces): a single piece's best pair spans at least 1.55 x its deeper depth; of
# the touching pairs 86 % span less than 0.8 x, 98 % less than 1.3 x (the defaults of `vision.cut_sure` and
# `vision.cut_ratio`). A screw with a wide head looks like a disc touching a bar, though: between
# `cut_sure` and `cut_ratio` the two sides must also differ in colour, unless both notches are crevices
# sharper than `vision.cut_sharp_deg` (a screw's head meets its shank at ~115°; two outlines meeting leave
# less). A small piece pressed on a bigger one leaves shallow notches far apart for their depth: up to
# `vision.cut_far_ratio` such a pair is cut if the sides differ by the strict `vision.cut_far_colour_step`.
# A pair one of whose notches is a crevice (`_crevices`: deeper and sharper than any single piece's notch) is cut
# with no colour test, as the crevice alone would be: touching pieces lost 21 -> 16 on seeds 3, 5, 11, 12,
# 18 -> 15 on 21, 42, 43 and 27 -> 23 on 7, 8, 31, 57, single pieces unchanged on all eleven (a plate pressed on
# a disc or washer, a cylinder on a washer, a block on a disc of the same plating).
# Measured with `sorter sim touching` (seeds 3, 5, 11, 12; 1,965 touching and 5,164 single pieces): those two
# rules take the touching pieces lost in a merged blob from 104 to 62 at `vision.downscale` 2 (46 to 23 at 1),
# for 9 more fragments of touching pieces and none of single ones.
# Concavities shallower than `vision.cut_depth_mm` are outline roughness; each side of a cut has at least
# `vision.cut_min_px` (segmentation) pixels; cuts nest at most `vision.cut_levels` deep.


def _angle_span(min_depth_px: float) -> int:
    """How many outline points either side of a notch its inside angle is measured over: 1.5 x the least depth
    a notch is cut at (`_notch_angle`)."""
    return max(2, round(1.5 * min_depth_px))


def _notch_angle(c: np.ndarray, i: int, k: int) -> float:
    """The outline's inside angle at contour point i, between the points k before and k after (degrees)."""
    n = len(c)
    a = (c[(i - k) % n, 0] - c[i, 0]).astype(np.float64)
    b = (c[(i + k) % n, 0] - c[i, 0]).astype(np.float64)
    cos = float(a @ b) / max(float(np.hypot(*a) * np.hypot(*b)), 1e-9)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _concavity_cuts(
    outline: tuple[np.ndarray, np.ndarray], min_depth_px: float, max_ratio: float
) -> list[tuple[float, float, Point, Point]]:
    """(gap / depth, angle, end, end) of every cut between two deep concavities of a part's outline
    (`_outline_defects`), gap relative to the deeper one's depth, below `max_ratio`, shortest first; angle: the
    wider of the outline's inside angles at the two ends, measured over 1.5 x the least depth."""
    c, d = outline
    deep = d[d[:, 3] >= min_depth_px * 256]  # fixed point: 8 fractional bits
    k = _angle_span(min_depth_px)
    angles = [_notch_angle(c, int(i), k) for i in deep[:, 2]]
    cuts = []
    for i in range(len(deep)):
        for j in range(i):
            pa, pb = c[deep[i, 2], 0], c[deep[j, 2], 0]
            ratio = float(np.hypot(*(pa - pb))) * 256 / max(deep[i, 3], deep[j, 3])
            if ratio < max_ratio:
                cuts.append((ratio, max(angles[i], angles[j]), (int(pa[0]), int(pa[1])), (int(pb[0]), int(pb[1]))))
    return sorted(cuts)


# A piece pressed into another leaves a crevice at one end of the contact; at the other end the two outlines
# may run on nearly straight (a small arc pressed along a block's end), so no second notch pairs with it. On the
# simulated feed (`sorter sim touching`, seeds 3, 5, 11, 12) no single piece has a notch 2 mm deep or deeper
# turning sharper than 84°, while blobs of touching pieces left whole had them down to 28°. Such a crevice is
# cut on along its own line: touching pieces lost 23 -> 21 there, 19 -> 18 on seeds 21, 42, 43 (single pieces
# unchanged). Cut to the nearest outline point instead, 17 and 16 were lost, but an arc's foot on a bar was cut
# through the bar.
CREVICE_DEPTHS = 2.0  # x `vision.cut_depth_mm`: shallower crevices are outline roughness
CREVICE_REACH = 1.5  # x the crevice's depth: the longest cut on from its tip


class _Crevice(NamedTuple):
    angle: float  # the outline's inside angle at the tip (degrees, `_notch_angle`)
    tip: int  # the tip's index on the outline
    at: Point  # the tip
    depth: float  # pixels


def _crevices(outline: tuple[np.ndarray, np.ndarray], min_depth_px: float, cfg: VisionConfig) -> list[_Crevice]:
    """The outline's (`_outline_defects`) crevices: notches at least `CREVICE_DEPTHS` x the cut depth deep that
    turn sharper than `vision.crevice_deg`, the sharpest first."""
    if cfg.crevice_deg <= 0:
        return []
    c, d = outline
    k = _angle_span(min_depth_px)
    found = []
    for _, _, tip, depth in d[d[:, 3] >= CREVICE_DEPTHS * min_depth_px * 256]:
        angle = _notch_angle(c, int(tip), k)
        if angle < cfg.crevice_deg:
            found.append(_Crevice(angle, int(tip), (int(c[tip, 0, 0]), int(c[tip, 0, 1])), depth / 256))
    return sorted(found)


def _crevice_cut(
    part: np.ndarray,
    outline: tuple[np.ndarray, np.ndarray],
    crevices: list[_Crevice],
    min_depth_px: float,
    cfg: VisionConfig,
    paired: set[Point],
) -> list[np.ndarray] | None:
    """The sides of `part` cut from the tip of the sharpest of its outline's `crevices` that is no end of a
    notch pair (`paired`) straight on, along the crevice's own line, to where that line leaves the mask; None
    where there is no such cut."""
    k = _angle_span(min_depth_px)
    for crevice in crevices:
        if crevice.at in paired:
            continue
        far = _crevice_line_end(part, outline[0], crevice.tip, k, CREVICE_REACH * crevice.depth)
        if far is not None and (sides := _cut_sides(part, crevice.at, far, cfg.cut_min_px)) is not None:
            return sides
    return None


def _crevice_line_end(part: np.ndarray, c: np.ndarray, i: int, k: int, reach: float) -> Point | None:
    """Where the crevice at contour point i, carried on into the mask along the bisector of its walls (the
    points k before and after), leaves the mask; None if that is farther than `reach` pixels. (Not the nearest
    outline point in any direction: for an arc's foot on a bar that lies across the bar, and cut it in two.)"""
    n = len(c)
    tip = c[i, 0].astype(np.float64)
    walls = [c[(i - k) % n, 0] - tip, c[(i + k) % n, 0] - tip]
    out = sum(w / max(float(np.hypot(*w)), 1e-9) for w in walls)  # the bisector points out of the crevice
    norm = float(np.hypot(*out))
    if norm < 1e-9:
        return None
    step = -out / norm
    h, w = part.shape
    last = None
    for t in range(1, int(reach) + 2):
        x, y = (round(float(v)) for v in tip + t * step)
        if not (0 <= x < w and 0 <= y < h) or not part[y, x]:
            return last
        last = (x, y)
    return None  # still inside at `reach`: too far across for a contact


def _mean_colour(colour: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Mean BGR over a side's inside (its outline ring is darker on every piece)."""
    inner = cv2.erode(side, np.ones((3, 3), np.uint8))
    px = colour[(inner if cv2.countNonZero(inner) else side) > 0]
    return px.reshape(-1, 3).astype(np.float64).mean(axis=0)


def _cut_sides(part: np.ndarray, end_a: Point, end_b: Point, min_px: int) -> list[np.ndarray] | None:
    """The sides of `part` cut along a line, each at least `min_px`; None if the line does not part it."""
    cut_mask = part.copy()
    cv2.line(cut_mask, end_a, end_b, 0, 1, cv2.LINE_8)  # an 8-connected line parts 4-connected regions
    n, lab = cv2.connectedComponents(cut_mask, connectivity=4)
    sizes = np.bincount(lab.ravel(), minlength=n)[1:]
    if n < 3 or np.sort(sizes)[-2] < min_px:
        return None
    # the line's pixels (and any crumbs) go back to the side they touch, so areas and centroids stay whole
    keep = np.flatnonzero(sizes >= min_px) + 1
    lab16 = np.where(np.isin(lab, keep), lab, 0).astype(np.uint16)
    grown = cv2.dilate(lab16, np.ones((3, 3), np.uint8), iterations=2)
    lab16 = np.where((part > 0) & (lab16 == 0), grown, lab16)
    return [((lab16 == k) & (part > 0)).astype(np.uint8) * 255 for k in keep]


def _colour_step_needed(ratio: float, angle: float, from_crevice: bool, cfg: VisionConfig) -> float:
    """How far apart in colour the sides of a notch cut must be (0: none asked), by its gap / depth `ratio`,
    the wider inside `angle` of its two notches, and whether one of them is a crevice (`_crevices`)."""
    if from_crevice or ratio < cfg.cut_sure or (ratio < cfg.cut_ratio and angle <= cfg.cut_sharp_deg):
        return 0.0
    return cfg.colour_step if ratio < cfg.cut_ratio else cfg.cut_far_colour_step


def _cut_concavities(
    part: np.ndarray, colour: np.ndarray, min_depth_px: float, cfg: VisionConfig, levels: int
) -> list[np.ndarray]:
    """Cut a mask between paired concavities (see `vision.cut_ratio`), again on each side, at most `levels`
    deep; one mask per piece.

    Of the pairs whose sides pass their colour test, the one with the sharpest notches is cut: where two
    pieces' outlines meet they leave a crevice, while a piece's own concavity (the inside of an arc) is a
    smooth curve. The shortest pair would often join the arc's inside to one end of the contact, and cut
    the arc in two.
    """
    if levels <= 0:
        return [part]
    outline = _outline_defects(part)
    if outline is None:
        return [part]
    best: tuple[float, list[np.ndarray]] | None = None
    cuts = _concavity_cuts(outline, min_depth_px, max(cfg.cut_ratio, cfg.cut_far_ratio))
    # a notch with a sure partner is one end of that contact: a cut from it to another contact's notch would
    # cross the piece between them (a shard touched by a block at one corner and a screw at another)
    sure_ends = {end for ratio, _, a, b in cuts if ratio < cfg.cut_sure for end in (a, b)}
    crevices = _crevices(outline, min_depth_px, cfg)
    crevice_tips = {crevice.at for crevice in crevices}
    for ratio, angle, end_a, end_b in cuts:
        if best is not None and angle >= best[0]:
            continue
        if ratio >= cfg.cut_sure and end_a in sure_ends and end_b in sure_ends:
            continue
        sides = _cut_sides(part, end_a, end_b, cfg.cut_min_px)
        if sides is None:
            continue
        step = _colour_step_needed(ratio, angle, end_a in crevice_tips or end_b in crevice_tips, cfg)
        if step:
            means = [_mean_colour(colour, side) for side in sides]
            if max(float(np.linalg.norm(m - means[0])) for m in means[1:]) < step:
                continue
        best = (angle, sides)
    if best is None:
        # a crevice with a partner notch was judged with it above
        paired = {end for _, _, a, b in cuts for end in (a, b)}
        crevice = _crevice_cut(part, outline, crevices, min_depth_px, cfg, paired)
        if crevice is None:
            return [part]
        best = (0.0, crevice)
    sides = _along_colour_edge(part, best[1], colour, cfg)
    return [piece for side in sides for piece in _cut_concavities(side, colour, min_depth_px, cfg, levels - 1)]


# A side moved onto the colour edge is one piece: its largest part holds at least this share of it (the flood
# between a plated block and the ferrite arc under it: 0.986; along a steel bracket's shading and rust spots,
# away from the arc on it: 0.556, refused). Crumbs go back to the side the straight cut gave them.
EDGE_WHOLE_SHARE = 0.95


def _along_colour_edge(
    part: np.ndarray, sides: list[np.ndarray], colour: np.ndarray, cfg: VisionConfig
) -> list[np.ndarray]:
    """Sides of a straight cut between pieces of two materials, their border moved onto the edge between
    their colours: a watershed on the colour image from each side's core. A cut joins two notches, but
    where a small piece lies over a bigger one (a plated block on a ferrite arc) the pieces' real border
    bends away from that line, and the straight cut gave the block a third of the arc. Sides of one colour
    (under `vision.colour_step` apart) keep the straight cut: there is no colour edge to settle on."""
    means = [_mean_colour(colour, side) for side in sides]
    if max(float(np.linalg.norm(m - means[0])) for m in means[1:]) < cfg.colour_step:
        return sides
    k = np.ones((3, 3), np.uint8)
    smooth = cv2.GaussianBlur(colour, (3, 3), 0)
    inside = part > 0
    # each side's core: its pixels nearer its own median colour than any other side's (the part of the other
    # piece that the straight cut gave it is not), away from edges
    px = smooth[inside].astype(np.float32)
    medians = [np.median(smooth[side > 0], axis=0).astype(np.float32) for side in sides]
    nearest = np.full(part.shape, -1, dtype=np.int8)
    nearest[inside] = np.argmin([((px - m) ** 2).sum(axis=1) for m in medians], axis=0)
    markers = np.zeros(part.shape, dtype=np.int32)
    markers[cv2.dilate(part, k) == 0] = len(sides) + 1  # the belt around the blob: the flood stays inside
    for i, side in enumerate(sides):
        core = cv2.erode(((nearest == i) & (side > 0)).astype(np.uint8), k, iterations=2)
        if not cv2.countNonZero(core):
            return sides  # a side too thin to hold a core: the cut stays
        markers[core > 0] = i + 1
    cv2.watershed(smooth, markers)  # Meyer's flood on the colour image itself: borders where colours change
    cut = np.zeros(part.shape, dtype=np.int32)  # the straight cut's sides, 1..n
    for i, side in enumerate(sides):
        cut[side > 0] = i + 1
    # the blob's own outline (the belt's flood may reach into its dark rim) stays with the side the cut gave it
    labels = np.where((markers >= 1) & (markers <= len(sides)) & inside, markers, cut)
    for i in range(len(sides)):
        _, comps, stats, _ = cv2.connectedComponentsWithStats((labels == i + 1).astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        if not len(areas) or areas.sum() < cfg.cut_min_px:
            return sides
        if areas.max() < EDGE_WHOLE_SHARE * areas.sum():
            return sides  # the flood ran along a piece's own shading or spots, not between two pieces
        crumbs = (comps > 0) & (comps != 1 + int(areas.argmax()))
        labels[crumbs] = cut[crumbs]
    return [(labels == i + 1).astype(np.uint8) * 255 for i in range(len(sides))]


def crop_piece(
    image: np.ndarray,
    mask_full: np.ndarray,
    box: tuple[int, int, int, int],
    mm_per_px: float,
    cfg: VisionConfig,
    size: int,
) -> np.ndarray:
    """A square classifier crop centred on the piece, other pieces blanked to belt colour.

    `mask_full` is the piece's mask over `box` = (u0, v0, u1, v1) in full-res pixels
    (exclusive ends). The crop covers at least `crop_min_mm`, so small pieces stay small.
    """
    u0, v0, u1, v1 = box
    side_px = max(max(u1 - u0, v1 - v0) + 2 * cfg.crop_margin_mm / mm_per_px, cfg.crop_min_mm / mm_per_px)
    half = int(np.ceil(side_px / 2))
    cu, cv = (u0 + u1) // 2, (v0 + v1) // 2
    out = np.empty((2 * half, 2 * half, 3), dtype=np.uint8)
    out[:] = BELT_FILL
    h, w = image.shape[:2]
    a0, b0 = max(cu - half, 0), max(cv - half, 0)
    a1, b1 = min(cu + half, w), min(cv + half, h)
    keep = np.zeros((2 * half, 2 * half), dtype=np.uint8)
    mu0, mv0 = u0 - (cu - half), v0 - (cv - half)
    mh, mw = mask_full.shape
    ky0, kx0 = max(mv0, 0), max(mu0, 0)
    ky1, kx1 = min(mv0 + mh, 2 * half), min(mu0 + mw, 2 * half)
    keep[ky0:ky1, kx0:kx1] = mask_full[ky0 - mv0 : ky1 - mv0, kx0 - mu0 : kx1 - mu0]
    ry0, rx0, ry1, rx1 = b0 - (cv - half), a0 - (cu - half), b1 - (cv - half), a1 - (cu - half)
    # masked copy in OpenCV: numpy's boolean indexing made this 2.6x slower (the vision thread cuts 4 views a piece)
    cv2.copyTo(image[b0:b1, a0:a1], keep[ry0:ry1, rx0:rx1], out[ry0:ry1, rx0:rx1])
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def _cut(
    image: np.ndarray, part: np.ndarray, box: tuple[int, int, int, int], mm_per_px: float, cfg: VisionConfig, size: int
) -> np.ndarray:
    u0, v0, u1, v1 = box
    full = cv2.resize(part, (u1 - u0, v1 - v0), interpolation=cv2.INTER_NEAREST)
    full = cv2.dilate(full, np.ones((3, 3), np.uint8))
    return crop_piece(image, full, box, mm_per_px, cfg, size)


class LazyCrop:
    """A blob's crop, cut when first asked for. Once cut it lets its frame go: whoever holds it (a track's
    view, a piece waiting for its decision) then holds a few kB, not the whole frame. Safe to call from two
    threads at once (both may cut; either result is the same)."""

    __slots__ = ("_args", "_crop")

    def __init__(
        self,
        image: np.ndarray,
        part: np.ndarray,
        box: tuple[int, int, int, int],
        mm_per_px: float,
        cfg: VisionConfig,
        size: int,
    ) -> None:
        self._args: tuple[Any, ...] | None = (image, part, box, mm_per_px, cfg, size)
        self._crop: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        crop = self._crop
        if crop is None:
            args = self._args
            if args is None:  # another thread has just cut it (it sets the crop first)
                crop = self._crop
                assert crop is not None
                return crop
            crop = self._crop = _cut(*args)
            self._args = None
        return crop


def materialise(crop: Crop) -> np.ndarray:
    return crop() if callable(crop) else crop


def _piece_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """255 where any channel is above `threshold` (the max-channel image thresholded, in one pass), opened
    to drop noise specks."""
    mask = cv2.bitwise_not(cv2.inRange(image, (0, 0, 0), (threshold, threshold, threshold)))
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


@dataclass(frozen=True, slots=True)
class _Region:
    """Masks of pieces in one patch of a segmentation image `scale` times smaller than the frame, the
    patch's corner at (x, y) of that image."""

    parts: list[np.ndarray]
    x: int
    y: int
    scale: int


def _parted(
    comp: np.ndarray, colour: np.ndarray, depth_px: float, cfg: VisionConfig, flood_scale: int = 1
) -> list[np.ndarray]:
    """`_split_touching`, then `_cut_concavities` on each part."""
    return [
        cut
        for part in _split_touching(comp, colour, cfg, flood_scale)
        for cut in _cut_concavities(part, colour, depth_px, cfg, cfg.cut_levels)
    ]


def _full_res_regions(
    image: np.ndarray, comp: np.ndarray, x: int, y: int, ds: int, mm_per_px: float, cfg: VisionConfig
) -> list[_Region]:
    """A blob found on the downscaled image that may hold touching pieces (`_may_be_parted`), segmented
    and parted again on the frame itself.

    Its box is cut from the frame with a pixel to spare, thresholded there, and kept to the pixels under
    the blob (a neighbour's edge in the margin is left out); at full resolution a narrow contact may
    already leave two components.
    """
    h, w = image.shape[:2]
    x0, y0 = max(x * ds - 1, 0), max(y * ds - 1, 0)
    x1, y1 = min((x + comp.shape[1]) * ds + 1, w), min((y + comp.shape[0]) * ds + 1, h)
    patch = image[y0:y1, x0:x1]
    under = np.zeros((y1 - y0, x1 - x0), np.uint8)
    big = cv2.resize(comp, (comp.shape[1] * ds, comp.shape[0] * ds), interpolation=cv2.INTER_NEAREST)
    under[y * ds - y0 : y * ds - y0 + big.shape[0], x * ds - x0 : x * ds - x0 + big.shape[1]] = big
    # holes of the downscaled blob stay holes; its outline may sit a pixel in or out at full resolution
    under = cv2.dilate(under, np.ones((3, 3), np.uint8))
    mask = cv2.bitwise_and(_piece_mask(patch, cfg.threshold), under)
    depth_px = cfg.cut_depth_mm / mm_per_px
    regions = []
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for contour in contours:
        cx, cy, cw, ch = cv2.boundingRect(contour)
        sub: np.ndarray = np.zeros((ch, cw), np.uint8)
        cv2.drawContours(sub, [contour], -1, 255, thickness=cv2.FILLED, offset=(-cx, -cy))
        sub = cv2.bitwise_and(sub, mask[cy : cy + ch, cx : cx + cw])
        colour = patch[cy : cy + ch, cx : cx + cw]
        regions.append(_Region(_parted(sub, colour, depth_px, cfg, ds), x0 + cx, y0 + cy, 1))
    return regions


def segment(
    image: np.ndarray,
    cfg: VisionConfig,
    mm_per_px: float,
    crop_size: int | None = 64,
    lazy: bool = False,
    full_res: bool = True,
) -> list[Blob]:
    """Find the pieces in one BGR frame; crops are cut when `crop_size` is given.

    Pieces are found on an image `vision.downscale` times smaller; a blob that may hold touching pieces
    (not convex, or with a hole) is parted on the frame itself when `vision.split_full_res` is set and
    `full_res` (False: this frame is parted on the smaller image, as by a vision thread that is behind).

    With `lazy`, a blob's crop is a function that cuts it later: the line classifies only a few
    views per piece, so most crops would be cut for nothing (the frame stays alive until then).
    """
    ds = cfg.downscale
    h, w = image.shape[:2]
    small = cv2.resize(image, (w // ds, h // ds), interpolation=cv2.INTER_AREA) if ds > 1 else image
    mask = _piece_mask(small, cfg.threshold)
    # outer contours are an order of magnitude cheaper than labelling the whole image
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    min_px = cfg.min_area_mm2 / (mm_per_px * ds) ** 2
    blobs: list[Blob] = []
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        if bw * bh < min_px:
            continue
        comp: np.ndarray = np.zeros((bh, bw), np.uint8)
        cv2.drawContours(comp, [contour], -1, 255, thickness=cv2.FILLED, offset=(-x, -y))
        comp = cv2.bitwise_and(comp, mask[y : y + bh, x : x + bw])  # keep holes (rings, washers) as holes
        if not cfg.split_touching:
            regions = [_Region([comp], x, y, ds)]
        elif ds > 1 and cfg.split_full_res and full_res and _may_be_parted(comp, cfg.cut_depth_mm / (mm_per_px * ds)):
            regions = _full_res_regions(image, comp, x, y, ds, mm_per_px, cfg)
        else:
            colour = small[y : y + bh, x : x + bw]
            regions = [_Region(_parted(comp, colour, cfg.cut_depth_mm / (mm_per_px * ds), cfg), x, y, ds)]
        for region in regions:
            blobs += _blobs(image, region, mm_per_px, cfg, crop_size, lazy)
    return blobs


def _blobs(
    image: np.ndarray, region: _Region, mm_per_px: float, cfg: VisionConfig, crop_size: int | None, lazy: bool
) -> list[Blob]:
    """One blob per part of `region` big enough to be a piece, in full-resolution pixels."""
    s, parts = region.scale, region.parts
    h, w = image.shape[:2]
    min_px = cfg.min_area_mm2 / (mm_per_px * s) ** 2
    edge = cfg.edge_margin_px * cfg.downscale  # in full-resolution pixels
    # a part's crop leaves out a seam along its touching neighbours (`vision.crop_seam_mm`); its area
    # and centroid keep every pixel
    seam_px = int(np.ceil(cfg.crop_seam_mm / (mm_per_px * s))) if len(parts) > 1 else 0
    blobs = []
    for i, part in enumerate(parts):
        m = cv2.moments(part, binaryImage=True)
        if m["m00"] < min_px:
            continue
        bx, by, bw, bh = cv2.boundingRect(part)
        px0, px1 = (region.x + bx) * s, (region.x + bx + bw) * s
        py0, py1 = (region.y + by) * s, (region.y + by + bh) * s
        top_bottom = py0 <= edge or py1 >= h - edge
        crop: Crop | None = None
        if crop_size and not top_bottom:  # partial views along the belt are never classified
            shown = part
            if seam_px:
                others = np.zeros_like(part)
                for j, other in enumerate(parts):
                    if j != i:
                        others = cv2.bitwise_or(others, other)
                near = cv2.dilate(others, np.ones((2 * seam_px + 1, 2 * seam_px + 1), np.uint8))
                kept = cv2.bitwise_and(part, cv2.bitwise_not(near))
                # a thin piece along its neighbour would lose most of itself to the seam: it keeps its mask
                shown = kept if cv2.countNonZero(kept) >= m["m00"] / 2 else part
            cut = LazyCrop(
                image,
                shown[by : by + bh, bx : bx + bw],
                (px0, py0, px1, py1),
                mm_per_px,
                cfg,
                crop_size,
            )
            crop = cut if lazy else cut()
        # pixel centres: segmentation pixel k covers full-res [k*s, (k+1)*s)
        blobs.append(
            Blob(
                cu=(region.x + m["m10"] / m["m00"] + 0.5) * s - 0.5,
                cv=(region.y + m["m01"] / m["m00"] + 0.5) * s - 0.5,
                u0=px0 - 0.5,
                u1=px1 - 0.5,
                v0=py0 - 0.5,
                v1=py1 - 0.5,
                area_px=m["m00"] * s * s,
                touches_top_bottom=top_bottom,
                touches_left_right=px0 <= edge or px1 >= w - edge,
                crop=crop,
            )
        )
    return blobs
