"""The clock model: PC monotonic time <-> unwrapped belt encoder counts.

Klipper-style clock sync. Every poll of the PLC gives one sample: the encoder
count and the PC times just before the request and just after the response.
The count was latched somewhere inside that interval, so the sample is placed
at its midpoint and its round-trip time (RTT) bounds how wrong that can be.

A line `count = c0 + rate * (t - t0)` is fitted over a short sliding window:
- samples with an unusually long RTT are ignored (their midpoint is a poor
  guess: one direction was delayed, we do not know which);
- the fit is weighted towards recent samples (time constant `tau_s`) so it
  follows slow speed drift;
- residual outliers beyond k * MAD are dropped and the line refitted;
- a step change of the speed (setpoint change, stop, start) shows as the new
  samples leaving the line, all on one side: a CUSUM of their innovations
  (each sample against the line fitted before it, in units of the window's
  robust scatter) detects that within a few polls. The change point is then
  placed where "old line, then a fresh line" fits best, the samples before it
  are forgotten and the fit restarts from the new ones. Single outliers are
  clipped so that they cannot raise the alarm alone.

This is the only place where the two clocks meet; everything else converts
through it. Cost per add() is a handful of numpy calls on <= ~100 samples.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sorter.core.geometry import unwrap

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution -> its standard deviation
Z_CLIP = 5.0  # one sample adds at most this (minus the CUSUM slack) to the sums


@dataclass(frozen=True, slots=True)
class _Line:
    t0: float  # PC seconds of the anchor (the newest sample's midpoint)
    c0: float  # unwrapped count at t0
    rate: float  # counts per second
    resid_std: float  # counts, over the inliers
    sigma: float  # counts, robust (MAD) scatter of the window about the line: the change detector's yardstick
    n: int  # inliers used


def _weighted_line(t: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[float, float, float] | None:
    """Weighted least squares c = cm + slope * (t - tm); None if degenerate."""
    sw = float(w.sum())
    if sw <= 0.0:
        return None
    tm = float((w * t).sum()) / sw
    cm = float((w * c).sum()) / sw
    dt = t - tm
    stt = float((w * dt * dt).sum())
    if stt <= 1e-18:
        return None
    slope = float((w * dt * (c - cm)).sum()) / stt
    return tm, cm, slope


class ClockModel:
    """Maps PC monotonic time to unwrapped encoder counts and back."""

    def __init__(
        self,
        *,
        window_s: float = 1.0,
        tau_s: float = 0.15,
        min_samples: int = 3,
        rtt_factor: float = 2.0,
        rtt_slack_s: float = 0.001,
        outlier_k: float = 4.0,
        cusum_k: float = 1.0,
        cusum_h: float = 8.0,
        change_history: int = 8,
        min_rate: float = 100.0,
        sigma_floor: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        window_s: samples older than this (relative to the newest) are forgotten.
        tau_s: recency weighting time constant of the fit.
        min_samples: usable samples needed before the model is `ready`.
        rtt_factor, rtt_slack_s: a sample whose RTT exceeds both factor * median
            RTT and median + slack is not used for the fit.
        outlier_k: residuals beyond k robust sigmas are outliers.
        cusum_k, cusum_h: slack and threshold (in noise sigmas) of the two-sided
            CUSUM that detects speed changes; k=1, h=8 almost never alarms on
            noise yet catches a 3-sigma shift in ~4 polls.
        change_history: inliers the line needs before speed changes are judged.
        min_rate: below this many counts/s the belt counts as stopped.
        sigma_floor: counts; keeps a noise-free window (a stopped belt) from
            declaring every sub-count wobble an outlier.
        """
        if min_samples < 2:
            raise ValueError("min_samples must be >= 2")
        self.window_s = window_s
        self.tau_s = tau_s
        self.min_samples = min_samples
        self.rtt_factor = rtt_factor
        self.rtt_slack_s = rtt_slack_s
        self.outlier_k = outlier_k
        self.cusum_k = cusum_k
        self.cusum_h = cusum_h
        self.change_history = change_history
        self.min_rate = min_rate
        self.sigma_floor = sigma_floor
        self._clock = clock
        self._samples: deque[tuple[float, int, float]] = deque()  # (t_mid, unwrapped count, rtt)
        self._line: _Line | None = None
        self._cusum = [0.0, 0.0]  # upward, downward
        self._cusum_t0: list[float | None] = [None, None]  # when each sum last left zero
        self._fresh = False  # a speed change was just detected; the new line is still short
        self.regime_changes = 0  # how often a speed step reset the window (diagnostics)

    # --- feeding ---
    def reset(self) -> None:
        """Forget everything (e.g. the PLC was replaced and its counter restarted)."""
        self._samples.clear()
        self._forget_regime()
        self._fresh = False
        self._line = None

    def _forget_regime(self) -> None:
        self._cusum = [0.0, 0.0]
        self._cusum_t0 = [None, None]

    def add(self, t_request: float, t_response: float, count32: int) -> int:
        """Add one poll; returns the sample's unwrapped count."""
        if t_response < t_request:
            raise ValueError("t_response is before t_request")
        t_mid = 0.5 * (t_request + t_response)
        count = self.unwrap(count32)
        line = self._line
        self._samples.append((t_mid, count, t_response - t_request))
        horizon = t_mid - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        t, c, rtt, ref = self._arrays()
        usable = self._usable(rtt)
        min_n = self.min_samples
        if line is not None and usable[-1]:
            alarm_t = self._speed_change(line, t_mid, count)
            if alarm_t is not None:
                self.regime_changes += 1
                first_new = self._change_point(line, alarm_t, t, c, ref)
                while self._samples[0][0] < first_new:
                    self._samples.popleft()
                self._forget_regime()
                self._fresh = True
                t, c, rtt, ref = self._arrays()
                usable = self._usable(rtt)
                line = None  # the old line says nothing about the new regime
        if self._fresh:
            # Right after a change two samples of the new regime beat any number of the
            # old one; being unready would refuse eject commands for a poll or two.
            min_n = 2
        self._line = self._fit(t, c, usable, ref, line, min_n)
        if self._line is None:
            self._forget_regime()  # e.g. after a gap in the polls: whatever comes next starts afresh
        elif self._line.n >= self.min_samples:
            self._fresh = False
        return count

    def _change_point(self, line: _Line, since: float, t: np.ndarray, c: np.ndarray, ref: int) -> float:
        """When the new regime began: the split (after `since`, when the CUSUM started rising)
        that best explains the samples as the old line followed by a fresh line.

        The CUSUM's own estimate can be early by a noise excursion, and every old sample
        kept would bend the new line.
        """
        idx = np.flatnonzero(t >= since)
        if len(idx) < 3:
            return float(t[idx[0]]) if len(idx) else float(t[-1])
        ts, cs = t[idx], c[idx]
        old_r = cs - (line.c0 - ref + line.rate * (ts - line.t0))
        old_cost = np.concatenate(([0.0], np.cumsum(old_r * old_r)))
        best_j, best_cost = 0, math.inf
        for j in range(len(idx) - 1):  # the new segment keeps at least two samples
            tn, cn = ts[j:], cs[j:]
            fit = _weighted_line(tn, cn, np.ones(len(tn)))
            sse = 0.0 if fit is None else float(((cn - (fit[1] + fit[2] * (tn - fit[0]))) ** 2).sum())
            cost = float(old_cost[j]) + sse
            if cost < best_cost:
                best_j, best_cost = j, cost
        return float(ts[best_j])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        ref = self._samples[-1][1]
        # counts relative to the newest sample keep float64 exact however far the counter ran
        data = np.array([(t, c - ref, r) for t, c, r in self._samples], dtype=np.float64)
        return data[:, 0], data[:, 1], data[:, 2], ref

    def _usable(self, rtt: np.ndarray) -> np.ndarray:
        med = float(np.median(rtt))
        return rtt <= max(med * self.rtt_factor, med + self.rtt_slack_s)

    def _speed_change(self, line: _Line, t_mid: float, count: int) -> float | None:
        """Feed one innovation to the CUSUM; on alarm, when the alarming sum started rising.

        Armed only once the line rests on enough samples: a line fitted from a
        handful of samples right after a change, whose scatter is not yet known,
        must not set off a cascade of false alarms.
        """
        if line.n < self.change_history:
            return None
        # The yardstick is the MAD of the whole window: the first samples of a new
        # regime are too few to widen it.
        z = (count - (line.c0 + line.rate * (t_mid - line.t0))) / line.sigma
        z = max(-Z_CLIP, min(Z_CLIP, z))
        for side, zz in ((0, z), (1, -z)):
            s = max(0.0, self._cusum[side] + zz - self.cusum_k)
            if s == 0.0:
                self._cusum_t0[side] = None
            elif self._cusum_t0[side] is None:
                self._cusum_t0[side] = t_mid
            self._cusum[side] = s
            if s > self.cusum_h:
                return self._cusum_t0[side]
        return None

    def _weights(self, t: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.exp((t - t[-1]) / self.tau_s) * mask

    def _robust_sigma(self, r: np.ndarray) -> float:
        mad = float(np.median(np.abs(r - np.median(r)))) if len(r) else 0.0
        return max(MAD_TO_SIGMA * mad, self.sigma_floor)

    def _fit(
        self, t: np.ndarray, c: np.ndarray, usable: np.ndarray, ref: int, prev: _Line | None, min_n: int
    ) -> _Line | None:
        if int(usable.sum()) < min_n:
            return None
        if prev is not None and prev.n >= self.change_history:
            # Judge outliers against the established line: a fresh outlier, heavily
            # weighted for being the newest sample, would otherwise drag a first
            # unscreened fit towards itself and hide.
            r = c - (prev.c0 - ref + prev.rate * (t - prev.t0))
        else:
            line = _weighted_line(t, c, self._weights(t, usable))
            if line is None:
                return None
            tm, cm, slope = line
            r = c - (cm + slope * (t - tm))
        if int(usable.sum()) < self.change_history:
            inliers = usable  # too few samples (just after a change) to tell outliers from noise
        else:
            centre = float(np.median(r[usable]))
            sigma = self._robust_sigma(r[usable])
            inliers = usable & (np.abs(r - centre) <= self.outlier_k * sigma)
        n = int(inliers.sum())
        if n < min_n:
            return None
        refit = _weighted_line(t, c, self._weights(t, inliers))
        if refit is None:
            return None
        tm, cm, slope = refit
        r = c - (cm + slope * (t - tm))
        r_in = r[inliers]
        std = float(np.sqrt((r_in * r_in).sum() / max(n - 2, 1)))
        sigma = self._robust_sigma(r[usable]) if n >= self.change_history else max(std, self.sigma_floor)
        t0 = float(t[-1])
        return _Line(t0, ref + cm + slope * (t0 - tm), slope, std, sigma, n)

    # --- reading ---
    @property
    def ready(self) -> bool:
        return self._line is not None

    @property
    def rate(self) -> float:
        """Counts per second (0.0 until ready)."""
        return self._line.rate if self._line else 0.0

    @property
    def residual_std_counts(self) -> float:
        """Scatter of the inlier samples about the fitted line (inf until ready)."""
        return self._line.resid_std if self._line else math.inf

    @property
    def latest(self) -> tuple[float, int] | None:
        """(PC time, unwrapped count) of the newest sample."""
        if not self._samples:
            return None
        t, c, _ = self._samples[-1]
        return t, c

    def unwrap(self, count32: int) -> int:
        """Unwrapped count for a 32-bit count near the newest sample (+- 2**31 counts).

        The first sample ever is taken as is, so unwrapped counts start in [0, 2**32).
        """
        if not self._samples:
            return count32 & 0xFFFFFFFF
        return unwrap(count32, self._samples[-1][1])

    def count_at(self, t: float) -> float:
        """Predicted unwrapped count at PC time t."""
        line = self._line
        if line is None:
            raise RuntimeError("clock model not ready: no usable samples yet")
        return line.c0 + line.rate * (t - line.t0)

    def time_at(self, count: float) -> float | None:
        """PC time at which the belt reaches `count`; None if not ready or the belt is stopped."""
        line = self._line
        if line is None or line.rate < self.min_rate:
            return None
        return line.t0 + (count - line.c0) / line.rate

    def seconds_until(self, count: float, now: float | None = None) -> float | None:
        """Seconds from now until the belt reaches `count` (negative if passed); None as time_at."""
        t = self.time_at(count)
        if t is None:
            return None
        return t - (self._clock() if now is None else now)
