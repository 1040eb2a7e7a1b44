"""Where a camera frame was on the belt, from what the camera tells about it: pure arithmetic, no I/O.

Three pieces, used by the GenICam driver (sorter/drivers/cameras/genicam.py) and the line service:

- `FrameIds`: the camera's frame (block) IDs made into one increasing number. GigE Vision 1.x block IDs are
  16 bits and skip 0 (…, 65534, 65535, 1, 2, …); GigE Vision 2 extended IDs and USB3 Vision's are 64 bits.
  A jump of more than one is frames the camera sent that never arrived whole (lost), counted, never hidden:
  with trigger-counted positions a lost frame that went unnoticed would shift every later piece.
- `TriggerGrid`: the camera is triggered every `step` encoder counts (the PLC's counter compare or an encoder
  divider), at counts ≡ `phase` (mod `step`); frame k after the anchor was exposed at anchor + k·step. The
  anchor comes from a coarse estimate of the first frame's count (device timestamp through the clock model),
  snapped to the grid; every later estimate is checked against the grid. Two frames in a row whose estimates
  are more than half a step off by the same shift mean a trigger the camera never answered (no frame ID, so
  no gap to see): the grid re-anchors and counts the slip instead of misplacing every later frame. A single
  such frame is left unplaced (the estimate may be the outlier).
- `TimestampMap`: a device timestamp (seconds of the camera's clock) mapped to PC monotonic time by the lower
  envelope of (arrival − device time): the fastest deliveries bound the offset from above, as NTP's minimum
  filter does; a constant delivery latency is calibrated separately (`cameras[].latency_ms`).

Encoder counts here are unwrapped Python ints; the 32-bit wire value is `wrap32(count)`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sorter.core.clock import ClockModel
from sorter.core.geometry import unwrap
from sorter.core.messages import Frame

COUNT_MODULUS = 1 << 32  # encoder counts on the wire: 32 bits, wrapping
_SKIP_MEMORY = 1024  # a frame this many IDs late is not waited for any more: it stays lost


def wrap32(count: int) -> int:
    """The 32-bit wire value of an unwrapped encoder count."""
    return count % COUNT_MODULUS


@dataclass
class FrameIds:
    """Unwraps a camera's frame IDs and counts the gaps between them.

    `bits` is the width of the ID on the wire: 16 for GigE Vision 1.x block IDs (0 is never used, so they run
    1..65535), 64 for GigE Vision 2 extended IDs and USB3 Vision. A frame whose ID is not ahead of the last
    one (a duplicate, or older than half the ID range allows) is reported stale and not counted as progress.
    """

    bits: int = 16
    last_raw: int | None = None
    first: int | None = None  # the unwrapped ID of the first frame
    last: int | None = None  # the unwrapped ID of the last frame accepted
    lost: int = 0  # frames the IDs say were sent and have not arrived (yet)
    late: int = 0  # frames that arrived after a later one (counted lost until then): out of order, not passed on
    stale: int = 0  # duplicates of frames already seen
    _skipped: set[int] = field(default_factory=set)  # recent unwrapped IDs counted lost, in case they turn up

    def __post_init__(self) -> None:
        if self.bits not in (16, 32, 64):
            raise ValueError(f"frame IDs are 16, 32 or 64 bits wide, not {self.bits}")

    @property
    def _skip_zero(self) -> bool:
        return self.bits == 16  # GigE Vision 1.x: block ID 0 is reserved

    @property
    def _period(self) -> int:
        return (1 << self.bits) - (1 if self._skip_zero else 0)

    def _index(self, raw: int) -> int:
        if not 0 <= raw < (1 << self.bits):
            raise ValueError(f"frame ID {raw} does not fit in {self.bits} bits")
        if self._skip_zero:
            if raw == 0:
                raise ValueError("frame ID 0 is reserved in GigE Vision 1.x")
            return raw - 1
        return raw

    def add(self, raw: int) -> int | None:
        """The unwrapped ID of a frame with wire ID `raw`, or None for a stale frame (to be dropped)."""
        idx = self._index(raw)
        if self.last is None or self.last_raw is None:
            self.last_raw, self.last = raw, raw  # numbering starts at the first wire ID, then counts on
            if self.first is None:
                self.first = raw
            return raw
        delta = (idx - self._index(self.last_raw)) % self._period
        if delta == 0 or delta > self._period // 2:
            back = self.last - (self._period - delta if delta else 0)
            if back in self._skipped:
                self._skipped.discard(back)  # it was not lost, only late
                self.lost -= 1
                self.late += 1
            else:
                self.stale += 1
            return None
        self.lost += delta - 1
        if delta > 1:
            self._skipped.update(range(self.last + 1, self.last + min(delta, _SKIP_MEMORY)))
            if len(self._skipped) > _SKIP_MEMORY:  # only recent gaps can still be filled by a late frame
                floor = self.last + delta - _SKIP_MEMORY
                self._skipped = {i for i in self._skipped if i > floor}
        self.last_raw = raw
        self.last += delta
        return self.last

    def reset(self) -> None:
        """A new acquisition (reconnect): the camera may restart its IDs."""
        self.last_raw = None
        self.last = None
        self._skipped.clear()


@dataclass
class TriggerGrid:
    """Encoder counts of frames triggered every `step` counts at counts ≡ `phase` (mod `step`)."""

    step: int
    phase: int = 0
    anchor: int | None = None  # the count of frame index 0 of this grid's anchoring
    anchor_index: int = 0
    slips: int = 0  # re-anchorings where the grid and the estimate disagreed (a trigger the camera ignored)
    doubtful: int = 0  # frames not placed: the grid and the estimate disagreed, once
    last_index: int | None = None
    _pending: int | None = None  # the shift the last frame's estimate asked for

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"a trigger step of {self.step} counts is impossible")
        self.phase %= self.step

    def snap(self, estimate: float) -> int:
        """The grid count nearest to `estimate`."""
        k = round((estimate - self.phase) / self.step)
        return self.phase + k * self.step

    def place(self, index: int, estimate: float | None) -> int | None:
        """The count at which frame `index` (unwrapped frame ID) was exposed.

        `estimate`: the count from coarser means (device timestamp through the clock model), or None where
        there is none yet. Without an anchor and without an estimate the frame cannot be placed (None).
        """
        if self.last_index is not None and index <= self.last_index:
            self.reset()  # the IDs went back: a new acquisition (reconnect), the old anchor means nothing
        if self.anchor is None:
            if estimate is None:
                return None
            self.anchor, self.anchor_index, self.last_index = self.snap(estimate), index, index
            return self.anchor
        self.last_index = index
        count = self.anchor + (index - self.anchor_index) * self.step
        if estimate is not None and abs(count - estimate) > self.step / 2:
            # the grid says one thing, the timestamps another by more than half a trigger period. Either a
            # trigger went unanswered (every later frame disagrees by the same steps) or this estimate is an
            # outlier (a PC hiccup). One frame cannot tell: it is not placed. Two in a row saying the same
            # shift: the grid moves to the estimates' grid points.
            shift = self.snap(estimate) - count
            if self._pending != shift:
                self._pending = shift
                self.doubtful += 1
                return None
            self._pending = None
            self.slips += 1
            self.anchor, self.anchor_index = count + shift, index
            return self.anchor
        self._pending = None
        return count

    def reset(self) -> None:
        """Forget the anchor (the camera reconnected and its frame IDs restarted)."""
        self.anchor = None
        self.anchor_index = 0
        self.last_index = None
        self._pending = None


class TimestampMap:
    """Camera clock (s) -> PC monotonic (s): offset = the smallest (arrival − device time) in a sliding window.

    The window (`window_s` of device time) lets the offset follow the two oscillators' drift (tens of ppm: a
    millisecond per minute at worst) while keeping enough fast deliveries to sit on the envelope.
    """

    def __init__(self, window_s: float = 30.0) -> None:
        if window_s <= 0:
            raise ValueError("the window must be positive")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (device time, arrival - device time), min-queue

    def add(self, device_s: float, arrival_s: float) -> float:
        """Record a frame's device time and PC arrival; return its mapped PC time of exposure."""
        diff = arrival_s - device_s
        # a monotone deque: the window's minimum is at the left, O(1) amortised per frame
        while self._samples and self._samples[-1][1] >= diff:
            self._samples.pop()
        self._samples.append((device_s, diff))
        while self._samples[0][0] < device_s - self.window_s:
            self._samples.popleft()
        return device_s + self._samples[0][1]

    def to_pc(self, device_s: float) -> float | None:
        """PC time of a device time with the current offset (None before the first frame)."""
        if not self._samples:
            return None
        return device_s + self._samples[0][1]

    def reset(self) -> None:
        self._samples.clear()


