"""A reference magnet passed along the simulated Hall bar: what hw.calibrate_magnetometer's gain step needs.

The technician slides a magnet of known field along the sensor row, across the
belt, on the belt's surface (a guide keeps it centred over the row). Right over
a sensor it makes `field_mT` there (the field at the bar's lift-off, which is
how a reference magnet for this bar is specified); off to the side the field
falls off like a disc magnet's beyond its footprint, as `sim.magnet` models
pieces. The bar's peak hold sees the largest field while the magnet swept over
a sensor during a line's interval, so a pass at any speed reads each channel's
full reference field once: true_gain * field_mT + true_offset (+ noise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sim.hallbar import SimHallBar

RADIUS_MM = 5.0  # a 10 mm disc reference magnet: its field is flat over its own footprint
OVERRUN_MM = 40.0  # the pass starts and ends this far beyond the outer channels
START_DELAY_S = 0.2  # the hand needs a moment to reach the bar


@dataclass(frozen=True, slots=True)
class ReferencePass:
    field_mT: float  # true field at a sensor right under the magnet
    x0_mm: float  # belt x where the pass starts
    x1_mm: float  # ... and ends
    speed_mm_s: float
    t0: float  # monotonic time the magnet is at x0
    lift_off_mm: float

    @property
    def t1(self) -> float:
        return self.t0 + abs(self.x1_mm - self.x0_mm) / self.speed_mm_s

    def x_at(self, t: float) -> float:
        s = min(max(t - self.t0, 0.0), self.t1 - self.t0) * self.speed_mm_s
        return self.x0_mm + s if self.x1_mm >= self.x0_mm else self.x0_mm - s

    def peak_field(self, xs: np.ndarray, t_start: float, t_end: float) -> np.ndarray:
        """Each sensor's largest field (mT, signed) while the magnet moved during [t_start, t_end]."""
        if t_end <= self.t0 or t_start >= self.t1:
            return np.zeros(len(xs))  # not over the bar yet, or taken away
        a, b = sorted((self.x_at(t_start), self.x_at(t_end)))
        d = np.where(xs < a, a - xs, np.where(xs > b, xs - b, 0.0))  # closest approach to each sensor
        e = np.maximum(0.0, d - RADIUS_MM)
        z2 = self.lift_off_mm**2
        return self.field_mT * (z2 / (z2 + e * e)) ** 1.5


def pass_reference_magnet(bar: SimHallBar, field_mT: float, speed_mm_s: float = 200.0) -> ReferencePass:
    """Slide a reference magnet once along the bar, channel 0 first; returns the pass (its t1 is when it ends)."""
    if speed_mm_s <= 0:
        raise ValueError("speed_mm_s must be > 0")
    xs = bar.channel_x_mm
    ref = ReferencePass(
        field_mT,
        float(xs[0]) - OVERRUN_MM,
        float(xs[-1]) + OVERRUN_MM,
        speed_mm_s,
        time.monotonic() + START_DELAY_S,
        bar.hb.lift_off_mm,
    )
    bar.reference = ref.peak_field
    return ref
