"""The immutable messages that flow one way through the line service:
frames -> detections -> pieces -> decisions -> eject commands -> records.

Belt positions are unwrapped encoder counts (Python ints or floats); a piece's
along-belt coordinate `u` is the count at which that point of the piece crosses
the cameras' centre line, so it does not change while the piece rides the belt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np


class Outcome(StrEnum):
    """What became of a piece's ejection: the `outcome` of its record, and the name it is counted by."""

    # a command went to the PLC link
    ACCEPTED = "accepted"  # the PLC took the command: the piece goes to its fraction
    EXPIRED = "expired"  # too late to reach the PLC before the valves: not sent
    OFFLINE = "offline"  # the PLC link was down
    TIMEOUT = "timeout"  # sent, but no answer in time
    # no command
    NO_EJECT = "no_eject"  # the default fraction: no air
    CONFLICT = "conflict"  # the air would also hit a piece of another fraction: skipped for purity
    NO_SPEED = "no_speed"  # the belt stood still (or the PLC was offline) when it was planned
    HELD = "held"  # the line was not ejecting (Held, Stopping, ...): the piece went to the default fraction
    # record states of a piece in flight
    SEEN = "seen"  # tracked past the cameras, not decided yet: its row is written before the decision
    PLANNED = "planned"  # the planner made a command (before it is sent)
    PENDING = "pending"  # sent, waiting for the PLC's answer
    CANCELLED = "cancelled"  # the service stopped before the PLC answered
    # set by the next start of the service on rows an earlier run left seen/planned/pending: that run died
    # (SIGKILL, power loss) before it knew the piece's fate; the PLC's watchdog made the line fail safe
    LOST_IN_RESTART = "lost_in_restart"

    @property
    def ejected(self) -> bool:
        return self is Outcome.ACCEPTED


# rows in these states are open: a service that stops cleanly closes them; the next start closes a dead run's
OPEN_OUTCOMES = (Outcome.SEEN, Outcome.PLANNED, Outcome.PENDING)
COMMAND_OUTCOMES = (Outcome.ACCEPTED, Outcome.EXPIRED, Outcome.OFFLINE, Outcome.TIMEOUT)
NO_COMMAND_OUTCOMES = (Outcome.NO_EJECT, Outcome.CONFLICT, Outcome.NO_SPEED, Outcome.HELD)


class FieldState(StrEnum):
    """What the Hall-sensor bar contributed to a decision."""

    OK = "ok"  # a complete reading
    INCOMPLETE = "incomplete"  # a bar line in the piece's window was lost
    MISSING = "missing"  # no reading in time
    OFFLINE = "offline"  # the bar is offline
    NO_BAR = "no_bar"  # the line has none


@dataclass(frozen=True, slots=True)
class Frame:
    camera: str
    seq: int
    image: np.ndarray  # H x W x 3, BGR, uint8
    t_capture: float  # PC monotonic seconds at exposure (grab time where the source knows no better)
    count: int | None  # 32-bit encoder count latched at exposure; None where the source has none
    t_received: float
    # a camera triggered every N encoder counts (GenICam `position: trigger`): its unwrapped frame ID, gaps
    # included; the service places it on the trigger grid (core/position.py). None for every other source
    trigger_index: int | None = None


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
    # when the input that finalised it reached the PC (the frame that showed it had left the view: its
    # t_received); None for a piece finalised otherwise (at shutdown). Splits the decision latency.
    t_ready: float | None = None


@dataclass(frozen=True, slots=True)
class LatencyParts:
    """Where a decision's latency went (ms); with `plc_ms` they add up to last view's capture -> accepted.

    - settle: the piece's last view -> the frame that showed it had left the view (tracking.settle_mm
      of belt) reached the PC; the physics of the line plus that frame's delivery;
    - field_wait: waiting for the Hall bar to have read past the piece (its distance downstream);
    - compute: the PC's own time from its last input to the command handed to the PLC link: that frame's
      queue and tracking, the batch's queue, the wait for its classification (done ahead, while it settled,
      as a rule), fusion, decision, planning;
    - plc: handed to the PLC link -> its acceptance seen (room in the mailbox, the write, the poll).
    """

    settle_ms: float
    field_wait_ms: float
    compute_ms: float
    plc_ms: float | None = None  # known once the PLC has accepted the command


@dataclass(frozen=True, slots=True)
class FieldReading:
    """What the Hall-sensor bar read under one piece (`state`: see FieldState)."""

    field_mT: float | None
    state: FieldState


NO_BAR = FieldReading(None, FieldState.NO_BAR)


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


@dataclass(frozen=True, slots=True)
class PlcStatus:
    """The PLC as the link last saw it (published whole by the link: readers never see half an update)."""

    online: bool = False
    belt_running: bool = False
    air_ok: bool = False
    estop: bool = False
    watchdog_tripped: bool = False
    queue_overflow: bool = False
    queue_free: int = 0
    last_seq: int = 0
    ejects_done: int = 0  # running totals across the PLC's counter wraps
    ejects_late: int = 0
    speed_mm_s: float = 0.0
    rtt_ms: float = 0.0
    last_error: str | None = None
    alarms: list[str] = field(default_factory=list)
    t_polled: float = 0.0  # PC monotonic time of the last status update


# --- requests into the line's loop (from the HMI, OPC UA, the CLI): handled by LineService.handle ---


@dataclass(frozen=True, slots=True)
class PackMLRequest:
    """A PackML command (Start, Stop, Hold, ...) by a user; answered with the new state or InvalidState."""

    command: str
    user: str


@dataclass(frozen=True, slots=True)
class AckAlarm:
    """Acknowledge an alarm on the board; answered with the Alarm, or None if there is no such alarm."""

    name: str
    user: str


@dataclass(frozen=True, slots=True)
class SetThresholds:
    """Change routing.min_confidence / fallback_min_confidence; answered with the new RoutingConfig or ValueError."""

    user: str
    changes: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class SwapModel:
    """Switch the classifier between two batches; answered with the new version, or ModelError (nothing changed)."""

    path: Path
    user: str


@dataclass(frozen=True, slots=True)
class StartClip:
    """Start a clip (a recording of level frames into a new folder under records.recordings_dir) on the running
    line, bounded to max_mb (None: records.clip_max_mb); answered with the clip's status, or ClipError."""

    user: str
    max_mb: float | None = None


@dataclass(frozen=True, slots=True)
class StopClip:
    """Stop the running clip and complete its folder; answered with its final status, or ClipError (none runs)."""

    user: str


@dataclass(frozen=True, slots=True)
class StartShadow:
    """Run a candidate model beside the live one (its decisions recorded, never acted on; docs/shadow.md);
    answered with its version, or ModelError (nothing changed; a shadow already running stays)."""

    path: Path
    user: str


@dataclass(frozen=True, slots=True)
class StopShadow:
    """Stop the shadow model; answered with the summary of its comparison, or None if none ran."""

    user: str


@dataclass(frozen=True, slots=True)
class ShadowDecision:
    """What a shadow model would have decided for one piece the live model decided (never acted on).

    `crop_png`: the piece's first view as PNG, only where the two classes differ (the records keep a bounded
    number of them per run: sorter/line/records.py)."""

    piece_id: int
    live_cls: str
    live_fraction: str
    live_confidence: float
    cls: str
    fraction: str
    confidence: float
    model: str  # the shadow model's version
    live_model: str = ""
    crop_png: bytes | None = None

    @property
    def agrees(self) -> bool:
        return self.cls == self.live_cls


LineRequest = PackMLRequest | AckAlarm | SetThresholds | SwapModel | StartClip | StopClip | StartShadow | StopShadow
