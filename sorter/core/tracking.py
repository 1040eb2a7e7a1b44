"""Tracking by belt displacement: every physical piece becomes exactly one Piece.

A piece rides the belt, so its belt-fixed coordinate u (the encoder count at
which it crosses the cameras' centre line) stays the same in every view, from
either camera. Views are grouped by u and across-belt overlap; a track is
finalised once every active camera has seen the belt move past the piece's
trailing edge by `settle_mm`, so all its views (and its neighbours) are in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, NamedTuple

from sorter.core.geometry import CameraGeometry
from sorter.core.messages import Detection, Piece

if TYPE_CHECKING:
    from sorter.config import LineConfig, TrackingConfig

AREA_SLACK = 1.3  # views of one piece differ in area by segmentation noise (a few %), far less than this
# the pieces a merged view shows make up its area (less their overlap, plus segmentation noise); fragments of
# an overlap, cut off in a frame or two, make up far less of either piece
MERGED_COVER = 0.8
MERGED_SLACK_MM = 2.0  # a merged view's extent is its pieces' union, give or take segmentation noise (~1 px)
MATCH_MARGIN_MM = 2.0  # across the belt, a partial view may reach this far past its track's extent


class _Box(NamedTuple):
    """A piece's extent: along the belt in counts (u), across in mm."""

    u_lead: float
    u_trail: float
    x0: float
    x1: float

    def inside(self, other: _Box, slack_u: float, slack_mm: float) -> bool:
        return (
            self.u_lead > other.u_lead - slack_u
            and self.u_trail < other.u_trail + slack_u
            and self.x0 > other.x0 - slack_mm
            and self.x1 < other.x1 + slack_mm
        )


class _Decided(NamedTuple):
    """What a decided piece leaves for the tracker: its extent, to recognise late views and merged ones."""

    u: float
    u_lead: float
    u_trail: float
    x0: float
    x1: float
    area: float


def _same_piece(
    d: Detection, u: float, u_lead: float, u_trail: float, x0: float, x1: float, gate: float, margin_mm: float
) -> bool:
    """Across extents overlap, and the along centres agree or the along extents mostly overlap.

    The extent test catches views cut by a frame or camera edge, whose centres shift.
    """
    if d.x0 > x1 + margin_mm or d.x1 < x0 - margin_mm:
        return False
    if abs(d.u - u) <= gate:
        return True
    overlap = min(d.u_trail, u_trail) - max(d.u_lead, u_lead)
    return overlap > 0.5 * min(d.u_trail - d.u_lead, u_trail - u_lead)


def _whole(d: Detection) -> bool:
    return not d.cut_along and not d.cut_across