class FramePlacer:
    """The unwrapped encoder count of each frame, by what its camera knows (the line service asks it).

    - a trigger-counted camera (`grids`): its frame's trigger index on the grid, anchored and checked by the
      clock model's estimate from the frame's time;
    - a latched count (the simulator, GenICam chunk data): the count unwrapped near the clock's newest sample;
      for chunk cameras (`checked`) checked against the clock model: more than `tolerance` counts off means
      a camera counter out of step with the PLC's, and the frame is not placed;
    - nothing (OpenCV, GenICam by time): the clock model's count at the frame's time.

    `place` returns (count or None: not placed, and an event to log or None).
    """

    def __init__(self, grids: dict[str, TriggerGrid], checked: set[str], tolerance: float) -> None:
        self.grids = grids
        self.checked = checked
        self.tolerance = tolerance
        self.mismatches: dict[str, int] = {}

    def place(self, frame: Frame, clock: ClockModel, ref: int | None) -> tuple[int | None, str | None]:
        grid = self.grids.get(frame.camera)
        if frame.trigger_index is not None and grid is not None:
            estimate = clock.count_at(frame.t_capture) if clock.ready else None
            slips, doubtful = grid.slips, grid.doubtful
            count = grid.place(frame.trigger_index, estimate)
            if grid.slips != slips:
                return count, "slipped"
            if grid.doubtful != doubtful:
                return count, "doubtful"
            return count, None
        if frame.count is None:
            if not clock.ready:
                return None, None
            return round(clock.count_at(frame.t_capture)), None
        if not clock.ready:
            return unwrap(frame.count, ref if ref is not None else frame.count), None
        count = clock.unwrap(frame.count)
        if frame.camera in self.checked and abs(count - clock.count_at(frame.t_capture)) > self.tolerance:
            self.mismatches[frame.camera] = self.mismatches.get(frame.camera, 0) + 1
            return None, "chunk_mismatch"
        return count, None
