"""What the line shows to the outside (OPC UA server, later the HMI): live figures and one immutable snapshot."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sorter.core.messages import Decision
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
