"""How segmentation parts touching pieces, frame by frame: `sorter sim touching --seeds 3,5,11,12`.

The simulated feed's pieces are grouped into clusters of pieces that touch (single pieces are clusters of
one); each cluster is rendered alone, in the middle of one wide frame, and segmented. A piece is found if a
blob's centroid lies within `MATCH_MM` of its true centroid (one blob per piece, nearest first, as the demo
report matches records). Counted per kind of piece (touching or single):

- lost: no blob of its own (merged with a neighbour, or its blob misplaced by more than `MATCH_MM`);
- off_1mm: found, but its centroid more than 1 mm off (the air window is planned on it);
- fragments: blobs that found no piece (a piece cut in two).

A frame-level figure for tuning `vision.*`: it leaves out what the line adds (several views per piece,
tracking, the edges of the field). The line's own figures come from `sorter sim envelope`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from sim.config import SimFeedConfig
from sim.feed import FeedGenerator, SimPiece, outlines_intersect
from sim.render import FrameRenderer, render_sprite
from sim.report import MATCH_MM
from sorter.config import VisionConfig
from sorter.core.geometry import CameraGeometry
from sorter.vision.segment import segment

MM_PER_PX = 0.25
BELT_MM = 600.0
FRAME = (720, 2480)  # rows, columns: the whole belt width in one view, 180 mm along it
HALF_VIEW_MM = 85.0  # clusters reaching farther from the frame's centre line are left out


def _belt_outline(p: SimPiece) -> np.ndarray:
    """A piece's outline in belt (x, s) mm."""
    return p.outline * np.array([1.0, -1.0]) + np.array([p.x_mm, p.s_mm])


def clusters(pieces: Sequence[SimPiece]) -> list[list[SimPiece]]:
    """The pieces grouped by touching (outlines that meet), each group in feed order."""
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, p in enumerate(pieces):
        for j in range(i):
            q = pieces[j]
            if math.hypot(p.x_mm - q.x_mm, p.s_mm - q.s_mm) > p.radius_mm + q.radius_mm + 0.5:
                continue
            if outlines_intersect(_belt_outline(p), _belt_outline(q)):
                parent[root(i)] = root(j)
    groups: dict[int, list[SimPiece]] = {}
    for i, p in enumerate(pieces):
        groups.setdefault(root(i), []).append(p)
    return list(groups.values())


def measure(
    seed: int,
    vision: VisionConfig,
    *,
    touching: float = 0.15,
    rate: float = 60.0,
    speed: float = 2000.0,
    s_mm: float = 60_000,
) -> dict[str, float]:
    """The counts for one feed seed (see the module's docstring)."""
    feed = SimFeedConfig(touching_share=touching, rate_per_s=rate)
    pieces = FeedGenerator(feed, BELT_MM, speed, seed=seed).pieces_until(s_mm)
    geom = CameraGeometry(FRAME[1], FRAME[0], (BELT_MM / 2, 0.0), MM_PER_PX)
    renderer = FrameRenderer(geom, noise_sigma=3.0, seed=seed)
    frame = np.empty((*FRAME, 3), np.uint8)
    counts: Counter[str] = Counter()
    errors: list[float] = []
    seconds = 0.0
    for group in clusters(pieces):
        pos = float(np.mean([p.s_mm for p in group]))
        if max(abs(pos - p.s_mm) + p.radius_mm for p in group) > HALF_VIEW_MM:
            continue
        renderer.render([(p, render_sprite(p, MM_PER_PX)) for p in group], pos, frame)
        t0 = time.perf_counter()
        blobs = segment(frame, vision, MM_PER_PX, crop_size=None)
        seconds += time.perf_counter() - t0
        found = np.array([geom.px_to_mm(b.cu, b.cv) for b in blobs]).reshape(-1, 2)
        truth = np.array([(p.x_mm, pos - p.s_mm) for p in group])
        dist = np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1])
        matched: dict[int, float] = {}
        used: set[int] = set()
        for b, k in sorted(np.ndindex(dist.shape), key=lambda bk: dist[bk]):
            if dist[b, k] < MATCH_MM and b not in used and k not in matched:
                used.add(b)
                matched[k] = float(dist[b, k])
        kind = "touching" if len(group) > 1 else "single"
        counts[f"{kind}_pieces"] += len(group)
        counts[f"{kind}_lost"] += len(group) - len(matched)
        counts[f"{kind}_off_1mm"] += sum(e > 1.0 for e in matched.values())
        counts[f"{kind}_fragments"] += len(blobs) - len(used)
        counts["clusters"] += 1
        errors += matched.values()
    out: dict[str, float] = dict(counts)
    out["centroid_error_p99_mm"] = round(float(np.percentile(errors, 99)), 3) if errors else math.nan
    out["segment_ms_per_cluster"] = round(1000 * seconds / max(counts["clusters"], 1), 2)
    return out


def report(seeds: Sequence[int], vision: VisionConfig, touching: float = 0.15) -> list[dict[str, float]]:
    """One row per seed, then their totals (`seed` -1)."""
    rows: list[dict[str, float]] = []
    total: Counter[str] = Counter()
    for seed in seeds:
        row = {"seed": seed, **measure(seed, vision, touching=touching)}
        rows.append(row)
        total.update({k: int(v) for k, v in row.items() if k.startswith(("touching_", "single_"))})
    rows.append({"seed": -1, **dict(sorted(total.items()))})
    return rows
