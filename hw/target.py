"""The camera calibration target: a ChArUco plate laid across the belt under all cameras.

ChArUco rather than a plain chessboard because each camera sees only part of the plate:
every corner carries the id of its neighbouring markers, so a partial view still says
which corners it shows, and a corner seen by two cameras is known to be the same one.

Plate layout (plate mm; x across the belt from the plate's left edge, y downstream from
its upstream edge):

    +--------------------------------------------------------------+  y = 0
    |    grey reference strip (white balance)                      |
    |    ChArUco pattern: squares_x x squares_y squares            |  pattern centre line
    |    (margin_mm of white left and right of the pattern)        |  marked by ticks on both ends
    +--------------------------------------------------------------+

The script that finds the target, `--make-target` that prints it and the simulator that
renders it all read this one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

WHITE = 255
GREY = 128  # the strip as printed; a photographic 18 % grey card glued on it is better
_STRIP_GAP_MM = 2.5  # white around the grey strip


@dataclass(frozen=True)
class ChArUcoTarget:
    squares_x: int = 38  # across the belt: 38 x 15 mm = 570 mm, plus 15 mm margins = a 600 mm plate
    squares_y: int = 7  # along the belt: 105 mm, well inside a camera's ~180 mm field
    square_mm: float = 15.0
    marker_mm: float = 11.0
    dictionary: str = "DICT_4X4_250"  # 133 markers needed; 4x4 bits stay readable at ~7 px per bit
    margin_mm: float = 15.0  # white left and right of the pattern
    grey_mm: float = 15.0  # the grey strip's depth along the belt

    def __post_init__(self) -> None:
        if not 0 < self.marker_mm < self.square_mm:
            raise ValueError("the markers must be smaller than the squares")
        if self.squares_x < 3 or self.squares_y < 3:
            raise ValueError("the pattern needs at least 3 x 3 squares")

    # --- geometry ---
    @property
    def pattern_mm(self) -> tuple[float, float]:
        return self.squares_x * self.square_mm, self.squares_y * self.square_mm

    @property
    def pattern_origin_mm(self) -> tuple[float, float]:
        """Plate (x, y) of the pattern's upstream-left corner."""
        return self.margin_mm, 2 * _STRIP_GAP_MM + self.grey_mm

    @property
    def plate_mm(self) -> tuple[float, float]:
        w, h = self.pattern_mm
        return w + 2 * self.margin_mm, self.pattern_origin_mm[1] + h + _STRIP_GAP_MM

    @property
    def grey_strip_mm(self) -> tuple[float, float, float, float]:
        """Pattern-relative (x0, x1, y0, y1) of the grey strip (upstream of the pattern: negative y)."""
        w, _ = self.pattern_mm
        return 0.0, w, -_STRIP_GAP_MM - self.grey_mm, -_STRIP_GAP_MM

    def board(self) -> cv2.aruco.CharucoBoard:
        d = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.dictionary))
        return cv2.aruco.CharucoBoard((self.squares_x, self.squares_y), self.square_mm, self.marker_mm, d)

    def corners_mm(self) -> np.ndarray:
        """(N, 2) pattern-relative (x, y) mm of every ChArUco corner, indexed by corner id."""
        return np.asarray(self.board().getChessboardCorners(), np.float64)[:, :2]

    # --- printing ---
    def image(self, px_per_mm: float = 10.0) -> np.ndarray:
        """The whole plate as a grey image at `px_per_mm` (pixel (i, j) covers plate mm [j, j+1) / px_per_mm)."""
        pw, ph = self.plate_mm
        w, h = round(pw * px_per_mm), round(ph * px_per_mm)
        img = np.full((h, w), WHITE, np.uint8)
        ox, oy = (round(v * px_per_mm) for v in self.pattern_origin_mm)
        sw, sh = (round(v * px_per_mm) for v in self.pattern_mm)
        img[oy : oy + sh, ox : ox + sw] = self.board().generateImage((sw, sh), marginSize=0, borderBits=1)
        gx0, gx1, gy0, gy1 = self.grey_strip_mm
        img[
            oy + round(gy0 * px_per_mm) : oy + round(gy1 * px_per_mm),
            ox + round(gx0 * px_per_mm) : ox + round(gx1 * px_per_mm),
        ] = GREY
        # centre-line ticks in both margins: laid on the cameras' centre-line mark, they fix y
        cy = oy + sh // 2
        tick = max(1, round(0.4 * px_per_mm))
        img[cy - tick // 2 : cy + (tick + 1) // 2, : max(ox - tick, 1)] = 0
        img[cy - tick // 2 : cy + (tick + 1) // 2, ox + sw + tick :] = 0
        return img

    def describe(self) -> str:
        pw, ph = self.plate_mm
        return (
            f"a {pw:g} x {ph:g} mm plate: a ChArUco pattern of {self.squares_x} x {self.squares_y} squares of "
            f"{self.square_mm:g} mm (markers {self.marker_mm:g} mm, {self.dictionary}), {self.margin_mm:g} mm white "
            f"margins left and right, a {self.grey_mm:g} mm grey strip along its upstream edge"
        )