@dataclass
class _Track:
    id: int
    views: list[Detection] = field(default_factory=list)
    out_of_view: bool = False  # handed out by Tracker.viewed()

    def centre(self) -> tuple[float, float] | None:
        """(u, x) from the views that show the whole piece, None before there is one."""
        whole = [d for d in self.views if _whole(d)]
        if not whole:
            return None
        return float(median([d.u for d in whole])), float(median([d.x for d in whole]))

    def n_whole(self) -> int:
        return sum(1 for d in self.views if _whole(d))

    def area(self) -> float:
        """mm², from the views that show the whole piece, else from all of them."""
        whole = [d.area_mm2 for d in self.views if _whole(d)]
        return float(median(whole or [d.area_mm2 for d in self.views]))

    def box(self) -> _Box:
        return _Box(self.u_lead, self.u_trail, self.x0, self.x1)

    def seen_whole_at(self, u: float, x: float) -> bool:
        """Whether (u, x) lies within the extent of a view that shows the whole piece. Not the track's box:
        a partial view that joined it (a neighbour's, merged by a camera's edge) may stretch that over the
        piece beside it."""
        return any(d.u_lead < u < d.u_trail and d.x0 < x < d.x1 for d in self.views if _whole(d))

    def _full(self) -> list[Detection]:
        full = [d for d in self.views if not d.cut_along]
        return full or self.views

    @property
    def u(self) -> float:
        return float(median([d.u for d in self._full()]))

    @property
    def u_trail(self) -> float:
        return max(d.u_trail for d in self.views)

    @property
    def x0(self) -> float:
        return min(d.x0 for d in self.views)

    @property
    def x1(self) -> float:
        return max(d.x1 for d in self.views)

    @property
    def u_lead(self) -> float:
        return min(d.u_lead for d in self.views)

    def matches(self, d: Detection, gate: float, gate_mm: float, margin_mm: float) -> bool:
        """Whole views match by centre (so a view of two touching pieces that segmentation failed to
        split starts a track of its own instead of gluing two pieces together); partial views, whose
        centres shift, match by overlapping extents."""
        c = self.centre()
        if c is not None and _whole(d):
            return abs(d.u - c[0]) <= gate and abs(d.x - c[1]) <= gate_mm
        return self._area_fits(d) and _same_piece(
            d, self.u, self.u_lead, self.u_trail, self.x0, self.x1, gate, margin_mm
        )

    def _area_fits(self, d: Detection) -> bool:
        """A view cut by an edge shows part of its piece: never much more than a whole view of it. (A small
        piece lying in the bounding box of a big one that no camera sees whole is not a view of it.)"""
        if _whole(d):
            parts = [v.area_mm2 for v in self.views if not _whole(v)]
            return not parts or d.area_mm2 * AREA_SLACK >= max(parts)
        whole = [v.area_mm2 for v in self.views if _whole(v)]
        return not whole or d.area_mm2 <= AREA_SLACK * float(median(whole))

    def to_piece(self, max_views: int) -> Piece:
        # the best views available: whole, else whole along the belt (cut by a camera's side), else any
        best = [d for d in self.views if _whole(d)] or self._full()
        whole_across = any(not d.cut_across for d in best)
        crops_from = sorted(best, key=lambda d: -d.area_mm2)[:max_views]
        return Piece(
            id=self.id,
            u=float(median([d.u for d in best])),
            u_lead=float(median([d.u_lead for d in best])),
            u_trail=float(median([d.u_trail for d in best])),
            # a piece in the overlap may be cut by both cameras' edges: then only the union is whole
            x=float(median([d.x for d in best])) if whole_across else (self.x0 + self.x1) / 2,
            x0=self.x0,
            x1=self.x1,
            area_mm2=float(median([d.area_mm2 for d in best])),
            cameras=tuple(sorted({d.camera for d in self.views})),
            n_views=len(self.views),
            crops=[d.crop for d in crops_from if d.crop is not None],
            t_first_capture=min(d.t_capture for d in self.views),
            t_last_capture=max(d.t_capture for d in self.views),
        )


