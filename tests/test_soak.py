"""The soak's sampling and summary (sim/soak.py): growth after the buffers filled, CPU, latency over time."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from sim.soak import SoakSample, _proc_cpu_s, summary, write_csv

pytestmark = pytest.mark.fast


def _sample(t: float, rss: float, lat: float = 150.0) -> SoakSample:
    return SoakSample(t, rss, 400.0 + t / 100, 0.6, 0.5, lat, int(t * 30), 0)


def test_an_hour_is_judged_from_minute_5_to_the_end() -> None:
    samples = [_sample(t, 250.0 + (30.0 if t < 300 else 0.0) + t / 360) for t in range(10, 3601, 10)]
    s = summary(samples, 10.0)
    assert s["settled_at_s"] == 300 and s["samples"] == 360
    # the early peak (buffers filling) is not growth; 10 MB over the 55 min after it is
    assert s["service_rss_mb"]["growth_settled_to_end"] == pytest.approx(
        10.0 - 300 / 360, abs=0.05
    )  # rounded to 0.1 MB
    assert s["service_rss_mb"]["max"] == pytest.approx(280.0 + 290 / 360, abs=0.01)
    assert s["cpu_cores_mean"] == {"service": 0.6, "sim": 0.5}


def test_a_short_run_is_judged_from_its_middle() -> None:
    samples = [_sample(t, 200.0 + t, lat=100.0 + t) for t in (10, 20, 30, 40, 50, 60)]
    s = summary(samples, 10.0)
    assert s["settled_at_s"] == 30 and s["service_rss_mb"]["growth_settled_to_end"] == 30.0
    assert s["latency_p99_ms"] == {"max": 160.0, "end": 160.0}
    assert summary([], 10.0) == {"every_s": 10.0, "samples": 0}


def test_samples_are_written_as_csv(tmp_path: Path) -> None:
    write_csv([_sample(10, 250.0), _sample(20, 251.5)], tmp_path / "soak.csv")
    rows = list(csv.DictReader((tmp_path / "soak.csv").open()))
    assert [r["service_rss_mb"] for r in rows] == ["250.0", "251.5"] and rows[1]["t_s"] == "20"


def test_a_process_cpu_time_is_read_from_proc() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    sum(i * i for i in range(200_000))  # some CPU of our own
    got = _proc_cpu_s(os.getpid())
    t = os.times()
    assert got is not None and 0 < got <= t.user + t.system + 0.05
    assert _proc_cpu_s(2**22 + 12345) is None  # no such process
