"""Power from a cumulative energy counter (RAPL, NVML), with wrap-around."""

from __future__ import annotations

from typing import Optional, Tuple


class CounterPower:
    """Average power between consecutive reads of a counter in microjoules.

    A counter that wrapped (new < old) has gone through `max_range_uj`; with no known range
    the interval is reported as unknown rather than guessed.
    """

    def __init__(self, max_range_uj: Optional[int] = None) -> None:
        self.max_range_uj = max_range_uj
        self._last: Optional[Tuple[float, int]] = None

    def update(self, t_s: float, energy_uj: int) -> Optional[float]:
        last, self._last = self._last, (t_s, energy_uj)
        if last is None or t_s <= last[0]:
            return None
        delta_uj = energy_uj - last[1]
        if delta_uj < 0:
            if not self.max_range_uj:
                return None
            delta_uj += self.max_range_uj
        return delta_uj / 1e6 / (t_s - last[0])
