"""The line's PackML state machine (ISA-TR88.00.02 / OPC 30050), pure logic, no I/O.

Commands move the machine from a wait state into an acting state ("-ing");
the acting state's work, done by whoever owns the machine (sorter.core.linestate),
ends with `complete()` (PackML's "state complete"), which moves it on to the
next wait state. A command not allowed in the current state raises
InvalidState and changes nothing. Numbering is PackTags' StateCurrent.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum, StrEnum


class State(IntEnum):
    CLEARING = 1
    STOPPED = 2
    STARTING = 3
    IDLE = 4
    SUSPENDED = 5
    EXECUTE = 6
    STOPPING = 7
    ABORTING = 8
    ABORTED = 9
    HOLDING = 10
    HELD = 11
    UNHOLDING = 12
    SUSPENDING = 13
    UNSUSPENDING = 14
    RESETTING = 15
    COMPLETING = 16
    COMPLETE = 17

    @property
    def label(self) -> str:
        """The state's PackML name, as shown to operators and served over OPC UA ("Execute", "Held")."""
        return self.name.capitalize()

    @property
    def acting(self) -> bool:
        return self in _COMPLETES


class Command(StrEnum):
    START = "Start"
    STOP = "Stop"
    HOLD = "Hold"
    UNHOLD = "Unhold"
    SUSPEND = "Suspend"
    UNSUSPEND = "Unsuspend"
    RESET = "Reset"
    ABORT = "Abort"
    CLEAR = "Clear"


class InvalidState(Exception):
    """The command is not allowed in the current state (OPC UA: BadInvalidState)."""


S, C = State, Command

# acting state -> the state its completion leads to
_COMPLETES: dict[State, State] = {
    S.CLEARING: S.STOPPED,
    S.STARTING: S.EXECUTE,
    S.STOPPING: S.STOPPED,
    S.ABORTING: S.ABORTED,
    S.HOLDING: S.HELD,
    S.UNHOLDING: S.EXECUTE,
    S.SUSPENDING: S.SUSPENDED,
    S.UNSUSPENDING: S.EXECUTE,
    S.RESETTING: S.IDLE,
    S.COMPLETING: S.COMPLETE,
}

# the Aborted super-state (Aborting, Aborted, Clearing) ignores Stop; Abort reaches everything else
_NOT_STOPPABLE = {S.STOPPED, S.STOPPING, S.ABORTING, S.ABORTED, S.CLEARING}
_NOT_ABORTABLE = {S.ABORTING, S.ABORTED}

_TRANSITIONS: dict[tuple[State, Command], State] = {
    (S.STOPPED, C.RESET): S.RESETTING,
    (S.COMPLETE, C.RESET): S.RESETTING,
    (S.IDLE, C.START): S.STARTING,
    (S.EXECUTE, C.HOLD): S.HOLDING,
    # a line can be held whenever it is producing, also mid-way in or out of Suspended/Held
    (S.SUSPENDED, C.HOLD): S.HOLDING,
    (S.SUSPENDING, C.HOLD): S.HOLDING,
    (S.UNSUSPENDING, C.HOLD): S.HOLDING,
    (S.UNHOLDING, C.HOLD): S.HOLDING,
    (S.HELD, C.UNHOLD): S.UNHOLDING,
    (S.EXECUTE, C.SUSPEND): S.SUSPENDING,
    (S.SUSPENDED, C.UNSUSPEND): S.UNSUSPENDING,
    (S.ABORTED, C.CLEAR): S.CLEARING,
    **{(s, C.STOP): S.STOPPING for s in State if s not in _NOT_STOPPABLE},
    **{(s, C.ABORT): S.ABORTING for s in State if s not in _NOT_ABORTABLE},
}

Listener = Callable[[State, State, str], None]


class PackMLMachine:
    """Current state plus the allowed transitions; listeners hear (old, new, why) on every change."""

    def __init__(self, initial: State = State.STOPPED) -> None:
        self._state = initial
        self._listeners: list[Listener] = []

    @property
    def state(self) -> State:
        return self._state

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def allowed(self) -> list[Command]:
        """Commands accepted in the current state, in the order of the Command enum."""
        return [c for c in Command if (self._state, c) in _TRANSITIONS]

    def can(self, cmd: Command) -> bool:
        return (self._state, Command(cmd)) in _TRANSITIONS

    def command(self, cmd: Command | str, why: str = "") -> State:
        """Apply a command; raises InvalidState (and changes nothing) if the current state refuses it."""
        cmd = Command(cmd)
        target = _TRANSITIONS.get((self._state, cmd))
        if target is None:
            raise InvalidState(f"{cmd.value} is not allowed in state {self._state.label}")
        self._move(target, why or cmd.value)
        return target

    def complete(self, why: str = "state complete") -> State:
        """The acting state's work is done: move on to its wait state."""
        target = _COMPLETES.get(self._state)
        if target is None:
            raise InvalidState(f"{self._state.label} is not an acting state")
        self._move(target, why)
        return target

    def _move(self, target: State, why: str) -> None:
        old, self._state = self._state, target
        for fn in self._listeners:
            fn(old, target, why)
