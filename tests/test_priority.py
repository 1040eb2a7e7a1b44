"""Real-time priority for the time-critical threads only (sorter/core/priority.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from sorter.core import priority

pytestmark = [
    pytest.mark.fast,
    pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling policies"),
]


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _allowed() -> bool:
    """Whether this process may use SCHED_RR (root or CAP_SYS_NICE), asked of the OS in a throwaway thread."""

    def probe() -> bool:
        try:
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
        except PermissionError:
            return False
        return True

    return bool(_in_thread(probe))


@pytest.fixture(autouse=True)
def _normal_afterwards() -> Any:
    yield
    priority.configure(priority.Priority("normal"))


def test_a_time_critical_thread_is_raised_and_what_it_starts_is_not() -> None:
    priority.configure(priority.Priority("rr", 7))

    def critical() -> tuple[str, int, int, int]:
        got = priority.enter()
        mine = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        child = _in_thread(lambda: os.sched_getscheduler(0))  # a helper thread it starts
        priority.leave()
        return got, mine, child, os.sched_getscheduler(0)

    got, mine, child, after = _in_thread(critical)
    assert child == os.SCHED_OTHER and after == os.SCHED_OTHER
    if _allowed():
        assert got == "SCHED_RR 7" and mine == os.SCHED_RR
    else:  # no CAP_SYS_NICE: said, and the thread works on at normal priority
        assert got.startswith("normal (SCHED_RR refused: no permission") and mine == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the test's own thread was never touched


def test_normal_leaves_threads_alone() -> None:
    priority.configure(priority.Priority("normal"))
    assert _in_thread(lambda: (priority.enter(), os.sched_getscheduler(0))) == ("normal", os.SCHED_OTHER)


def test_an_inherited_priority_reaches_the_threads_started_after_it() -> None:
    if not _allowed():
        pytest.skip("needs root or CAP_SYS_NICE")
    priority.configure(priority.Priority("fifo", 3))

    def process_wide() -> int:
        priority.enter(inherited=True)
        child = _in_thread(lambda: os.sched_getscheduler(0))
        priority.leave()
        return int(child)

    assert _in_thread(process_wide) == os.SCHED_FIFO
