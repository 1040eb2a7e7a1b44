"""Line geometry: camera pixels <-> belt millimetres, and 32-bit encoder arithmetic.

Two clocks are kept apart on purpose: belt position lives in encoder counts
(32-bit on the wire, unwrapped to Python ints inside the service), PC time in
monotonic seconds. Converting between them is the clock model's job only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sorter.config import CameraMapping, EjectionConfig, LineConfig


WRAP = 1 << 32
HALF = 1 << 31


def wrap32(count: int) -> int:
    return count % WRAP


def unwrap(count32: int, reference: int) -> int:
    """The unwrapped count nearest to `reference` whose low 32 bits are `count32`."""
    delta = (count32 - reference) % WRAP
    if delta >= HALF:
        delta -= WRAP
    return reference + delta


def diff32(a: int, b: int) -> int:
    """a - b for 32-bit wrapping counters, in [-2**31, 2**31)."""
    d = (a - b) % WRAP
    return d - WRAP if d >= HALF else d


@dataclass(frozen=True)
class CameraGeometry:
    """Affine pixel <-> belt-mm mapping of one camera (image centre at `centre_mm`)."""

    width: int
    height: int
    centre_mm: tuple[float, float]
    mm_per_px: float
    rotation_deg: float = 0.0

    @classmethod
    def from_mapping(cls, mapping: CameraMapping, width: int, height: int) -> CameraGeometry:
        return cls(width, height, tuple(mapping.centre_mm), mapping.mm_per_px, mapping.rotation_deg)  # type: ignore[arg-type]

    @property
    def _rot(self) -> tuple[float, float]:
        a = math.radians(self.rotation_deg)
        return math.cos(a), math.sin(a)

    def px_to_mm(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (column u, row v) -> belt (x, y) mm at the frame's exposure."""
        c, s = self._rot
        du = (np.asarray(u, dtype=np.float64) - (self.width - 1) / 2) * self.mm_per_px
        dv = (np.asarray(v, dtype=np.float64) - (self.height - 1) / 2) * self.mm_per_px
        return self.centre_mm[0] + c * du - s * dv, self.centre_mm[1] + s * du + c * dv

    def mm_to_px(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        c, s = self._rot
        dx = np.asarray(x, dtype=np.float64) - self.centre_mm[0]
        dy = np.asarray(y, dtype=np.float64) - self.centre_mm[1]
        du = (c * dx + s * dy) / self.mm_per_px
        dv = (-s * dx + c * dy) / self.mm_per_px
        return du + (self.width - 1) / 2, dv + (self.height - 1) / 2

    def field_mm(self) -> tuple[float, float, float, float]:
        """Belt-mm bounding box (x0, x1, y0, y1) of what this camera sees."""
        us = np.array([0, self.width - 1, 0, self.width - 1], dtype=np.float64)
        vs = np.array([0, 0, self.height - 1, self.height - 1], dtype=np.float64)
        x, y = self.px_to_mm(us, vs)
        return float(x.min()), float(x.max()), float(y.min()), float(y.max())


def camera_geometries(cfg: LineConfig) -> dict[str, CameraGeometry]:
    """Each configured camera's pixel <-> belt mapping, by name."""
    return {c.name: CameraGeometry.from_mapping(c.mapping, c.width, c.height) for c in cfg.cameras}


def valve_span(cfg: EjectionConfig, valve: int) -> tuple[float, float]:
    left = cfg.first_valve_x_mm + valve * cfg.valve_pitch_mm
    return left, left + cfg.valve_pitch_mm


def valves_covering(cfg: EjectionConfig, x0: float, x1: float) -> list[int]:
    """Valves whose span overlaps [x0, x1] (belt mm)."""
    first = math.floor((x0 - cfg.first_valve_x_mm) / cfg.valve_pitch_mm)
    last = math.ceil((x1 - cfg.first_valve_x_mm) / cfg.valve_pitch_mm) - 1
    return [v for v in range(max(first, 0), min(last, cfg.valves_per_bank - 1) + 1)]
