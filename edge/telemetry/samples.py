"""One telemetry sample: what a backend measured at one instant. Missing sensors are None."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass
class Sample:
    """Power in watts per rail plus module total, and memory, at one instant.

    `t_s` is the backend's own clock (jtop's uptime, the monotonic clock for polled sensors) and
    is what energy is integrated over; `host_monotonic_s` is when this process got the sample,
    which lets phase boundaries (host clock) be placed on the backend's clock.
    """

    t_s: float
    host_monotonic_s: float
    wall_unix_s: float
    rails_w: Dict[str, Optional[float]] = field(default_factory=dict)
    total_w: Optional[float] = None
    rss_bytes: Optional[int] = None
    system_used_bytes: Optional[int] = None
    gpu_memory_bytes: Optional[int] = None
    shared_memory_bytes: Optional[int] = None

    @property
    def clock_offset_s(self) -> float:
        """Backend clock minus host monotonic clock at this sample."""
        return self.t_s - self.host_monotonic_s
