"""Ejection physics and bins: where every simulated piece really ends up.

A valve window is where the belt was while the air was really on: from the
count the PLC fired at plus the valve's true response delay, to the close
count plus its close delay. A piece is deflected when the open valves cover
enough of it as it crosses the valve row, so neighbours can be co-ejected.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.config import SimConfig
from sorter.config import EjectionConfig
from sorter.core.geometry import valve_span

DEFLECT_SHARE = 0.3  # share of the piece's footprint the air must hit to deflect it


@dataclass(frozen=True, slots=True)
class Window:
    seq: int
    bank: int
    p_open: float  # belt position (mm) when the air came on
    p_close: float
    spans: tuple[tuple[float, float], ...]  # across-belt spans of the open valves (mm)
    open_at: int
    open_for: int

    @property
    def centre(self) -> float:
        return (self.p_open + self.p_close) / 2


@dataclass(slots=True)
class Outcome:
    piece_id: int
    bin: str
    bank: int | None
    seq: int | None  # the window that deflected it
    err_mm: float | None  # that window's centre minus the piece centroid's crossing, along the belt
    p_binned: float


def valve_spans(cfg: EjectionConfig, mask: int) -> tuple[tuple[float, float], ...]:
    spans: list[tuple[float, float]] = []
    for v in range(cfg.valves_per_bank):
        if mask >> v & 1:
            a, b = valve_span(cfg, v)
            if spans and abs(spans[-1][1] - a) < 1e-9:
                spans[-1] = (spans[-1][0], b)
            else:
                spans.append((a, b))
    return tuple(spans)


class EjectionPhysics:
    def __init__(self, ejection: EjectionConfig, sim: SimConfig, counts_per_mm: float, encoder_start: int) -> None:
        self._cfg = ejection
        self._sim = sim
        self._cpm = counts_per_mm
        self._start = encoder_start
        self._rows = [b.distance_mm for b in ejection.banks]
        self._fractions = [b.fraction for b in ejection.banks]
        self._windows: list[list[Window]] = [[] for _ in ejection.banks]
        self.windows_log: list[Window] = []

    def position_of(self, count: float) -> float:
        return (count - self._start) / self._cpm

    def fire(self, seq: int, bank: int, mask: int, open_at: int, open_for: int, speed_mm_s: float) -> Window:
        """The PLC fired a command (exact counts, unwrapped like the belt's)."""
        w = Window(
            seq,
            bank,
            self.position_of(open_at) + speed_mm_s * self._sim.valve_open_delay_ms / 1000,
            self.position_of(open_at + open_for) + speed_mm_s * self._sim.valve_close_delay_ms / 1000,
            valve_spans(self._cfg, mask),
            open_at,
            open_for,
        )
        self._windows[bank].append(w)
        self.windows_log.append(w)
        return w

    def _hit(self, w: Window, s: float, row: float, dy_lead: float, dy_trail: float, x0: float, x1: float) -> float:
        # the piece's point at along-offset dy crosses the row when the belt is at s + row - dy
        a, b = s + row - dy_lead, s + row - dy_trail
        along = max(0.0, min(b, w.p_close) - max(a, w.p_open)) / max(b - a, 1e-9)
        across = sum(max(0.0, min(x1, hi) - max(x0, lo)) for lo, hi in w.spans) / max(x1 - x0, 1e-9)
        return along * across

    def settle(self, piece, belt_pos: float, belt_end_mm: float, residue: str) -> Outcome | None:
        """Where the piece went, once the belt has carried it past every row; else None.

        `piece` is a sim.feed.SimPiece (x_mm, s_mm, dx0, dx1, dy_lead, dy_trail).
        """
        x0, x1 = piece.x_mm + piece.dx0, piece.x_mm + piece.dx1
        for bank, row in enumerate(self._rows):
            passed_at = piece.s_mm + row - piece.dy_trail + 30.0  # all air that could touch it is in by then
            if belt_pos < passed_at:
                return None
            best, share = None, 0.0
            for w in self._windows[bank]:
                if w.p_open > passed_at or w.p_close < piece.s_mm + row - piece.dy_lead:
                    continue
                h = self._hit(w, piece.s_mm, row, piece.dy_lead, piece.dy_trail, x0, x1)
                if h > share:
                    best, share = w, h
            if best is not None and share >= DEFLECT_SHARE:
                return Outcome(
                    piece.id, self._fractions[bank], bank, best.seq, best.centre - (piece.s_mm + row), belt_pos
                )
        if belt_pos < piece.s_mm + belt_end_mm - piece.dy_trail:
            return None
        return Outcome(piece.id, residue, None, None, None, belt_pos)

    def forget_before(self, belt_pos: float) -> None:
        """Drop windows no piece can meet any more (keeps the search short)."""
        for bank in range(len(self._windows)):
            self._windows[bank] = [w for w in self._windows[bank] if w.p_close > belt_pos - 2000.0]
