"""Clock model: synthetic polls of a known belt, with noise, outliers, wrap and speed changes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from sorter.core.clock import ClockModel

pytestmark = pytest.mark.fast

WRAP = 1 << 32
V = 50_000.0  # counts/s: 2.5 m/s at 20 counts/mm
POLL = 0.010
RTT = 0.0006
SIGMA_T = 0.0002  # s of latch-time scatter about the poll midpoint -> 10 counts at V


def true_count(c0: float, speed: Callable[[float], float], dt: float = 1e-4) -> Callable[[float], float]:
    """Integrate a speed profile (counts/s) into a count function of time (t >= 0)."""
    cache: dict[str, np.ndarray] = {}

    def f(t: float) -> float:
        if "grid" not in cache:
            grid = np.arange(0.0, 30.0, dt)
            cache["grid"] = grid
            cache["pos"] = c0 + np.concatenate(([0.0], np.cumsum([speed(x) * dt for x in grid[:-1]])))
        return float(np.interp(t, cache["grid"], cache["pos"]))

    return f


def feed(
    model: ClockModel,
    count: Callable[[float], float],
    t_start: float,
    t_end: float,
    rng: np.random.Generator,
    *,
    sigma_t: float = SIGMA_T,
    delayed_share: float = 0.0,
    glitch_share: float = 0.0,
) -> float:
    """Poll every POLL seconds from t_start to t_end; returns the last poll's midpoint."""
    t = t_start
    while t < t_end:
        latch = t + rng.normal(0.0, sigma_t)
        c = int(count(latch))
        t_req, t_resp = t - RTT / 2, t + RTT / 2
        if rng.random() < delayed_share:  # the response sat in some queue for 20 ms
            t_resp += 0.020
        if rng.random() < glitch_share:  # a corrupt reading
            c += int(rng.choice([-1, 1]) * rng.uniform(2_000, 20_000))
        model.add(t_req, t_resp, c % WRAP)
        last = t
        t += POLL
    return last


def test_not_ready_until_samples() -> None:
    m = ClockModel()
    assert not m.ready and m.latest is None and m.rate == 0.0
    assert m.time_at(1000) is None
    with pytest.raises(RuntimeError):
        m.count_at(0.0)
    m.add(0.0, 0.001, 1000)
    m.add(0.01, 0.011, 1500)
    assert not m.ready
    m.add(0.02, 0.021, 2000)
    assert m.ready
    assert m.rate == pytest.approx(50_000, rel=1e-6)


def test_constant_speed_prediction_within_noise() -> None:
    rng = np.random.default_rng(1)
    count = true_count(1_000_000, lambda t: V)
    m = ClockModel(clock=lambda: 0.0)
    last = feed(m, count, 0.0, 2.0, rng)
    noise = V * SIGMA_T  # 10 counts
    assert m.rate == pytest.approx(V, rel=0.003)
    assert 0.5 * noise < m.residual_std_counts < 2.0 * noise
    for ahead in (0.0, 0.05, 0.1):
        assert abs(m.count_at(last + ahead) - count(last + ahead)) < 3 * noise
    target = count(last + 0.08)
    t_at = m.time_at(target)
    assert t_at is not None and abs(t_at - (last + 0.08)) < 3 * SIGMA_T
    assert m.seconds_until(target, now=last) == pytest.approx(0.08, abs=3 * SIGMA_T)


def test_wrap_crossing_keeps_counts_unwrapped() -> None:
    rng = np.random.default_rng(2)
    start = WRAP - 30_000  # wraps 0.6 s in
    count = true_count(start, lambda t: V)
    m = ClockModel()
    seen: list[int] = []
    t = 0.0
    while t < 1.2:
        c = int(count(t))
        seen.append(m.add(t - RTT / 2, t + RTT / 2, c % WRAP))
        t += POLL
    assert seen == sorted(seen) and seen[0] < WRAP < seen[-1]
    assert seen[-1] == int(count(t - POLL))  # exact, in the unwrapped space of the first sample
    assert m.latest is not None and m.latest[1] == seen[-1]
    assert m.unwrap(5) == WRAP + 5
    assert m.count_at(t) > WRAP
    t_at = m.time_at(WRAP + 40_000)
    assert t_at is not None and t_at == pytest.approx(0.6 + 40_000 / V, abs=1e-3)
    del rng


