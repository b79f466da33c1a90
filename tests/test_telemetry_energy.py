"""Energy integration against traces with analytically known integrals (error < 0.1 %)."""

from __future__ import annotations

import math
import random

import pytest

from jetfed.edge.telemetry.energy import WindowIntegral, trapezoid_j

TOLERANCE = 1e-3


def _uniform(start_s: float, end_s: float, count: int) -> list:
    return [start_s + (end_s - start_s) * i / (count - 1) for i in range(count)]


def test_constant_power() -> None:
    times = _uniform(0.0, 10.0, 101)
    assert trapezoid_j(times, [5.0] * len(times)) == pytest.approx(50.0, rel=TOLERANCE)


def test_ramp_is_exact() -> None:
    times = _uniform(0.0, 10.0, 11)
    assert trapezoid_j(times, [2.0 * t for t in times]) == pytest.approx(100.0, rel=1e-12)


def test_step_between_samples() -> None:
    times = _uniform(0.0, 10.0, 1001)
    power = [3.0 if t < 4.005 else 8.0 for t in times]
    exact = 3.0 * 4.005 + 8.0 * (10.0 - 4.005)
    assert trapezoid_j(times, power) == pytest.approx(exact, rel=TOLERANCE)


def test_irregular_sample_times() -> None:
    rng = random.Random(7)
    times = sorted({0.0, 20.0, *(rng.uniform(0.0, 20.0) for _ in range(4000))})
    linear = [4.0 + 0.5 * t for t in times]
    assert trapezoid_j(times, linear) == pytest.approx(4.0 * 20 + 0.25 * 400, rel=1e-9)
    smooth = [6.0 + math.sin(t) for t in times]
    exact = 6.0 * 20 + (1 - math.cos(20.0))
    assert trapezoid_j(times, smooth) == pytest.approx(exact, rel=TOLERANCE)


def test_missing_values_are_skipped_and_all_missing_is_none() -> None:
    assert trapezoid_j([0.0, 1.0, 2.0], [None, None, None]) is None
    assert trapezoid_j([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, None, 1.0]) == pytest.approx(1.0)


def _window(points: list, start_s: float, end_s: float) -> WindowIntegral:
    window = WindowIntegral(start_s)
    for t, value in points:
        window.add(t, value)
    window.close(end_s)
    return window


def test_window_interpolates_its_start_and_cuts_an_overshooting_sample() -> None:
    ramp = [(float(t), 2.0 * t) for t in range(0, 9)]  # P = 2t, samples at whole seconds
    window = _window(ramp, 2.25, 7.75)
    assert window.energy_j == pytest.approx(7.75**2 - 2.25**2, rel=1e-12)
    assert window.peak_w == pytest.approx(15.5)  # P(7.75); the sample at 8 s lies outside


def test_windows_that_tile_a_run_add_up_to_the_run() -> None:
    rng = random.Random(3)
    times = sorted(rng.uniform(0.0, 30.0) for _ in range(300))
    points = [(t, 5.0 + 3.0 * math.sin(t)) for t in times]
    whole = trapezoid_j(times, [p for _, p in points])
    cuts = [times[0], 4.1, 9.37, 17.0, 25.5, times[-1]]
    # As with a polled sensor: each window sees the sample at or after its end (here up to
    # three of them, which it must cut back out).
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        seen = [p for p in points if p[0] <= b] + [p for p in points if p[0] > b][:3]
        parts.append(_window(seen, a, b).energy_j)
    assert sum(p for p in parts if p is not None) == pytest.approx(whole, rel=1e-9)


def test_phase_shorter_than_a_sample_period_holds_the_last_value() -> None:
    window = WindowIntegral(10.2, before=(10.0, 7.0))
    window.close(10.3)
    assert window.energy_j == pytest.approx(0.7)
    assert WindowIntegral(1.0).energy_j is None
