"""What a technician lays on the simulated belt for the encoder and ejection calibrations.

- `EncoderTarget`: two bright round marks `distance_mm` apart along the belt (a strip with two
  dots), laid upstream of the cameras; it rides the belt from where it was laid.
- `BeltMark`: a bright dot on the belt itself, so it comes round once per revolution of a belt
  `belt_length_mm` long.
- `make_test_pieces()`: identical test pieces (e.g. 20 mm NdFeB discs) in groups, spaced so that
  they never touch; they are ordinary pieces of the simulated line (seen, sorted, ejected,
  binned, counted by the chute light barriers, kept in the ground truth).

The marks are drawn straight into each camera's frame at their exact sub-pixel position
through the camera's *true* geometry (sprites are placed on whole pixels, which would put a
quantisation error into what hw.calibrate_encoder measures).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sim.feed import SimPiece, make_piece
from sorter.config import CLASSES
from sorter.core.geometry import CameraGeometry

MARK_LEVEL = 225.0  # grey level of a lit white dot (below clipping, far above the belt)
MARK_DIAMETER_MM = 10.0
UPSTREAM_MM = 1500.0  # things are laid this far upstream of the cameras' centre line
TEST_PIECE_ID0 = 50_000_000  # test pieces' ids: far above any fed piece's


@dataclass(frozen=True)
class Dot:
    """A round mark lying on the belt; s_mm is the belt position at which it is on the cameras' centre line."""

    x_mm: float
    s_mm: float
    diameter_mm: float = MARK_DIAMETER_MM

    def draw(self, out: np.ndarray, geom: CameraGeometry, y_mm: float, rng: np.random.Generator) -> None:
        """Draw the dot at belt y `y_mm` into `out` (antialiased, exact sub-pixel centre, sensor noise)."""
        u, v = (float(c) for c in geom.mm_to_px(self.x_mm, y_mm))
        r = self.diameter_mm / 2 / geom.mm_per_px
        h, w = out.shape[:2]
        u0, u1 = max(int(u - r) - 2, 0), min(int(u + r) + 3, w)
        v0, v1 = max(int(v - r) - 2, 0), min(int(v + r) + 3, h)
        if u0 >= u1 or v0 >= v1:
            return
        vv, uu = np.mgrid[v0:v1, u0:u1]
        # area coverage of each pixel by the disc, to first order in the edge distance: symmetric, so the
        # intensity centroid is the disc's centre
        cover = np.clip(r + 0.5 - np.hypot(uu - u, vv - v), 0.0, 1.0)[..., None]
        region = out[v0:v1, u0:u1].astype(np.float32)
        lit = MARK_LEVEL + rng.normal(0.0, 3.0, region.shape).astype(np.float32)
        out[v0:v1, u0:u1] = np.clip(region * (1 - cover) + lit * cover + 0.5, 0, 255).astype(np.uint8)


class EncoderTarget:
    """Two dots `distance_mm` apart (centre to centre) along the strip, the strip skewed by `angle_deg`."""

    def __init__(self, laid_at_mm: float, distance_mm: float, x_mm: float, angle_deg: float = 0.0) -> None:
        if distance_mm <= MARK_DIAMETER_MM:
            raise ValueError(f"distance_mm must exceed the dots' {MARK_DIAMETER_MM} mm diameter")
        a = math.radians(angle_deg)
        s0 = laid_at_mm + UPSTREAM_MM  # the leading (downstream) dot
        self.dots = (
            Dot(x_mm, s0),
            Dot(x_mm + distance_mm * math.sin(a), s0 + distance_mm * math.cos(a)),
        )

    def draw(self, out: np.ndarray, geom: CameraGeometry, belt_pos_mm: float, rng: np.random.Generator) -> None:
        for d in self.dots:
            d.draw(out, geom, belt_pos_mm - d.s_mm, rng)


class BeltMark:
    """A dot on the belt itself: it passes the cameras once every `belt_length_mm` of travel."""

    def __init__(self, laid_at_mm: float, belt_length_mm: float, x_mm: float) -> None:
        if belt_length_mm < 1000.0:
            raise ValueError("belt_length_mm must be at least 1000 (a belt loop is longer than the camera field)")
        self.dot = Dot(x_mm, laid_at_mm + UPSTREAM_MM)
        self.length = belt_length_mm

    def draw(self, out: np.ndarray, geom: CameraGeometry, belt_pos_mm: float, rng: np.random.Generator) -> None:
        y = (belt_pos_mm - self.dot.s_mm) % self.length  # the nearest time round, as seen from upstream
        if y > self.length / 2:
            y -= self.length
        self.dot.draw(out, geom, y, rng)


def make_test_pieces(
    laid_at_mm: float,
    n: int,
    *,
    cls: str = "ndfeb",
    shape: str = "disc",
    size_mm: float = 20.0,
    spacing_mm: float = 100.0,
    group: int = 0,
    gap_mm: float = 500.0,
    x_mm: float | None = None,
    upstream_mm: float = UPSTREAM_MM,
    belt_width_mm: float = 600.0,
    seed: int = 0,
    first_id: int = TEST_PIECE_ID0,
) -> list[SimPiece]:
    """N identical pieces in a row along the belt, the first `upstream_mm` upstream of the cameras,
    `spacing_mm` centre to centre, in groups of `group` (0: one group), with `gap_mm` more between
    groups. Identical: one shape, size, variant and appearance; each gets its own id."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; known: {list(CLASSES)}")
    if not 1 <= n <= 5000:
        raise ValueError("n must be 1..5000")
    model = make_piece(np.random.default_rng(seed), cls, shape=shape, size_mm=(size_mm, size_mm))
    extent = model.dy_lead - model.dy_trail
    if spacing_mm < extent + 10.0:
        raise ValueError(f"spacing_mm {spacing_mm} lets {extent:.0f} mm pieces come within 10 mm of each other")
    x = belt_width_mm / 2 if x_mm is None else x_mm
    if not -model.dx0 <= x <= belt_width_mm - model.dx1:
        raise ValueError(f"x_mm {x} puts the pieces off the {belt_width_mm} mm belt")
    out = []
    s = laid_at_mm + upstream_mm
    for k in range(n):
        if k and group and k % group == 0:
            s += gap_mm
        out.append(replace(model, id=first_id + k, x_mm=x, s_mm=s))
        s += spacing_mm
    return out


def command_objects(msg: dict[str, Any], belt_pos_mm: float, belt_width_mm: float) -> Sequence[Any]:
    """The runner's `encoder_target` / `belt_mark` commands -> the marks to lay (ValueError if malformed)."""
    x = float(msg.get("x_mm", belt_width_mm / 2))
    if msg["cmd"] == "encoder_target":
        return [EncoderTarget(belt_pos_mm, float(msg["distance_mm"]), x, float(msg.get("angle_deg", 0.0)))]
    return [BeltMark(belt_pos_mm, float(msg["belt_length_mm"]), x)]
