"""The Hall bar's clock -> PC monotonic time.

The bar stamps each data line with its own free-running microsecond counter
(uint32: wraps every 71.6 minutes; its crystal is off by tens of ppm). The PC
knows only when a line arrived, and a line arrives no earlier than it was
latched plus its transmission time (len * 10 / baud), plus a non-negative and
very variable latency: USB frames, the reader thread's wake-up, a burst of lines
read in one chunk. So for every line

    rx - wire = a + (1 + d) * t_board + latency,   latency >= 0.

The latency has a sharp floor and a long upper tail, so the line through the
*lowest* points is the one to trust: over a sliding window the fit is the
lower envelope, the line under every point that is closest to them on average
(a linear program whose optimum is the edge of the points' lower convex hull
above their mean x). Delay spikes lie above it and cost nothing. The rate term
d (the board's ppm error) is only fitted once the window is long enough to see
it; before that it is taken as 0, which over a few seconds costs microseconds.

To keep the work per line small, only the lowest point of each `bucket_s` slice
of board time is kept. A board that restarted or a clock step (the board's
advance disagreeing with the PC's by more than `step_tolerance_s`) resets the
fit; so does `reset()`, which the link calls on every (re)connection.
"""

from __future__ import annotations

import math
from collections import deque

T_MOD = 1 << 32


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def lower_envelope(points: list[tuple[float, float]], max_slope: float) -> tuple[float, float]:
    """(intercept, slope) of the line below all points minimising the summed gap to them.

    `points` sorted by x. The slope is limited to +-max_slope; a limited (or a
    one-point) fit is the steepest allowed line pushed up against the points.
    """
    if not points:
        raise ValueError("no points")
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    if len(hull) == 1:
        return hull[0][1], 0.0
    x_mean = sum(p[0] for p in points) / len(points)
    i = next(i for i in range(1, len(hull)) if hull[i][0] >= x_mean or i == len(hull) - 1)
    a, b = hull[i - 1], hull[i]
    slope = (b[1] - a[1]) / (b[0] - a[0])
    if abs(slope) <= max_slope:
        return a[1] - slope * a[0], slope
    slope = math.copysign(max_slope, slope)
    return min(y - slope * x for x, y in points), slope


class BoardClock:
    """Board microseconds -> PC monotonic seconds, fitted from line arrival times."""

    def __init__(
        self,
        *,
        window_s: float = 20.0,
        bucket_s: float = 0.1,
        fit_span_s: float = 3.0,
        max_ppm: float = 1000.0,
        step_tolerance_s: float = 1.0,
    ) -> None:
        """
        window_s: board seconds of history the fit uses.
        bucket_s: only the lowest point per this much board time is kept.
        fit_span_s: the rate error is fitted once the points span this long.
        max_ppm: a fitted rate error beyond this is clamped (crystals are within ~100 ppm).
        step_tolerance_s: the board's advance between two lines may differ from the
            PC's by this much (latency swings) before it counts as a clock step.
        """
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.fit_span_s = fit_span_s
        self.max_slope = max_ppm * 1e-6
        self.step_tolerance_s = step_tolerance_s
        self.resets = 0  # clock steps and board restarts seen (not counting reset() calls)
        self.reset()

    def reset(self) -> None:
        self._raw: int | None = None  # last board count seen
        self._ext = 0  # its unwrapped value, microseconds since the first line after the reset
        self._rx = 0.0  # PC time that line arrived
        self._buckets: deque[tuple[int, float, float]] = deque()  # (bucket index, x, y), lowest y per bucket
        self._fit: tuple[float, float] | None = None  # (a, d): pc = a + (1 + d) * x, x in board s
        self._dirty = False

    # --- feeding ---
    def add(self, t_us: int, rx: float, wire_s: float = 0.0) -> tuple[int, bool]:
        """Add one line's board stamp, PC arrival time and transmission time.

        Returns (unwrapped board microseconds, whether the clock was reset first:
        a board restart or clock step, so the stamp has no relation to the previous one).
        """
        stepped = False
        if self._raw is not None:
            ext = self._ext + (t_us - self._raw) % T_MOD
            board_dt = (ext - self._ext) * 1e-6
            pc_dt = rx - self._rx
            if abs(board_dt - pc_dt) > self.step_tolerance_s + 1e-3 * abs(pc_dt):
                self.reset()
                self.resets += 1
                stepped = True
        if self._raw is None:
            ext = 0
        self._raw, self._ext, self._rx = t_us % T_MOD, ext, rx
        x = ext * 1e-6
        y = rx - wire_s - x
        b = math.floor(x / self.bucket_s)
        if self._buckets and self._buckets[-1][0] == b:
            if y < self._buckets[-1][2]:
                self._buckets[-1] = (b, x, y)
                self._dirty = True
        else:
            self._buckets.append((b, x, y))
            self._dirty = True
        while self._buckets and self._buckets[0][1] < x - self.window_s:
            self._buckets.popleft()
        return ext, stepped

    def _refit(self) -> tuple[float, float]:
        pts = [(x, y) for _, x, y in self._buckets]
        if pts[-1][0] - pts[0][0] < self.fit_span_s:
            fit = (min(y for _, y in pts), 0.0)
        else:
            fit = lower_envelope(pts, self.max_slope)
        self._fit = fit
        self._dirty = False
        return fit

    # --- reading ---
    @property
    def ready(self) -> bool:
        return bool(self._buckets)

    def to_pc(self, ext_us: int) -> float:
        """PC monotonic time at which the board's clock read `ext_us` (an unwrapped value from add())."""
        if not self._buckets:
            raise RuntimeError("no board time seen since the last reset")
        fit = self._refit() if self._dirty or self._fit is None else self._fit
        x = ext_us * 1e-6
        return fit[0] + (1.0 + fit[1]) * x

    @property
    def ppm(self) -> float:
        """How fast the board's clock runs against the PC's, in ppm (positive: fast; 0 until fitted)."""
        if not self._buckets:
            return 0.0
        fit = self._refit() if self._dirty or self._fit is None else self._fit
        return (1.0 / (1.0 + fit[1]) - 1.0) * 1e6
