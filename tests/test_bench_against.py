"""`sorter bench --against REV`: the benches alternate, medians and ratios are of the runs made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sim import bench_against
from sim.bench_against import AgainstError, compare, figures

ROOT = Path(__file__).resolve().parents[1]


def _run(cpu32: float, cpu128: float, max_rate: float | None) -> dict[str, Any]:
    return {
        "at_nominal_feed": {"whole_ms_per_frame": cpu32 / 2},
        "by_feed_rate": {"32": {"whole_cpu_ms_per_frame": cpu32}, "128": {"whole_cpu_ms_per_frame": cpu128}},
        "max_feed_rate_per_s": max_rate,
    }


@pytest.mark.fast
def test_runs_alternate_and_ratios_are_of_the_medians(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench_against, "unpack", lambda rev, into: "c0ffee")
    new = iter([_run(2.0, 6.0, 120.0), _run(2.2, 6.6, 110.0), _run(9.0, 9.0, 100.0)])
    old = iter([_run(3.0, 8.0, 90.0), _run(3.3, 8.8, 80.0), _run(3.0, 8.0, 85.0)])
    order: list[str] = []

    def bench(tree: Path, frames: int) -> dict[str, Any]:
        assert frames == 50
        which = "new" if tree == bench_against.ROOT else "old"
        order.append(which)
        return next(new if which == "new" else old)

    out = compare("v1", frames=50, repeat=3, bench=bench)
    assert order == ["new", "old", "old", "new", "new", "old"]  # drift over the run hits both alike
    assert out["old"] == {"rev": "v1", "commit": "c0ffee"}
    assert out["median"]["new"]["cpu_ms_per_frame_at_128"] == 6.6
    assert out["median"]["old"]["cpu_ms_per_frame_at_128"] == 8.0
    assert out["ratio_new_over_old"]["cpu_ms_per_frame_at_128"] == round(6.6 / 8.0, 3)
    assert out["ratio_new_over_old"]["max_feed_rate_per_s"] == round(110.0 / 85.0, 3)
    assert len(out["runs"]["new"]) == len(out["runs"]["old"]) == 3


@pytest.mark.fast
def test_a_run_that_keeps_up_with_no_rate_has_no_max_figure() -> None:
    assert "max_feed_rate_per_s" not in figures(_run(9.0, 30.0, None))


@pytest.mark.wire
def test_an_unknown_revision_is_named(tmp_path: Path) -> None:
    with pytest.raises(AgainstError, match="no-such-rev"):
        bench_against.unpack("no-such-rev", tmp_path)


@pytest.mark.wire
def test_bench_against_head_runs_both_trees() -> None:
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "sorter"),
            "bench",
            "--against",
            "HEAD",
            "--repeat",
            "1",
            "--frames",
            "8",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert out["old"]["commit"] == head.strip()
    assert len(out["runs"]["new"]) == len(out["runs"]["old"]) == 1
    assert out["runs"]["old"][0]["cpu_ms_per_frame_at_32"] > 0
    assert set(out["ratio_new_over_old"]) >= {"cpu_ms_per_frame_at_32", "cpu_ms_per_frame_at_128"}
