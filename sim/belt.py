"""The belt and its incremental encoder.

Everything on the belt is a function of belt position, so the simulator stays
exact whatever the PC's scheduling jitter: a frame rendered late still shows
the pieces where they were at its latched count.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sorter.core.geometry import wrap32


@dataclass(frozen=True)
class _Segment:
    t0: float  # monotonic seconds
    pos0: float  # mm since the simulation started
    speed: float  # mm/s while this segment lasts


class Belt:
    """Belt position in mm (unwrapped, from 0) and the encoder count it drives.

    Thread-safe: state is one immutable segment swapped atomically; readers on
    camera threads never see a half-updated state.
    """

    def __init__(
        self,
        counts_per_mm: float,
        nominal_speed_mm_s: float,
        encoder_start: int = 0,
        drift: float = 0.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts_per_mm = counts_per_mm
        self.encoder_start = encoder_start
        self.drift = drift
        self._clock = clock
        self._seed = seed
        self._rng = random.Random(seed)
        self._setpoint = nominal_speed_mm_s
        self._drift_factor = 1.0
        self._running = False
        self._lock = threading.Lock()
        self._seg = _Segment(clock(), 0.0, 0.0)

    # --- reading ---
    def position_mm(self, t: float | None = None) -> float:
        seg = self._seg
        t = self._clock() if t is None else t
        return seg.pos0 + seg.speed * (t - seg.t0)

    def count(self, t: float | None = None) -> int:
        """Unwrapped encoder count."""
        return self.encoder_start + int(self.position_mm(t) * self.counts_per_mm)

    def count32(self, t: float | None = None) -> int:
        return wrap32(self.count(t))

    def position_at_count(self, count: float) -> float:
        return (count - self.encoder_start) / self.counts_per_mm

    def count_at_position(self, pos_mm: float) -> int:
        return self.encoder_start + int(pos_mm * self.counts_per_mm)

    def speed_mm_s(self) -> float:
        return self._seg.speed

    def time_at_position(self, pos_mm: float) -> float | None:
        """When the belt reaches `pos_mm` at the current speed (None if stopped)."""
        seg = self._seg
        if seg.speed <= 0:
            return None
        return seg.t0 + (pos_mm - seg.pos0) / seg.speed

    @property
    def running(self) -> bool:
        return self._running

    @property
    def setpoint_mm_s(self) -> float:
        return self._setpoint

    # --- changing ---
    def _rebase(self, speed: float) -> None:
        with self._lock:
            now = self._clock()
            self._seg = _Segment(now, self.position_mm(now), speed)

    def _actual_speed(self) -> float:
        return self._setpoint * self._drift_factor if self._running else 0.0

    def start(self) -> None:
        self._running = True
        self._rebase(self._actual_speed())

    def stop(self) -> None:
        self._running = False
        self._rebase(0.0)

    def set_speed(self, mm_s: float) -> None:
        """Change the speed setpoint at run time (the drift stays on top of it)."""
        if mm_s <= 0:
            raise ValueError("belt speed must be positive")
        self._setpoint = mm_s
        self._rebase(self._actual_speed())

    def restart_drift(self) -> None:
        """The drift's random walk from its start again (the nominal speed, the seed's first step next)."""
        self._rng = random.Random(self._seed)
        self._drift_factor = 1.0
        if self._running:
            self._rebase(self._actual_speed())

    def step_drift(self) -> None:
        """One random-walk step of the speed within +-drift; call a few times a second."""
        if not self.drift:
            return
        f = self._drift_factor + self._rng.gauss(0.0, self.drift / 6)
        self._drift_factor = min(1 + self.drift, max(1 - self.drift, f))
        if self._running:
            self._rebase(self._actual_speed())
