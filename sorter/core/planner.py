"""Ejection planning in encoder counts.

For each decided piece the planner picks the valves that cover its width and
the open/close counts at its bank from its leading and trailing edges plus
margins, centred on its centroid, with the valves' response delays taken off
at the current belt speed. The PLC fires at those counts, so PC jitter never
moves the ejection point.

It also protects product purity: if the air window would also hit a piece of
another fraction that is still on the belt at that bank, the window gives up its
margins or the edge valves over that neighbour; if the target is then no longer
covered, a window centred on it over part of it (a touching neighbour) may still
spare the neighbour (`ejection.min_footprint_share`); failing that, the expected
value decides (`ejection.conflict_value`), and by default the ejection is skipped
(the target goes to the default fraction).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sorter.core.geometry import valve_span, valves_covering
from sorter.core.messages import Decision, EjectCommand, Outcome, Piece

if TYPE_CHECKING:
    from sorter.config import EjectionConfig, LineConfig


@dataclass(frozen=True, slots=True)
class Plan:
    decision: Decision
    command: EjectCommand | None
    outcome: Outcome  # PLANNED (with a command), NO_EJECT, CONFLICT, NO_SPEED


def mask_of(valves: list[int]) -> int:
    m = 0
    for v in valves:
        m |= 1 << v
    return m


RECENT = 256  # decisions remembered as neighbours of the next ones


def _without_pixels(d: Decision) -> Decision:
    """The decision as a neighbour: everything but its piece's crops."""
    return replace(d, piece=replace(d.piece, crops=[])) if d.piece.crops else d


