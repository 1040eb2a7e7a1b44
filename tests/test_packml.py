"""The PackML state machine: PackTags numbering, allowed commands, refusals change nothing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sorter.core.packml import Command, InvalidState, PackMLMachine, State

pytestmark = pytest.mark.fast


def test_packtags_numbering_and_names() -> None:
    assert [(s.value, s.label) for s in State] == [
        (1, "Clearing"),
        (2, "Stopped"),
        (3, "Starting"),
        (4, "Idle"),
        (5, "Suspended"),
        (6, "Execute"),
        (7, "Stopping"),
        (8, "Aborting"),
        (9, "Aborted"),
        (10, "Holding"),
        (11, "Held"),
        (12, "Unholding"),
        (13, "Suspending"),
        (14, "Unsuspending"),
        (15, "Resetting"),
        (16, "Completing"),
        (17, "Complete"),
    ]


def walk(m: PackMLMachine, *steps: str) -> list[str]:
    """Apply commands (names) or 'SC' (state complete); returns the states passed through."""
    seen = []
    for step in steps:
        if step == "SC":
            m.complete()
        else:
            m.command(step)
        seen.append(m.state.label)
    return seen


def test_a_shift_through_the_states() -> None:
    m = PackMLMachine()
    changes: list[tuple[str, str, str]] = []
    m.add_listener(lambda old, new, why: changes.append((old.label, new.label, why)))
    assert m.state is State.STOPPED and m.allowed() == [Command.RESET, Command.ABORT]
    assert walk(m, "Reset", "SC", "Start", "SC") == ["Resetting", "Idle", "Starting", "Execute"]
    assert walk(m, "Hold", "SC", "Unhold", "SC") == ["Holding", "Held", "Unholding", "Execute"]
    assert walk(m, "Suspend", "SC", "Unsuspend", "SC") == ["Suspending", "Suspended", "Unsuspending", "Execute"]
    assert walk(m, "Abort", "SC", "Clear", "SC") == ["Aborting", "Aborted", "Clearing", "Stopped"]
    assert walk(m, "Reset", "SC", "Stop", "SC") == ["Resetting", "Idle", "Stopping", "Stopped"]
    assert changes[0] == ("Stopped", "Resetting", "Reset")
    assert len(changes) == 20


@pytest.mark.parametrize(
    ("state", "command"),
    [
        (State.STOPPED, Command.START),  # Reset first
        (State.IDLE, Command.HOLD),
        (State.EXECUTE, Command.START),
        (State.EXECUTE, Command.UNHOLD),
        (State.HELD, Command.START),
        (State.ABORTED, Command.STOP),  # only Clear leaves Aborted
        (State.ABORTED, Command.RESET),
        (State.CLEARING, Command.STOP),
        (State.ABORTING, Command.ABORT),
        (State.STOPPED, Command.STOP),
    ],
)
def test_refused_commands_change_nothing(state: State, command: Command) -> None:
    m = PackMLMachine(state)
    heard: list[object] = []
    m.add_listener(lambda *a: heard.append(a))
    with pytest.raises(InvalidState, match=f"{command.value} is not allowed in state {state.label}"):
        m.command(command)
    assert m.state is state and heard == []


def test_complete_only_in_acting_states() -> None:
    with pytest.raises(InvalidState):
        PackMLMachine(State.EXECUTE).complete()
    assert [s.label for s in State if s.acting] == [
        "Clearing",
        "Starting",
        "Stopping",
        "Aborting",
        "Holding",
        "Unholding",
        "Suspending",
        "Unsuspending",
        "Resetting",
        "Completing",
    ]


@given(st.lists(st.one_of(st.sampled_from(list(Command)), st.just("SC")), max_size=40))
def test_any_sequence_keeps_the_rules(steps: list[Command | str]) -> None:
    m = PackMLMachine()
    for step in steps:
        before = m.state
        try:
            m.complete() if step == "SC" else m.command(step)
        except InvalidState:
            assert m.state is before  # a refusal changes nothing
            continue
        if step == Command.ABORT:
            assert m.state is State.ABORTING
        elif step == Command.STOP:
            assert m.state is State.STOPPING
    # Abort is always possible except while already aborting/aborted, and leads back to Stopped
    if m.state not in (State.ABORTING, State.ABORTED):
        m.command(Command.ABORT)
    if m.state is State.ABORTING:
        m.complete()
    m.command(Command.CLEAR)
    m.complete()
    assert m.state is State.STOPPED
