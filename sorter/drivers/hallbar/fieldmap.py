"""The Hall bar's readings placed on the belt, and the field of one piece looked up in them.

Each data line holds, per channel, the peak reading over the interval since the
previous data line: [previous t_us, this t_us] in board time. The link turns
those into PC times; here they become unwrapped encoder counts through the
service's clock model (`count_at`), at once, while the clock model's line is
still the one that was valid then. A ring of (count_start, count_end, values)
is what a decision looks up.

A piece's belt-fixed extent at the cameras' line is [u_lead, u_trail] counts;
it passes the sensor row `distance_mm` later, so its readings lie in
[u_lead, u_trail] + distance·counts_per_mm, widened by `margin_mm` on both
sides for the field reaching beyond the piece's footprint (about the lift-off).

After a lost line (a sequence gap, a reconnect, a clock step) the next line's
interval start is unknown: it is stored from the end of the last known line,
flagged, and any window it touches is reported incomplete, since the lost
line's peak may have been the piece's.

Thread-safe: the bar's reader thread adds, the service's loop queries.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sorter.config import MagnetometerConfig
from sorter.drivers.hallbar.link import BarReading


@dataclass(frozen=True, slots=True)
class _Entry:
    c0: float  # count the interval began (for a gap entry: the end of the last known line before it)
    c1: float  # count the line was latched
    values: np.ndarray
    gap: bool  # lines were lost just before this one: (c0, c1) is not fully covered


@dataclass(frozen=True, slots=True)
class FieldResult:
    field_mT: float | None  # peak |B| over the piece's channels and window; None: no reading overlaps it
    signed_mT: float | None  # that reading with its sign (the piece's polarity)
    channel: int | None  # where the peak was read
    complete: bool  # readings cover the whole window and no line in it was lost
    pending: bool  # the bar has not yet reported past the window's end: waiting may add readings
    lines: int  # data lines overlapping the window
    channels: tuple[int, int]  # first and last channel looked at (inclusive)
    window: tuple[float, float]  # the counts looked at
    peak_span: tuple[float, float] | None  # counts the peak's line covered: another piece whose window overlaps
    # it on the same channels may have made that peak (a line covers ~30 mm of belt at 2.5 m/s, 115200 baud)


class FieldMap:
    def __init__(
        self,
        cfg: MagnetometerConfig,
        counts_per_mm: float,
        count_at: Callable[[float], float],
        *,
        capacity: int = 4096,
        margin_mm: float = 5.0,
    ) -> None:
        """
        count_at: PC monotonic time -> unwrapped encoder count (the service's ClockModel.count_at);
            may raise RuntimeError while it is not ready (that line is then a gap).
        capacity: lines kept (4096 is over a minute at the usual 40-100 lines/s).
        margin_mm: the window is widened by this on both sides (the field spreads beyond the
            footprint by about the sensors' lift-off).
        """
        self.cfg = cfg
        self.counts_per_mm = counts_per_mm
        self.count_at = count_at
        self.margin_mm = margin_mm
        self._offset = cfg.distance_mm * counts_per_mm
        self._margin = margin_mm * counts_per_mm
        self._ring: deque[_Entry] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._last_end: float | None = None  # count of the newest stored line
        self._chain = False  # whether the next contiguous line may abut the newest one
        self.lines = 0
        self.gaps = 0
        self.unconverted = 0  # lines dropped because the clock model was not ready

    # --- adding (the reader thread) ---
    def add(self, r: BarReading) -> None:
        try:
            c1 = float(self.count_at(r.t_end))
        except RuntimeError:
            with self._lock:
                self.unconverted += 1
                self._chain = False
            return
        with self._lock:
            last = self._last_end
            if last is not None:
                c1 = max(c1, last)  # a clock-model jump must not send the ring backwards
            gap = r.t_start is None or not self._chain or last is None
            # abut exactly: the previous line's end is this line's start, whatever the fit did since
            c0 = c1 if last is None else last
            self._ring.append(_Entry(c0, c1, r.values, gap))
            self._last_end = c1
            self._chain = True
            self.lines += 1
            self.gaps += gap

    def mark_gap(self) -> None:
        """Whatever comes next does not continue the newest line (e.g. the bar went offline)."""
        with self._lock:
            self._chain = False

    # --- querying (the service's loop) ---
    def covered_until(self) -> float | None:
        """Count at which the newest line was latched (None before the first)."""
        return self._last_end

    def window(self, u_lead: float, u_trail: float) -> tuple[float, float]:
        """The counts in which a piece with camera-line extent [u_lead, u_trail] is read by the bar."""
        return u_lead + self._offset - self._margin, u_trail + self._offset + self._margin

    def channel_x_mm(self, ch: int) -> float:
        return self.cfg.first_channel_x_mm + ch * self.cfg.pitch_mm

    def channels_for(self, x0_mm: float, x1_mm: float) -> tuple[int, int]:
        """Channels whose sensor lies within [x0 - pitch/2, x1 + pitch/2] (at least the nearest one)."""
        cfg = self.cfg
        p, n = cfg.pitch_mm, cfg.channels
        lo = max(0, math.ceil((x0_mm - p / 2 - cfg.first_channel_x_mm) / p - 1e-9))
        hi = min(n - 1, math.floor((x1_mm + p / 2 - cfg.first_channel_x_mm) / p + 1e-9))
        if lo > hi:  # off the bar's ends: the nearest sensor is the best there is
            nearest = min(n - 1, max(0, round(((x0_mm + x1_mm) / 2 - cfg.first_channel_x_mm) / p)))
            return nearest, nearest
        return lo, hi

    def query(self, u_lead: float, u_trail: float, x0_mm: float, x1_mm: float) -> FieldResult:
        """The field of the piece with camera-line extent [u_lead, u_trail] (counts) and across extent [x0, x1] mm."""
        w0, w1 = self.window(u_lead, u_trail)
        lo, hi = self.channels_for(x0_mm, x1_mm)
        hits: list[np.ndarray] = []
        spans: list[tuple[float, float]] = []
        gap = False
        start: float | None = None  # the start of the oldest line overlapping the window
        with self._lock:
            until = self._last_end
            for e in reversed(self._ring):
                if e.c1 < w0:
                    break
                if e.c0 < w1 or (e.c0 == e.c1 and e.c0 <= w1):
                    hits.append(e.values[lo : hi + 1])
                    spans.append((e.c0, e.c1))
                    gap |= e.gap
                    start = e.c0
        pending = until is None or until < w1
        complete = bool(hits) and not gap and not pending and start is not None and start <= w0
        if not hits:
            return FieldResult(None, None, None, False, pending, 0, (lo, hi), (w0, w1), None)
        block = np.stack(hits)
        i = int(np.argmax(np.abs(block)))
        row, col = divmod(i, block.shape[1])
        signed = float(block[row, col])
        return FieldResult(abs(signed), signed, lo + col, complete, pending, len(hits), (lo, hi), (w0, w1), spans[row])
