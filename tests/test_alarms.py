"""The alarm board: debounced raise, clear, acknowledge, and what the operator's list shows."""

from __future__ import annotations

import pytest

from sorter.core.alarms import AlarmBoard, Condition

pytestmark = pytest.mark.fast

PLC = Condition("plc_offline", "no answer", "check the PLC's cable")
BAR = Condition("hallbar_offline", "port failed", "check the bar's cable")


def test_a_condition_must_hold_before_it_is_raised() -> None:
    board = AlarmBoard(delay_s=1.0)
    assert board.update([PLC], now=0.0) == ([], [])
    assert board.update([], now=0.5) == ([], [])  # a flicker raises nothing
    assert board.update([PLC], now=1.0) == ([], [])
    raised, _ = board.update([PLC], now=2.0)
    assert [a.name for a in raised] == ["plc_offline"] and raised[0].raised_at == 2.0
    assert board.update([PLC], now=3.0) == ([], [])  # raised once


def test_cleared_alarms_stay_shown_until_acknowledged() -> None:
    board = AlarmBoard(delay_s=0.0)
    board.update([PLC, BAR], now=0.0)
    assert {a.name for a in board.active} == {"plc_offline", "hallbar_offline"}
    _, cleared = board.update([BAR], now=5.0)
    assert [a.name for a in cleared] == ["plc_offline"] and cleared[0].cleared_at == 5.0
    assert [a.name for a in board.active] == ["hallbar_offline"]
    assert {a.name for a in board.shown} == {"plc_offline", "hallbar_offline"}  # cleared, not yet acknowledged
    acked = board.acknowledge("plc_offline", "olga", now=6.0)
    assert acked is not None and acked.acked_by == "olga"
    assert [a.name for a in board.shown] == ["hallbar_offline"] and board.history[-1].name == "plc_offline"
    # an active alarm acknowledged stays until it clears, then leaves the board at once
    board.acknowledge("hallbar_offline", "olga", now=7.0)
    assert [a.acked_by for a in board.shown] == ["olga"]
    board.update([], now=8.0)
    assert board.shown == [] and [a.name for a in board.history] == ["plc_offline", "hallbar_offline"]
    assert board.acknowledge("nothing", "olga") is None


def test_an_alarm_that_returns_is_a_new_alarm() -> None:
    board = AlarmBoard(delay_s=0.0)
    board.update([PLC], now=0.0)
    board.update([], now=1.0)
    raised, _ = board.update([PLC], now=2.0)
    assert raised and raised[0].raised_at == 2.0 and raised[0].cleared_at is None
    assert PLC.name in board.active[0].text() and "check the PLC's cable" in board.active[0].text()
