"""Energy as the trapezoidal integral of sampled power over the samples' own timestamps."""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional, Sequence, Tuple

Point = Tuple[float, Optional[float]]
_TailPoint = Tuple[float, Optional[float], Optional[float], Optional[float]]


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
    """Streaming trapezoid over [start_s, end_s] for one power channel, in O(1) memory.

    The value at start_s is interpolated between the last sample before the window (`before`)
    and the first one inside; after the last sample the value is held to end_s. So windows that
    tile a run add up to the run's integral, and a phase shorter than one sample period still
    gets an estimate instead of nothing. Samples that arrive after end_s but before `close`
    (up to TAIL_LENGTH of them) are cut back out exactly.
    """

    TAIL_LENGTH = 16

    def __init__(self, start_s: float, before: Optional[Point] = None) -> None:
        self.start_s = start_s
        self._before = before
        # (t, value, energy up to t, peak up to t), most recent last
        self._tail: Deque[_TailPoint] = deque(maxlen=self.TAIL_LENGTH)
        self.energy_j: Optional[float] = None
        self.peak_w: Optional[float] = None
        self.sample_count = 0

    def add(self, t_s: float, power_w: Optional[float]) -> None:
        if t_s <= self.start_s:
            self._before = (t_s, power_w)
            return
        point = (t_s, power_w)
        if not self._tail:
            start_value = power_w
            if self._before is not None:
                interpolated = _interpolate(self._before, point, self.start_s)
                start_value = power_w if interpolated is None else interpolated
            self._tail.append((self.start_s, start_value, None, start_value))
        last_t, last_v, energy_j, peak_w = self._tail[-1]
        if last_v is not None and power_w is not None:
            energy_j = (energy_j or 0.0) + 0.5 * (last_v + power_w) * (t_s - last_t)
        if power_w is not None:
            peak_w = power_w if peak_w is None else max(peak_w, power_w)
            self.sample_count += 1
        self._tail.append((t_s, power_w, energy_j, peak_w))

    def close(self, end_s: float) -> None:
        """Finish at end_s: hold the last value forward, or cut back samples that overshot."""
        if not self._tail:
            if self._before is not None and self._before[1] is not None:
                self.energy_j = self._before[1] * (end_s - self.start_s)
                self.peak_w = self._before[1]
            return
        points = list(self._tail)
        inside = [i for i, point in enumerate(points) if point[0] <= end_s] or [0]
        index = inside[-1]
        t_s, value, energy_j, peak_w = points[index]
        if value is not None:
            if index + 1 < len(points):
                following = points[index + 1]
                end_value = _interpolate((t_s, value), (following[0], following[1]), end_s)
            else:
                end_value = value
            if end_value is not None:
                energy_j = (energy_j or 0.0) + 0.5 * (value + end_value) * (end_s - t_s)
                peak_w = end_value if peak_w is None else max(peak_w, end_value)
        self.energy_j, self.peak_w = energy_j, peak_w
