"""What the line shows to the outside: its counters, live figures, and one immutable snapshot of it all.

The service counts into `LineCounters` and `LiveStats` on its loop only; several times a second it
builds a `LineStats` there (copies, nothing shared) and hands it to whoever shows the line: the HMI,
the OPC UA server (its `LineSnapshot` part), the Prometheus metrics, the log. Readers on other threads
therefore never see state that the loop is changing.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sorter.core.alarms import Alarm
from sorter.core.messages import Decision, FieldState, Outcome, PlcStatus
from sorter.core.packml import State

if TYPE_CHECKING:
    from sorter.config import RoutingConfig

PPM_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class LineSnapshot:
    state: State
    fraction_counts: dict[str, int] = field(default_factory=dict)  # every configured fraction, bank order
    pieces_per_minute: float = 0.0  # over the last minute
    purity: dict[str, float] = field(default_factory=dict)  # live estimate from decision confidences; nan if none
    model_version: str = ""
    alarms: list[str] = field(default_factory=list)  # active alarms, "name: cause" each


class LiveStats:
    """Counts, rate and estimated purity per output fraction, from the decisions as they are recorded.

    Estimated purity of a fraction: the mean, over the pieces sent there, of the
    probability that the piece belongs there (its fused probability summed over the
    classes routed to that fraction) - what the model believes, no ground truth.
    """

    def __init__(self, fractions: list[str], routing: RoutingConfig) -> None:
        self.fractions = list(fractions)
        self.routing = routing
        self.counts = dict.fromkeys(self.fractions, 0)
        self._belongs = dict.fromkeys(self.fractions, 0.0)
        self._times: deque[float] = deque()
        self._t_first: float | None = None

    def add(self, d: Decision, fraction: str, t: float | None = None) -> None:
        """A piece that ends in `fraction`: d.fraction only if ejected there (held, expired, refused: residue)."""
        t = time.monotonic() if t is None else t
        self.counts[fraction] = self.counts.get(fraction, 0) + 1
        self._belongs[fraction] = self._belongs.get(fraction, 0.0) + self._p_belongs(d, fraction)
        self._times.append(t)
        if self._t_first is None:
            self._t_first = t

    def _p_belongs(self, d: Decision, fraction: str) -> float:
        r = self.routing
        return sum(p for c, p in d.probs.items() if r.classes.get(c, r.default_fraction) == fraction)

    def pieces_per_minute(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._times and self._times[0] < now - PPM_WINDOW_S:
            self._times.popleft()
        if self._t_first is None:
            return 0.0
        # during the first minute, the rate over the time since the first piece (at least 5 s)
        window = min(PPM_WINDOW_S, max(now - self._t_first, 5.0))
        return float(len(self._times)) * 60.0 / window

    def purity(self) -> dict[str, float]:
        return {f: (self._belongs[f] / n if (n := self.counts[f]) else math.nan) for f in self.fractions}


@dataclass
class LineCounters:
    """Everything the service counts, by name and type (changed on the service loop only)."""

    pieces: int = 0  # decided and recorded
    frames_processed: int = 0  # segmented and tracked
    frames_unplaced: int = 0  # no latched count and no clock model yet
    frames_failed: int = 0  # processing raised
    frames_parted_coarse: int = 0  # touching pieces parted on the downscaled image: the vision thread was behind
    batches_failed: int = 0  # a decision batch raised
    records_flush_failed: int = 0  # a commit of the records database failed (retried)
    field_wait_timeouts: int = 0  # a decision stopped waiting for the Hall bar
    by_class: Counter[str] = field(default_factory=Counter)  # decided class
    by_fraction: Counter[str] = field(default_factory=Counter)  # decided fraction
    outcomes: Counter[Outcome] = field(default_factory=Counter)  # final outcome of each piece's ejection
    field_states: Counter[FieldState] = field(default_factory=Counter)  # what the bar gave each decision

    def copy(self) -> LineCounters:
        return LineCounters(
            self.pieces,
            self.frames_processed,
            self.frames_unplaced,
            self.frames_failed,
            self.frames_parted_coarse,
            self.batches_failed,
            self.records_flush_failed,
            self.field_wait_timeouts,
            Counter(self.by_class),
            Counter(self.by_fraction),
            Counter(self.outcomes),
            Counter(self.field_states),
        )

    def flat(self) -> dict[str, int]:
        """One flat mapping (the records' `stop` event, logs): class_*, fraction_*, eject_*, field_* keys."""
        out = {
            k: getattr(self, k)
            for k in (
                "pieces",
                "frames_processed",
                "frames_unplaced",
                "frames_failed",
                "frames_parted_coarse",
                "batches_failed",
                "records_flush_failed",
                "field_wait_timeouts",
            )
        }
        out |= {f"class_{k}": v for k, v in self.by_class.items()}
        out |= {f"fraction_{k}": v for k, v in self.by_fraction.items()}
        out |= {f"eject_{k.value}": v for k, v in self.outcomes.items()}
        out |= {f"field_{k.value}": v for k, v in self.field_states.items()}
        return out


@dataclass(frozen=True, slots=True)
class CameraStats:
    name: str
    online: bool
    reason: str | None  # why it is offline
    captured: int
    dropped: int  # the capture queue overflowed
    torn: int  # a shared-memory slot was overwritten while read
    source_dropped: int  # lost at the source's hand-off
    queued: int  # frames waiting for the vision thread
    stalls: int
    reconnects: int
    missing: int = 0  # sent by the camera, never arrived (gaps in its frame IDs: GenICam)

    @property
    def lost(self) -> int:
        """Every frame lost anywhere between the camera and the vision thread."""
        return self.dropped + self.torn + self.source_dropped + self.missing


@dataclass(frozen=True, slots=True)
class BarStats:
    online: bool
    reason: str | None
    counters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClipStatus:
    """A clip (a recording of level frames started and stopped on the running line): the running one, or the last."""

    folder: str
    active: bool  # still recording
    started_by: str
    started_wall: float
    bytes: int  # written so far
    max_bytes: int  # its size bound
    frames: int  # frames written
    stopped_by: str | None = None  # who stopped it; "bound" when it stopped itself
    stopped_early: str | None = None  # why it stopped itself (size bound, disk nearly full, a write failed)
    # counts the starts and stops since the service started: a reader that got a later change (a panel, from the
    # answer to its own start or stop) knows a status built before it is stale
    change: int = 0


@dataclass(frozen=True, slots=True)
class LineStats:
    """The whole line at one moment, built on the service loop: what every outside reader gets."""

    line: str
    run_id: str
    t: float  # PC monotonic seconds when built
    state: State
    allowed: tuple[str, ...]  # PackML commands the state accepts now
    counters: LineCounters  # a copy: never changed after the build
    cameras: tuple[CameraStats, ...]
    plc: PlcStatus
    plc_protocol: str
    hallbar: BarStats | None  # None: the line has no bar
    pieces_queued: int  # batches of finalised pieces waiting for a decision
    ejects_in_flight: int  # commands sent, not yet answered
    open_tracks: int
    records_pending: int  # rows waiting for the records thread
    model_version: str
    model_provider: str
    model_labels: tuple[str, ...]
    fractions: tuple[str, ...]  # bank order, then the default fraction
    default_fraction: str
    min_confidence: float
    fallback_min_confidence: float
    fraction_counts: dict[str, int]  # where pieces ended (ejected only if the PLC took the command)
    pieces_per_minute: float
    purity: dict[str, float]  # live estimate from decision confidences; nan until a fraction has a piece
    latency_ms_p99: float | None  # decision latency over the latest commands
    alarms_active: tuple[Alarm, ...]
    alarms_shown: tuple[Alarm, ...]  # active, and cleared but not yet acknowledged; newest first
    records_error: str | None = None  # why the disk refused the last flush of the records (None: it took it)
    records_dropped: int = 0  # rows refused since start: the buffer for an unwritable disk was full
    records_disk_low: str | None = None  # the records disk is nearly full (why), before it refuses writes
    model_path: str = ""  # the running model's file
    clip: ClipStatus | None = None  # the running clip, or the last one (None: no clip since the start)
    # the shadow model's running comparison (sorter/core/shadow.py summary_dict, with its path, pending and
    # failed batches); None: no shadow model runs (docs/shadow.md)
    shadow: dict[str, Any] | None = None

    @property
    def frames_captured(self) -> int:
        return sum(c.captured for c in self.cameras)

    @property
    def frames_dropped(self) -> int:
        return sum(c.lost for c in self.cameras)

    @property
    def snapshot(self) -> LineSnapshot:
        """The small part the OPC UA server shows (sent to its process through a pipe)."""
        return LineSnapshot(
            state=self.state,
            fraction_counts=dict(self.fraction_counts),
            pieces_per_minute=self.pieces_per_minute,
            purity=dict(self.purity),
            model_version=self.model_version,
            alarms=[a.text() for a in self.alarms_active],
        )

    def summary(self) -> dict[str, Any]:
        """The one-line summary the service logs every few seconds (and at stop)."""
        out = {
            "state": self.state.label,
            "pieces": self.counters.pieces,
            "open_tracks": self.open_tracks,
            "frames_captured": self.frames_captured,
            "frames_dropped": self.frames_dropped,
            "plc_online": self.plc.online,
            "belt_mm_s": self.plc.speed_mm_s,
            "plc_alarms": list(self.plc.alarms),
            "ejects_accepted": self.counters.outcomes[Outcome.ACCEPTED],
            "magnetometer": self.hallbar.counters if self.hallbar else None,
            "cameras": {
                c.name: {
                    "captured": c.captured,
                    "dropped": c.dropped,
                    "torn": c.torn,
                    "source_dropped": c.source_dropped,
                    "missing": c.missing,
                    "stalls": c.stalls,
                    "reconnects": c.reconnects,
                }
                for c in self.cameras
            },
        }
        if self.shadow is not None:  # the shadow model's comparison so far (docs/shadow.md)
            out["shadow"] = {k: self.shadow.get(k) for k in ("model", "compared", "skipped", "agreement")}
        return out
