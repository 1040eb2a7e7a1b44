"""The immutable messages that flow one way through the line service:
frames -> detections -> pieces -> decisions -> eject commands -> records.

Belt positions are unwrapped encoder counts (Python ints or floats); a piece's
along-belt coordinate `u` is the count at which that point of the piece crosses
the cameras' centre line, so it does not change while the piece rides the belt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    camera: str
    seq: int
    image: np.ndarray  # H x W x 3, BGR, uint8
    t_capture: float  # PC monotonic seconds at exposure (grab time where the source knows no better)
    count: int | None  # 32-bit encoder count latched at exposure; None where the source has none
    t_received: float


@dataclass(frozen=True, slots=True)
class Detection:
    """One piece seen in one frame, in belt coordinates."""

    camera: str
    frame_seq: int
    t_capture: float
    u: float  # belt-fixed along coordinate of the centre (counts)
    u_lead: float  # downstream edge (smallest u: reaches the valves first)
    u_trail: float
    x: float  # across-belt centre (mm)
    x0: float
    x1: float
    area_mm2: float
    cut_along: bool  # touches the top/bottom edge: the along-belt extent is partial
    cut_across: bool  # touches the left/right edge: the across extent is partial
    crop: np.ndarray | Callable[[], np.ndarray] | None = None  # classifier input crop (BGR uint8), or its cutter
    sharpness: float = 0.0


@dataclass(slots=True)
class Piece:
    """One physical piece, fused over all its views (a finalised track)."""

    id: int
    u: float
    u_lead: float
    u_trail: float
    x: float
    x0: float
    x1: float
    area_mm2: float
    cameras: tuple[str, ...]
    n_views: int
    crops: list[np.ndarray | Callable[[], np.ndarray]] = field(default_factory=list)
    t_first_capture: float = 0.0
    t_last_capture: float = 0.0


@dataclass(frozen=True, slots=True)
class FieldReading:
    """What the Hall-sensor bar read under one piece.

    state: ok (a complete reading), incomplete (a bar line in the piece's window was lost),
    missing (no reading in time), offline (the bar is offline), no_bar (the line has none).
    """

    field_mT: float | None
    state: str


NO_BAR = FieldReading(None, "no_bar")


@dataclass(frozen=True, slots=True)
class Decision:
    piece: Piece
    probs: dict[str, float]  # what the decision rests on: the image fused with the field where there is one
    cls: str
    confidence: float
    fraction: str
    image_probs: dict[str, float] = field(default_factory=dict)  # the camera alone
    field: FieldReading = NO_BAR
    threshold: float = 0.0
    model: str = ""


@dataclass(frozen=True, slots=True)
class EjectCommand:
    piece_id: int
    bank: int  # index into ejection.banks
    valve_mask: int
    open_at: int  # unwrapped count at which the valves are commanded open
    open_for: int  # counts
