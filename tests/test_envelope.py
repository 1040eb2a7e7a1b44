"""`sorter sim envelope`'s rows and the bars they are judged against (the grid itself is a command people
run on purpose: docs/results.md, "The operating envelope")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sim.envelope import Point, grid, misses, point_row, write_table

pytestmark = pytest.mark.fast


def report(**changes: Any) -> dict[str, Any]:
    """A demo report (sim/report.py build_report) with the figures a grid row reads."""
    rep: dict[str, Any] = {
        "pieces_fed": 1000,
        "pieces_accounted": 1000,
        "records_unmatched": 3,
        "fractions": {
            "ndfeb": {"purity": 1.0, "recovery": 0.99},
            "ferrite_smco": {"purity": 0.995, "recovery": 0.97},
        },
        "frames_dropped": 0,
        "frames_parted_coarse": 7,
        "eject_error_mm": {"p99": 0.4},
        "ejects_late": 0,
        "eject_outcomes": {"accepted": 700, "conflict": 2},
        "decision_latency_ms": {"p99": 130.0},
        "service_rss_mb": {"start": 180.0, "peak": 262.5, "end": 240.0},
    }
    rep.update(changes)
    return rep


def test_a_row_has_the_services_own_memory_and_the_cpu_per_piece() -> None:
    row = point_row(Point(3500, 60, 0.15), report(), seed=101, cpu_s=25.0)
    assert row["service_rss_mb"] == 262.5  # the service's peak, not the largest child's (the simulator)
    assert row["cpu_ms_per_piece"] == 25.0 and row["accounted"] == 1.0 and row["conflicts"] == 2
    assert row["frames_parted_coarse"] == 7  # shedding is shown, not judged: no bar of its own
    assert misses(row) == []
    assert point_row(Point(2000, 20, 0), report(service_rss_mb=None), seed=1, cpu_s=1.0)["service_rss_mb"] is None


def test_a_point_short_of_a_bar_says_which_and_by_how_much(tmp_path: Path) -> None:
    short = point_row(
        Point(2000, 60, 0.15),
        report(pieces_accounted=985, eject_error_mm={"p99": 1.42}, frames_dropped=3),
        seed=101,
        cpu_s=10.0,
    )
    assert misses(short) == [
        "accounted 0.985 (target >= 0.998)",
        "frames_dropped 3 (target <= 0)",
        "eject_error_p99_mm 1.42 (target <= 1.0)",
    ]
    rows = [point_row(p, report(), seed=101, cpu_s=1.0) for p in grid([2000], [20], [0])] + [short]
    write_table(rows, tmp_path, lockstep=True, seed=101, duration=30)
    text = (tmp_path / "envelope.md").read_text()
    assert "- v2000-r60-t0.15: accounted 0.985 (target >= 0.998)" in text
    assert "v2000-r20-t0:" not in text.split("## Points short of a target")[1]
    assert (tmp_path / "envelope.csv").read_text().splitlines()[0].endswith("service_rss_mb,error")
