"""The machine's CPU shares a demo reports beside its latencies (sim/hostcpu.py)."""

from __future__ import annotations

import os

import pytest

from sim.hostcpu import cpu_shares, cpu_ticks

pytestmark = pytest.mark.fast

HZ = os.sysconf("SC_CLK_TCK")


def _stat(tmp_path, *ticks: int):
    path = tmp_path / "stat"
    path.write_text("cpu  " + " ".join(map(str, ticks)) + " 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")
    return cpu_ticks(path)


def test_shares_of_the_machine_between_two_readings(tmp_path):
    before = _stat(tmp_path, 100, 0, 50, 1000, 10, 0, 5, 20)
    # 400 ticks later: 150 busy (user, nice, system, irq, softirq), 200 idle or waiting for disk, 50 stolen
    after = _stat(tmp_path, 200, 10, 80, 1190, 20, 5, 10, 70)
    got = cpu_shares(before, after)
    assert got is not None
    assert got["steal_share"] == 0.125 and got["busy_share"] == 0.375 and got["idle_share"] == 0.5
    assert got["steal_s"] == round(50 / HZ, 1)


def test_no_shares_where_the_os_does_not_say(tmp_path):
    assert cpu_ticks(tmp_path / "missing") is None
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert cpu_ticks(tmp_path / "odd") is None
    reading = _stat(tmp_path, 1, 2, 3, 4, 5, 6, 7, 8)
    assert cpu_shares(None, reading) is None
    assert cpu_shares(reading, reading) is None  # no time between them


def test_this_machine_reports_its_own_ticks():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat (not Linux)")
    ticks = cpu_ticks()
    assert ticks is not None and ticks["idle"] > 0