class Tracker:
    @classmethod
    def for_line(cls, cfg: LineConfig, geoms: dict[str, CameraGeometry]) -> Tracker:
        return cls(
            {n: g.field_mm()[3] for n, g in geoms.items()},
            cfg.tracking,
            cfg.belt.counts_per_mm,
            cfg.classifier.max_views,
            # how far an ejection window reaches beyond its piece: along by the margins, across by a valve
            neighbour_mm=(cfg.ejection.margin_lead_mm + cfg.ejection.margin_trail_mm, cfg.ejection.valve_pitch_mm),
        )

    def __init__(
        self,
        fields_y_max_mm: dict[str, float],
        cfg: TrackingConfig,
        counts_per_mm: float,
        max_views: int,
        neighbour_mm: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """`fields_y_max_mm`: per camera, the most downstream belt y (mm) it sees.
        `neighbour_mm`: (along, across) reach of a piece's ejection window beyond the piece; a piece is
        not finalised while a piece within that reach is still being tracked."""
        self._field_end = fields_y_max_mm
        self._cpm = counts_per_mm
        self._gate = cfg.gate_mm * counts_per_mm
        self._gate_mm = cfg.gate_mm
        self._settle = cfg.settle_mm * counts_per_mm
        self._max_views = max_views
        self._reach_along = neighbour_mm[0] * counts_per_mm
        self._reach_across = neighbour_mm[1]
        self._tracks: list[_Track] = []
        self._done: list[_Decided] = []
        self._next_id = 1
        self.watermark: dict[str, int] = {}
        self.late_views = 0  # views that arrived after their piece was decided
        self.partial_views = 0  # edge slivers of pieces tracked whole elsewhere, dropped
        self.merged_views = 0  # views of touching pieces seen as one blob, dropped in favour of the split views
        self.dropped: list[int] = []  # ids of tracks finalise() dropped (merged views, slivers) since take_dropped()

    @property
    def open_tracks(self) -> int:
        return len(self._tracks)

    def advance(self, camera: str, count: int) -> None:
        """A frame of this camera at this count: the belt it has seen pass (before its detections are added)."""
        self.watermark[camera] = max(count, self.watermark.get(camera, count))

    def add(self, camera: str, count: int, detections: Iterable[Detection]) -> None:
        """One frame's detections. A frame shows each piece once, so each track takes at most one of them,
        the nearest first: two small pieces side by side within the gate of one track (a disc beside a
        wire, seen as one blob in the frame before) do not both join it."""
        self.advance(camera, count)
        fresh = []
        for d in detections:
            if any(_same_piece(d, p.u, p.u_lead, p.u_trail, p.x0, p.x1, self._gate, 0.0) for p in self._done):
                self.late_views += 1
            else:
                fresh.append(d)
        # a track's box widened by the gates holds every view it can match (a centre lies in its extent):
        # tested first, it spares the medians of `matches` for the tracks far away
        boxes = [t.box() for t in self._tracks]
        reach_mm = max(self._gate_mm, MATCH_MARGIN_MM)
        pairs = sorted(
            (abs(t.u - d.u), i, k)
            for i, d in enumerate(fresh)
            for k, (t, b) in enumerate(zip(self._tracks, boxes, strict=True))
            if d.u_trail >= b.u_lead - self._gate
            and d.u_lead <= b.u_trail + self._gate
            and d.x1 >= b.x0 - reach_mm
            and d.x0 <= b.x1 + reach_mm
            and t.matches(d, self._gate, self._gate_mm, MATCH_MARGIN_MM)
        )
        assigned: dict[int, _Track] = {}
        taken: set[int] = set()
        for _, i, k in pairs:
            if i not in assigned and k not in taken:
                assigned[i] = self._tracks[k]
                taken.add(k)
        for i, d in enumerate(fresh):
            track = assigned.get(i)
            if track is None:
                track = _Track(self._next_id)
                self._next_id += 1
                self._tracks.append(track)
            track.views.append(d)

    def _passed(self, active_cameras: Iterable[str]) -> float | None:
        """The belt-fixed u that every active camera has seen leave its field; None while an active camera
        has not reported yet (it may still see any piece)."""
        active = list(active_cameras)
        if not active or any(c not in self.watermark for c in active):
            return None
        return min(self.watermark[c] - self._field_end[c] * self._cpm for c in active)

    def viewed(self, active_cameras: Iterable[str]) -> list[Piece]:
        """Pieces that have left every active camera's field since the last call, not yet finalised.

        Their views are in, so they can be classified while the tracker waits out `settle_mm` for their
        neighbours: the finalising frame then leaves only fusion and planning to do. Provisional: such a
        piece is later finalised (with the same views, as a rule: compare `n_views`) or dropped (`dropped`).
        """
        passed = self._passed(active_cameras)
        if passed is None:
            return []
        out = [t for t in self._tracks if not t.out_of_view and t.u_trail < passed]
        for t in out:
            t.out_of_view = True
        return [t.to_piece(self._max_views) for t in out]

    def take_dropped(self) -> list[int]:
        """The ids of the tracks finalise() dropped since the last call (no piece will come of them)."""
        out, self.dropped = self.dropped, []
        return out

    def finalise(self, active_cameras: Iterable[str]) -> list[Piece]:
        """Pieces that no active camera can see again, in belt order (leading first)."""
        passed = self._passed(active_cameras)
        if passed is None:
            return []
        ready = [t for t in self._tracks if t.u_trail + self._settle < passed]
        waiting = [t for t in self._tracks if t.u_trail + self._settle >= passed]
        # a piece whose air window could reach a neighbour still being tracked (a long piece right behind
        # it) waits for that neighbour, so that the planner knows both when it plans either
        while blocked := [t for t in ready if any(self._within_reach(t, q) for q in waiting)]:
            ready = [t for t in ready if t not in blocked]
            waiting += blocked
        if not ready:
            return []
        self._tracks = waiting
        kept = self._drop_merged(ready)
        kept_ids = {t.id for t in kept}
        self.dropped += [t.id for t in ready if t.id not in kept_ids]
        ready = kept
        pieces = sorted((t.to_piece(self._max_views) for t in ready), key=lambda p: p.u)
        self._done.extend(_Decided(p.u, p.u_lead, p.u_trail, p.x0, p.x1, p.area_mm2) for p in pieces)
        horizon = passed - 4 * self._settle - 400 * self._cpm
        self._done = [d for d in self._done if d.u_trail > horizon]
        return pieces

    def _within_reach(self, t: _Track, q: _Track) -> bool:
        r, a = self._reach_along, self._reach_across
        return q.u_lead < t.u_trail + r and q.u_trail > t.u_lead - r and q.x0 < t.x1 + a and q.x1 > t.x0 - a

    def _drop_merged(self, ready: list[_Track]) -> list[_Track]:
        """A track whose extent holds two or more other tracks that together make up most of its area is a
        view of touching pieces that other frames did split: the split tracks stand for those pieces. Only
        tracks seen whole at least half as often count: a fragment that one frame cut off a piece (seen
        whole in four frames) is no evidence that the piece was two. Extents, not centres: a piece lying
        across another holds its neighbour's centre, not its extent, and fragments cut out of their overlap
        make up far less than either. A dropped track stands for nothing, and the largest are judged
        first: of a merged view and its parts the parts stay, never neither."""
        standing: list[tuple[_Track | None, _Box, float]] = [
            (t, t.box(), t.area()) for t in ready + self._tracks if t.n_whole()
        ]
        standing += [(None, _Box(d.u_lead, d.u_trail, d.x0, d.x1), d.area) for d in self._done]
        slack = (MERGED_SLACK_MM * self._cpm, MERGED_SLACK_MM)
        dropped: set[int] = set()
        keep = []
        for t in sorted(ready, key=lambda t: -t.area()):
            seen, box = t.n_whole(), t.box()
            parts = [
                area
                for o, part, area in standing
                if o is not t
                and (o is None or (o.id not in dropped and 2 * o.n_whole() >= seen))
                and part.inside(box, *slack)
            ]
            if len(parts) >= 2 and sum(parts) >= MERGED_COVER * t.area():
                dropped.add(t.id)
                self.merged_views += len(t.views)
                continue
            if t.centre() is None:
                # only ever seen cut by a camera's edge, inside a piece some camera saw whole: a sliver
                # of that piece that did not join its track, not a piece of its own
                u = float(median([d.u for d in t.views]))
                x = float(median([d.x for d in t.views]))
                if any(o is not None and o.id not in dropped and o.seen_whole_at(u, x) for o, _, _ in standing) or any(
                    d.u_lead < u < d.u_trail and d.x0 < x < d.x1 for d in self._done
                ):
                    self.partial_views += len(t.views)
                    continue
            keep.append(t)
        return keep

    def flush(self) -> list[Piece]:
        """Finalise everything (at shutdown): a piece that was seen is never silently lost."""
        pieces = sorted((t.to_piece(self._max_views) for t in self._tracks), key=lambda p: p.u)
        self._tracks = []
        return pieces