def test_outliers_are_rejected() -> None:
    rng = np.random.default_rng(3)
    count = true_count(5_000_000, lambda t: V)
    clean = ClockModel()
    dirty = ClockModel()
    feed(clean, count, 0.0, 2.0, np.random.default_rng(3))
    last = feed(dirty, count, 0.0, 2.0, rng, delayed_share=0.10, glitch_share=0.03)
    noise = V * SIGMA_T
    assert dirty.rate == pytest.approx(V, rel=0.005)
    assert abs(dirty.count_at(last + 0.05) - count(last + 0.05)) < 3 * noise
    assert dirty.residual_std_counts < 2 * noise
    assert dirty.regime_changes == 0  # scattered outliers are not mistaken for speed changes


def test_follows_slow_drift() -> None:
    """+-5 % sinusoidal speed drift over 20 s: the fit tracks the speed and the position."""
    rng = np.random.default_rng(4)

    def speed(t: float) -> float:
        return V * (1 + 0.05 * math.sin(2 * math.pi * t / 20))

    count = true_count(0, speed)
    m = ClockModel()
    t = 0.0
    worst = 0.0
    while t < 12.0:
        t = feed(m, count, t, t + 0.5, rng) + POLL
        last = t - POLL
        assert m.rate == pytest.approx(speed(last), rel=0.01)
        worst = max(worst, abs(m.count_at(last + 0.05) - count(last + 0.05)))
    assert worst < 60  # 3 mm at 20 counts/mm under an aggressive drift; slow drift is far better


@pytest.mark.parametrize("seed", [5, 37])  # 37: a noise excursion just before the step starts the CUSUM early
@pytest.mark.parametrize("factor", [1.05, 0.95, 0.5, 0.0])
def test_speed_step_is_followed(factor: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = true_count(0, lambda t: V if t < 1.0 else V * factor)
    m = ClockModel()
    feed(m, count, 0.0, 1.0, rng)
    last = feed(m, count, 1.0, 1.15, rng)
    assert m.regime_changes >= 1
    noise = V * SIGMA_T
    assert abs(m.rate - V * factor) < 0.02 * V
    assert abs(m.count_at(last + 0.05) - count(last + 0.05)) < 4 * noise
    last = feed(m, count, last + POLL, 1.6, rng)
    assert abs(m.count_at(last + 0.05) - count(last + 0.05)) < 3 * noise


def test_stop_and_restart() -> None:
    rng = np.random.default_rng(6)
    count = true_count(0, lambda t: V if t < 1.0 or t >= 2.0 else 0.0)
    m = ClockModel()
    feed(m, count, 0.0, 1.0, rng)
    last = feed(m, count, 1.0, 1.1, rng)
    assert m.rate < m.min_rate
    assert m.time_at(count(last) + 100) is None and m.seconds_until(count(last) + 100) is None
    assert m.count_at(last + 0.5) == pytest.approx(count(1.0), abs=5)
    last = feed(m, count, 1.1, 2.1, rng)
    assert m.rate == pytest.approx(V, rel=0.05)
    last = feed(m, count, last + POLL, 2.4, rng)
    assert abs(m.count_at(last + 0.05) - count(last + 0.05)) < 3 * V * SIGMA_T


def test_add_is_cheap() -> None:
    import time

    m = ClockModel()
    count = true_count(0, lambda t: V)
    rng = np.random.default_rng(7)
    feed(m, count, 0.0, 1.0, rng)  # fill the window
    t0 = time.perf_counter()
    feed(m, count, 1.0, 2.0, rng)  # 100 more adds
    per_add = (time.perf_counter() - t0) / 100
    assert per_add < 0.002  # generous: shared CI cores; typically ~0.1 ms
