"""The magnetic field a simulated piece makes at a Hall sensor under the belt.

Each piece gets an effective remanence (what is left of its magnet's Br after
the scrap's history: partial or full thermal demagnetisation) and a polarity,
both drawn from its appearance seed, so the same piece reads the same field on
the line, in a dataset and in every run of a seed.

The field on the axis of a uniformly magnetised disc of radius R and thickness
t, at distance z from its face, is Br/2 * ((z+t)/sqrt((z+t)^2+R^2) - z/sqrt(z^2+R^2));
a piece is taken as the disc of its area and mean thickness. Off the piece's
footprint the field falls off like a dipole's with the distance e to the
footprint's edge: * (z^2 / (z^2 + e^2))^1.5. Coarse, but it gives what matters
for sorting: strong magnets read strong unless small or demagnetised, ferrite
weak, steel a few mT of residual magnetism, non-magnetic scrap nothing, and a
small piece between two sensors reads less than one right over a sensor.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from sim.feed import SimPiece

# effective remanence (T) ranges of healthy material
REMANENCE_T: dict[str, tuple[float, float]] = {
    "ndfeb": (1.15, 1.40),
    "smco": (0.90, 1.10),
    "ferrite": (0.20, 0.45),
}
DEMAGNETISED_SHARE = {"ndfeb": 0.06, "smco": 0.03, "ferrite": 0.02}  # thermally demagnetised: ~nothing left
PARTIAL_REMANENCE = (0.45, 1.0)  # scrap magnets keep this share of Br (heat, shocks, opposing fields in motors)
STEEL_RESIDUAL_T = 0.012  # mean residual magnetisation of steel scrap (exponential)
_SALT = 0x6D61676E  # keeps the field's random stream apart from the appearance's


def remanence_t(piece: SimPiece) -> float:
    """Signed effective remanence (T) of a piece: polarity times what is left of its Br."""
    return _remanence_t(piece.seed, piece.cls)


@lru_cache(maxsize=4096)
def _remanence_t(seed: int, cls: str) -> float:
    # drawn once a piece: the bar asks for each channel it passes over every scan, and a generator costs
    # more to seed than the rest of a reading (17 % of the simulator's busy time, py-spy, the default demo)
    rng = np.random.default_rng([seed, _SALT])
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if cls in REMANENCE_T:
        br = rng.uniform(*REMANENCE_T[cls])
        if rng.random() < DEMAGNETISED_SHARE.get(cls, 0.0):
            return sign * br * rng.uniform(0.0, 0.01)
        return sign * br * rng.uniform(*PARTIAL_REMANENCE)
    if cls == "steel":
        return sign * rng.exponential(STEEL_RESIDUAL_T)
    return 0.0


def axial_field_mT(br_t: float, radius_mm: float, thickness_mm: float, z_mm: float) -> float:
    """Field (mT) on the axis of a disc magnet at distance z from its face."""
    zt = z_mm + thickness_mm
    r2 = radius_mm * radius_mm
    return 1000.0 * br_t / 2 * (zt / math.sqrt(zt * zt + r2) - z_mm / math.sqrt(z_mm * z_mm + r2))


def field_at_mT(piece: SimPiece, dx_mm: float, dy_mm: float, lift_off_mm: float) -> float:
    """Signed field (mT) at a sensor `lift_off_mm` below the piece, offset (dx across, dy along) from its centroid."""
    br = remanence_t(piece)
    if br == 0.0:
        return 0.0
    radius = math.sqrt(piece.area_mm2 / math.pi)
    b = axial_field_mT(br, radius, piece.thickness_mm, lift_off_mm)
    e = max(0.0, math.hypot(dx_mm, dy_mm) - radius)
    z2 = lift_off_mm * lift_off_mm
    return b * (z2 / (z2 + e * e)) ** 1.5


def peak_field_mT(piece: SimPiece, lift_off_mm: float, dx_mm: float = 0.0) -> float:
    """Peak |field| a sensor offset `dx_mm` across from the piece's centroid sees as the piece passes over it."""
    return abs(field_at_mT(piece, dx_mm, 0.0, lift_off_mm))
