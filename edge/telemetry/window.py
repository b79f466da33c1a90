"""What the samples inside one phase add up to: energy, mean/peak power, peak memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from jetfed.edge.telemetry.energy import Point, WindowIntegral
from jetfed.edge.telemetry.samples import Sample

MEMORY_FIELDS = ("rss_bytes", "system_used_bytes", "gpu_memory_bytes", "shared_memory_bytes")


@dataclass
class WindowSummary:
    """A phase's telemetry; every value is None when its sensor is absent."""

    duration_s: float
    energy_j: Optional[float] = None
    mean_power_w: Optional[float] = None
    peak_power_w: Optional[float] = None
    energy_by_rail_j: Dict[str, Optional[float]] = field(default_factory=dict)
    mean_power_by_rail_w: Dict[str, Optional[float]] = field(default_factory=dict)
    peak_power_by_rail_w: Dict[str, Optional[float]] = field(default_factory=dict)
    peak_rss_bytes: Optional[int] = None
    peak_system_used_bytes: Optional[int] = None
    peak_gpu_memory_bytes: Optional[int] = None
    peak_shared_memory_bytes: Optional[int] = None
    sample_count: int = 0


def _max(current: Optional[int], value: Optional[int]) -> Optional[int]:
    if value is None:
        return current
    return value if current is None or value > current else current


def _mean(energy_j: Optional[float], duration_s: float) -> Optional[float]:
    return None if energy_j is None or duration_s <= 0 else energy_j / duration_s


class PhaseWindow:
    """Accumulates samples from `start_s` (backend clock) on, in O(1) memory per rail.

    `before` is the last sample preceding the window, so the power at the start instant can be
    interpolated rather than dropped.
    """

    def __init__(self, start_s: float, before: Optional[Sample]) -> None:
        self.start_s = start_s
        self._before = before
        self.total = WindowIntegral(start_s, self._point(before, None))
        self.rails: Dict[str, WindowIntegral] = {}
        self._memory: Dict[str, Optional[int]] = {}
        self.sample_count = 0

    @staticmethod
    def _point(sample: Optional[Sample], rail: Optional[str]) -> Optional[Point]:
        if sample is None:
            return None
        return (sample.t_s, sample.total_w if rail is None else sample.rails_w.get(rail))

    def add(self, sample: Sample) -> None:
        self.total.add(sample.t_s, sample.total_w)
        for rail, power_w in sample.rails_w.items():
            if rail not in self.rails:
                self.rails[rail] = WindowIntegral(self.start_s, self._point(self._before, rail))
            self.rails[rail].add(sample.t_s, power_w)
        if sample.t_s >= self.start_s:
            self.sample_count += 1
            for key in MEMORY_FIELDS:
                self._memory[key] = _max(self._memory.get(key), getattr(sample, key))

    def close(self, end_s: float) -> WindowSummary:
        duration_s = max(0.0, end_s - self.start_s)
        self.total.close(end_s)
        for integral in self.rails.values():
            integral.close(end_s)
        return WindowSummary(
            duration_s=duration_s,
            energy_j=self.total.energy_j,
            mean_power_w=_mean(self.total.energy_j, duration_s),
            peak_power_w=self.total.peak_w,
            energy_by_rail_j={rail: w.energy_j for rail, w in self.rails.items()},
            mean_power_by_rail_w={
                rail: _mean(w.energy_j, duration_s) for rail, w in self.rails.items()
            },
            peak_power_by_rail_w={rail: w.peak_w for rail, w in self.rails.items()},
            peak_rss_bytes=self._memory.get("rss_bytes"),
            peak_system_used_bytes=self._memory.get("system_used_bytes"),
            peak_gpu_memory_bytes=self._memory.get("gpu_memory_bytes"),
            peak_shared_memory_bytes=self._memory.get("shared_memory_bytes"),
            sample_count=self.sample_count,
        )