class EjectPlanner:
    @classmethod
    def for_line(cls, cfg: LineConfig) -> EjectPlanner:
        return cls(
            cfg.ejection,
            [b.fraction for b in cfg.ejection.banks],
            cfg.belt.counts_per_mm,
            routes={c: f for c, f in cfg.routing.classes.items()},
        )

    def __init__(
        self,
        cfg: EjectionConfig,
        fractions_by_bank: list[str],
        counts_per_mm: float,
        routes: dict[str, str] | None = None,
    ) -> None:
        """`routes`: class -> fraction (routing.classes), to weigh a conflict by the pieces' probabilities."""
        self._cfg = cfg
        self._routes = routes or {}
        self._cpm = counts_per_mm
        self._bank_of = {f: i for i, f in enumerate(fractions_by_bank)}
        # the latest decisions, as neighbours of the next ones: their geometry, fraction and probabilities,
        # never their pixels (a crop, or a lazy cutter holding a whole camera frame: 256 of those were ~1.6 GB)
        self._recent: deque[Decision] = deque(maxlen=RECENT)
        self._leaves_at: dict[int, int | None] = {}  # piece id -> bank its command goes to (None: stays on)

    def _coverage(self, valves: list[int], x0: float, x1: float) -> float:
        if x1 <= x0:
            return 1.0
        covered = sum(max(0.0, min(x1, b) - max(x0, a)) for a, b in (valve_span(self._cfg, v) for v in valves))
        return covered / (x1 - x0)

    def _stays_to(self, d: Decision, bank: int) -> bool:
        """Is this neighbour still on the belt when it reaches `bank`?

        Judged by its own plan where it has one: a magnet whose ejection was skipped rides on past its
        bank, and must not be blown into a later fraction with its neighbour.
        """
        own = self._leaves_at[d.piece.id] if d.piece.id in self._leaves_at else self._bank_of.get(d.fraction)
        return own is None or own >= bank

    def plan(self, decisions: list[Decision], speed_mm_s: float) -> list[Plan]:
        """Plan a batch of decisions (neighbours decided in the same batch are known)."""
        self._recent.extend(_without_pixels(d) for d in decisions)
        # upstream banks first: whether a piece really leaves at bank A decides conflicts at bank B
        order = sorted(range(len(decisions)), key=lambda i: self._bank_of.get(decisions[i].fraction, 99))
        by_index: dict[int, Plan] = {}
        for i in order:
            d = decisions[i]
            by_index[i] = plan = self._plan_one(d, speed_mm_s)
            self._leaves_at[d.piece.id] = plan.command.bank if plan.command else None
        plans = [by_index[i] for i in range(len(decisions))]
        if len(self._leaves_at) > 1024:
            recent = {n.piece.id for n in self._recent}
            self._leaves_at = {k: v for k, v in self._leaves_at.items() if k in recent}
        return plans

    def _plan_one(self, d: Decision, speed_mm_s: float) -> Plan:
        cfg, cpm, p = self._cfg, self._cpm, d.piece
        bank = self._bank_of.get(d.fraction)
        if bank is None:
            return Plan(d, None, Outcome.NO_EJECT)
        if speed_mm_s <= 0:
            return Plan(d, None, Outcome.NO_SPEED)
        half = max(p.u - p.u_lead + cfg.margin_lead_mm * cpm, p.u_trail - p.u + cfg.margin_trail_mm * cpm)
        full_open, full_close = p.u - half, p.u + half
        full_valves = valves_covering(cfg, p.x0 - cfg.margin_side_mm, p.x1 + cfg.margin_side_mm)
        open_u, close_u, valves = full_open, full_close, list(full_valves)
        # the window may give up its margins (never the piece itself) to spare a neighbour: the air then
        # still covers the whole piece and its centre moves by at most half a margin
        latest_open, earliest_close = p.u_lead, p.u_trail
        gap = 0.5 * cpm
        # neighbours of another fraction, still on the belt at this bank, that the full window would hit
        others = [
            n
            for n in self._recent
            if n.piece.u_trail > full_open  # along first: most of the recent pieces are far from this one
            and n.piece.u_lead < full_close
            and n.piece.id != p.id
            and n.fraction != d.fraction
            and self._stays_to(n, bank)
            and self._hits(n.piece, full_open, full_close, full_valves)
        ]
        for n in others:
            q = n.piece
            if not self._hits(q, open_u, close_u, valves):
                continue  # the air barely touches it: it stays on the belt
            # a neighbour ahead or behind: open later / close earlier (the centre shifts a little)
            if (
                q.u < p.u
                and q.u_trail + gap <= latest_open
                and not self._hits(q, max(open_u, q.u_trail + gap), close_u, valves)
            ):
                open_u = max(open_u, q.u_trail + gap)
                continue
            if (
                q.u > p.u
                and q.u_lead - gap >= earliest_close
                and not self._hits(q, open_u, min(close_u, q.u_lead - gap), valves)
            ):
                close_u = min(close_u, q.u_lead - gap)
                continue
            # beside it: drop valves over the neighbour, the one most over it first, until the air barely
            # touches it (an edge valve grazing it may stay: the target keeps more of its air)
            over = sorted(valves, key=lambda v: -self._coverage([v], q.x0, q.x1))
            for v in over:
                if not self._hits(q, open_u, close_u, valves) or self._coverage([v], q.x0, q.x1) <= 0:
                    break
                valves.remove(v)
        if not valves or self._coverage(valves, p.x0, p.x1) < cfg.min_valve_coverage:
            # the whole piece cannot have its air without a neighbour: a window over part of the piece
            # (a touching pair whose boxes overlap diagonally: shortened along and narrowed across at once)
            trimmed = self._trim_over_piece(p, full_open, full_close, full_valves, [n.piece for n in others])
            if trimmed is not None:
                open_u, close_u, valves = trimmed
            elif not cfg.protect_purity or self._worth_blowing_both(d, others, full_open, full_close, full_valves):
                open_u, close_u, valves = full_open, full_close, list(full_valves)
            else:
                return Plan(d, None, Outcome.CONFLICT)
        counts_per_ms = speed_mm_s * cpm / 1000.0
        row = cfg.banks[bank].distance_mm * cpm
        open_at = round(open_u + row - cfg.valve_open_delay_ms * counts_per_ms)
        close_at = round(close_u + row - cfg.valve_close_delay_ms * counts_per_ms)
        cmd = EjectCommand(
            piece_id=p.id, bank=bank, valve_mask=mask_of(valves), open_at=open_at, open_for=max(1, close_at - open_at)
        )
        return Plan(d, cmd, Outcome.PLANNED)

    def _hits(self, q: Piece, lo: float, hi: float, valves: list[int]) -> bool:
        """Whether air over [lo, hi] (counts) from `valves` covers more than `neighbour_hit_share` of q."""
        return self._share(q, lo, hi, valves) > self._cfg.neighbour_hit_share

    def _share(self, q: Piece, lo: float, hi: float, valves: list[int]) -> float:
        """Share of q's footprint (its box: along x across) under air over [lo, hi] from `valves`."""
        along = max(0.0, min(q.u_trail, hi) - max(q.u_lead, lo)) / max(q.u_trail - q.u_lead, 1.0)
        return along * self._coverage(valves, q.x0, q.x1)

    def _trim_over_piece(
        self, p: Piece, full_open: float, full_close: float, full_valves: list[int], others: list[Piece]
    ) -> tuple[float, float, list[int]] | None:
        """The window that puts the most air on p while hitting none of `others`: centred on p's centroid
        and shortened to the nearest neighbour's edge along, over a run of p's valves across, covering at
        least `ejection.min_footprint_share` of p's footprint (its box). Centred, because a jet that
        pushes a piece off its centre of mass spins it off its trajectory (and a shifted window would
        also shift where the air meets the piece by the whole trim). None if there is no such window."""
        # where two pieces touch, segmentation places the border between them only to within a few mm:
        # the window stops `touching_gap_mm` short of the neighbour's edge as the records have it
        cfg, gap = self._cfg, self._cfg.touching_gap_mm * self._cpm
        if cfg.min_footprint_share >= 1.0 or not full_valves:
            return None
        halves = {min(p.u - full_open, full_close - p.u)}
        halves |= {p.u - (q.u_trail + gap) for q in others if full_open < q.u_trail + gap < p.u}
        halves |= {q.u_lead - gap - p.u for q in others if p.u < q.u_lead - gap < full_close}
        runs = [
            full_valves[a:b]
            for a in range(len(full_valves))
            for b in range(a + 1, len(full_valves) + 1)
            if valve_span(cfg, full_valves[a])[0] <= p.x <= valve_span(cfg, full_valves[b - 1])[1]
        ]
        best: tuple[float, float, list[int]] | None = None
        for h in sorted(halves, reverse=True):
            for run in runs:
                if any(self._hits(q, p.u - h, p.u + h, run) for q in others):
                    continue
                share = self._share(p, p.u - h, p.u + h, run)
                if share >= cfg.min_footprint_share and (best is None or share > best[0]):
                    best = (share, h, run)
        return None if best is None else (p.u - best[1], p.u + best[1], list(best[2]))

    def _worth_blowing_both(self, d: Decision, others: list[Decision], lo: float, hi: float, valves: list[int]) -> bool:
        """Expected value of ejecting d with the neighbours its air cannot spare: d's recovery, worth
        `ejection.conflict_value[fraction]` times the probability that d belongs there, against the
        pieces of another fraction expected in with it (each neighbour hit, weighted by the
        probability that it does not belong there), each worth -1. Sparing both is worth 0."""
        value = self._cfg.conflict_value.get(d.fraction, 0.0)
        if value <= 0:
            return False
        expected_in = sum(1.0 - self._belongs(n, d.fraction) for n in others if self._hits(n.piece, lo, hi, valves))
        return value * self._belongs(d, d.fraction) > expected_in

    def _belongs(self, d: Decision, fraction: str) -> float:
        """Probability that d's piece belongs to `fraction`, from its decision's class probabilities
        (the routed fraction alone where the planner does not know the routing or the probabilities)."""
        if not self._routes or not d.probs:
            return 1.0 if d.fraction == fraction else 0.0
        total = sum(d.probs.values())
        inside = sum(pr for c, pr in d.probs.items() if self._routes.get(c) == fraction)
        return inside / total if total > 0 else 0.0
