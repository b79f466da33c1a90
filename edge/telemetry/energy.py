"""Energy as the trapezoidal integral of sampled power over the samples' own timestamps."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

Point = Tuple[float, Optional[float]]


def trapezoid_j(times_s: Sequence[float], power_w: Sequence[Optional[float]]) -> Optional[float]:
    """Joules under a sampled power trace; segments touching a missing value are skipped.

    None when no segment has both ends measured (a missing sensor is never reported as 0 J).
    """
    if len(times_s) != len(power_w):
        raise ValueError("times_s and power_w must have the same length")
    total: Optional[float] = None
    for index in range(1, len(times_s)):
        left, right = power_w[index - 1], power_w[index]
        if left is None or right is None:
            continue
        total = (total or 0.0) + 0.5 * (left + right) * (times_s[index] - times_s[index - 1])
    return total


def _interpolate(left: Point, right: Point, at_s: float) -> Optional[float]:
    (t0, v0), (t1, v1) = left, right
    if v0 is None or v1 is None:
        return None
    if t1 == t0:
        return v1
    return v0 + (v1 - v0) * (at_s - t0) / (t1 - t0)


class WindowIntegral:
    """Streaming trapezoid over [start_s, end_s], O(1) memory, for one power channel.

    The value at start_s is interpolated between the last sample before the window (`before`)
    and the first one inside; after the last sample the value is held to end_s. So windows that
    tile a run add up to the run's integral, and a phase shorter than one sample period still
    gets an estimate instead of nothing.
    """

    def __init__(self, start_s: float, before: Optional[Point] = None) -> None:
        self.start_s = start_s
        self._before = before
        self._previous: Optional[Point] = None
        self._last: Optional[Point] = None
        self.energy_j: Optional[float] = None
        self.peak_w: Optional[float] = None
        self.sample_count = 0

    def _accumulate(self, left: Point, right: Point) -> None:
        if left[1] is not None and right[1] is not None:
            area = 0.5 * (left[1] + right[1]) * (right[0] - left[0])
            self.energy_j = (self.energy_j or 0.0) + area

    def _peak(self, value: Optional[float]) -> None:
        if value is not None and (self.peak_w is None or value > self.peak_w):
            self.peak_w = value

    def add(self, t_s: float, power_w: Optional[float]) -> None:
        if t_s <= self.start_s:
            self._before = (t_s, power_w)
            return
        point = (t_s, power_w)
        if self._last is None:
            start_value = power_w
            if self._before is not None:
                interpolated = _interpolate(self._before, point, self.start_s)
                start_value = power_w if interpolated is None else interpolated
            self._last = (self.start_s, start_value)
            self._peak(start_value)
        self._accumulate(self._last, point)
        self._peak(power_w)
        if power_w is not None:
            self.sample_count += 1
        self._previous, self._last = self._last, point

    def close(self, end_s: float) -> None:
        """Finish at end_s: hold the last value forward, or cut back a sample that overshot."""
        duration_s = end_s - self.start_s
        if self._last is None:
            if self._before is not None and self._before[1] is not None:
                self.energy_j = self._before[1] * duration_s
                self._peak(self._before[1])
            return
        last_t, last_v = self._last
        if last_t <= end_s:
            if last_v is not None:
                self.energy_j = (self.energy_j or 0.0) + last_v * (end_s - last_t)
            return
        if self._previous is not None and self.energy_j is not None and last_v is not None:
            end_v = _interpolate(self._previous, self._last, end_s)
            if end_v is not None:
                self.energy_j -= 0.5 * (end_v + last_v) * (last_t - end_s)
