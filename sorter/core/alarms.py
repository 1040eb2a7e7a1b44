"""The line's alarm board: which alarms are active, since when, why, what to do, and who acknowledged them.

Conditions are evaluated by the service (`update()` with the set of alarms that hold
right now); the board keeps the history an operator needs at hand-over: when each
alarm was raised and cleared, and whether someone acknowledged it. An alarm stays on
the board after it cleared until it is acknowledged, as operators expect.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

HISTORY = 200


@dataclass(frozen=True, slots=True)
class Alarm:
    name: str  # stable id, e.g. "plc_offline", "camera_cam1_offline"
    cause: str
    action: str  # what the operator should do
    raised_at: float  # wall-clock seconds (time.time())
    cleared_at: float | None = None
    acked_by: str | None = None
    acked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.cleared_at is None

    def text(self) -> str:
        return f"{self.name}: {self.cause} - {self.action}"


@dataclass(frozen=True, slots=True)
class Condition:
    """An alarm condition that holds right now."""

    name: str
    cause: str
    action: str


class AlarmBoard:
    def __init__(self, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s  # a condition must hold this long to raise an alarm (no flicker at start-up)
        self._shown: dict[str, Alarm] = {}  # active, or cleared but not yet acknowledged
        self._pending: dict[str, float] = {}  # condition name -> when first seen (monotonic seconds)
        self.history: deque[Alarm] = deque(maxlen=HISTORY)  # every alarm once it has left the board

    def update(
        self, conditions: list[Condition], now: float | None = None, t_mono: float | None = None
    ) -> tuple[list[Alarm], list[Alarm]]:
        """Raise alarms whose condition held delay_s, clear those whose condition went; returns (raised, cleared).

        `now` (wall clock) only stamps the alarms; how long a condition held is measured on `t_mono`
        (monotonic; `now` where a test passes only that), so a step of the wall clock (NTP, an operator
        setting the time) neither raises a flickering condition at once nor delays an alarm by the step.
        """
        if t_mono is None:
            t_mono = time.monotonic() if now is None else now
        now = time.time() if now is None else now
        holding = {c.name: c for c in conditions}
        self._pending = {n: self._pending.get(n, t_mono) for n in holding}
        raised, cleared = [], []
        for name, c in holding.items():
            old = self._shown.get(name)
            if (old is None or not old.active) and t_mono - self._pending[name] >= self.delay_s:
                if old is not None:
                    self.history.append(old)  # came back before anyone acknowledged it: keep the first spell
                a = Alarm(name, c.cause, c.action, now)
                self._shown[name] = a
                raised.append(a)
        for name, a in list(self._shown.items()):
            if a.active and name not in holding:
                done = replace(a, cleared_at=now)
                cleared.append(done)
                self._retire(done) if done.acked_by else self._put(done)
        return raised, cleared

    def acknowledge(self, name: str, user: str, now: float | None = None) -> Alarm | None:
        """Acknowledge an alarm on the board (None if there is no such alarm)."""
        a = self._shown.get(name)
        if a is None:
            return None
        done = replace(a, acked_by=user, acked_at=time.time() if now is None else now)
        self._retire(done) if not done.active else self._put(done)
        return done

    def _put(self, a: Alarm) -> None:
        self._shown[a.name] = a

    def _retire(self, a: Alarm) -> None:
        self._shown.pop(a.name, None)
        self.history.append(a)

    @property
    def active(self) -> list[Alarm]:
        return [a for a in self._shown.values() if a.active]

    @property
    def shown(self) -> list[Alarm]:
        """What the operator's alarm list shows: active ones and cleared ones not yet acknowledged, newest first."""
        return sorted(self._shown.values(), key=lambda a: a.raised_at, reverse=True)
