"""The camera calibration target lying on the simulated belt (`{"cmd": "target", "on": true}`).

The plate (`hw.target.ChArUcoTarget`, the one the technician prints) is placed like a
technician lays it: `x_mm` is the belt x of the pattern's left edge (the plate against
the left guide: its margin), `y_mm` the belt y of the pattern's centre line, `angle_deg`
how skewed it lies. It rides the belt from where it was laid, so it moves out of view
when the belt runs. Each camera sees it through its *true* geometry, which is what
hw.calibrate_camera has to find.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import cv2
import numpy as np

from hw.target import ChArUcoTarget
from sim.render import BELT_LEVEL
from sorter.core.geometry import CameraGeometry

PAPER = 215.0  # grey level of the lit white plate: bright, but well below clipping
INK = 28.0  # printed black, a little brighter than the rubber belt
_PX_PER_MM = 10.0  # the plate is drawn this fine, then seen through each camera's optics
_OPTICS_BLUR_PX = 0.6  # the same lens blur the piece sprites get (sim/render.py)


def _affine(geom: CameraGeometry) -> np.ndarray:
    """3x3 camera pixel (u, v, 1) -> belt (x, y, 1) of `geom` (an affine map)."""
    x, y = geom.px_to_mm(np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    return np.array([[x[1] - x[0], x[2] - x[0], x[0]], [y[1] - y[0], y[2] - y[0], y[0]], [0.0, 0.0, 1.0]])


class SimTarget:
    """A target laid on the belt at belt position `laid_at_mm`; draws itself into camera frames."""

    def __init__(
        self,
        spec: ChArUcoTarget,
        x_mm: float,
        y_mm: float,
        angle_deg: float,
        laid_at_mm: float,
    ) -> None:
        self.spec = spec
        self.x_mm, self.y_mm, self.angle_deg = x_mm, y_mm, angle_deg
        self.laid_at_mm = laid_at_mm
        # plate grey levels as lit and seen (paper/ink), float so each camera can blur it its own way
        self.plate = (INK + spec.image(_PX_PER_MM).astype(np.float32) * ((PAPER - INK) / 255.0)).astype(np.float32)

    def _belt_to_plate_px(self, belt_pos_mm: float) -> np.ndarray:
        """3x3 belt (x, y, 1) -> plate image pixel (column, row, 1) with the belt at `belt_pos_mm`."""
        s = self.spec
        yc = self.y_mm + (belt_pos_mm - self.laid_at_mm)  # it rides the belt
        c, si = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        to_pattern = np.array(  # inverse of: belt = R(angle) @ (pattern - (0, H/2)) + (x_mm, yc)
            [[c, si, -(c * self.x_mm + si * yc)], [-si, c, si * self.x_mm - c * yc], [0.0, 0.0, 1.0]]
        )
        to_pattern[1, 2] += s.pattern_mm[1] / 2
        ox, oy = s.pattern_origin_mm
        # plate pixel (j, i) covers plate mm [j, j + 1) / px_per_mm: its centre is at (j + 0.5) / px_per_mm
        to_px = np.array([[_PX_PER_MM, 0, ox * _PX_PER_MM - 0.5], [0, _PX_PER_MM, oy * _PX_PER_MM - 0.5], [0, 0, 1]])
        return to_px @ to_pattern

    def for_camera(self, geom: CameraGeometry) -> TargetLayer:
        return TargetLayer(self, geom)


class TargetLayer:
    """The target as one camera sees it: an underlay for `FrameRenderer` (called on its camera thread)."""

    def __init__(self, target: SimTarget, geom: CameraGeometry) -> None:
        self.target = target
        self.geom = geom
        # lens blur plus the anti-aliasing a 10 px/mm plate needs before sampling at the camera's pitch
        sigma = math.hypot(_OPTICS_BLUR_PX, 0.5) * geom.mm_per_px * _PX_PER_MM
        self.plate = cv2.GaussianBlur(target.plate, (0, 0), sigma)
        self._cam_to_belt = _affine(geom)
        self._lock = threading.Lock()
        self._cached: tuple[float, np.ndarray, np.ndarray] | None = None  # (belt pos, levels, mask)

    def _warp(self, belt_pos_mm: float) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._cached
            if hit is not None and abs(hit[0] - belt_pos_mm) < 1e-6:  # a stopped belt: warp once
                return hit[1], hit[2]
            m = (self.target._belt_to_plate_px(belt_pos_mm) @ self._cam_to_belt)[:2]
            size = (self.geom.width, self.geom.height)
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            levels = cv2.warpAffine(self.plate, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            cover = cv2.warpAffine(
                np.ones(self.plate.shape, np.float32), m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT
            )
            mask = (cover > 0.5).astype(np.uint8)
            self._cached = (belt_pos_mm, levels, mask)
            return levels, mask

    def __call__(self, out: np.ndarray, belt_pos_mm: float, gain: float) -> None:
        levels, mask = self._warp(belt_pos_mm)
        if not mask.any():
            return
        # the frame already holds belt + sensor noise: keep its noise on the plate, drop the belt's level
        lift = np.round(levels * np.float32(gain) - np.float32(BELT_LEVEL)).astype(np.int16)
        lit = cv2.add(out, cv2.merge([lift, lift, lift]), dtype=cv2.CV_8U)  # saturating
        cv2.copyTo(lit, mask, out)


def target_from_command(msg: dict[str, Any], belt_pos_mm: float) -> SimTarget:
    """The target a `{"cmd": "target", "on": true, ...}` line lays: placement and optional layout keys."""
    layout = {f.name: msg[f.name] for f in dataclasses.fields(ChArUcoTarget) if f.name in msg}
    spec = ChArUcoTarget(**layout)
    return SimTarget(
        spec,
        float(msg.get("x_mm", spec.margin_mm)),  # default: the plate against the left guide at the belt's edge
        float(msg.get("y_mm", 0.0)),  # default: its centre line on the cameras' centre line
        float(msg.get("angle_deg", 0.0)),
        belt_pos_mm,
    )
