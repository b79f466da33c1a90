"""The contract every telemetry backend fulfils."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Dict, Optional

from jetfed.edge.telemetry.memory import MemoryProbe
from jetfed.edge.telemetry.samples import Sample


class BackendUnavailable(Exception):
    """This backend cannot run here (no service, no sensor, no binary); the message says why."""


class Backend(ABC):
    """Reads power (and what else it can) on demand.

    `polled` backends measure when `read()` is called, so the profiler can take a sample exactly
    at a phase boundary; pushed ones (jtop, tegrastats) deliver at their own pace and `read()`
    returns None when nothing new arrived since the last call.
    """

    name = "base"
    polled = True
    has_power = True

    def __init__(self, memory: Optional[MemoryProbe] = None) -> None:
        self.memory = memory or MemoryProbe()

    def open(self) -> None:  # noqa: B027 - most backends need no setup
        """Acquire the sensor; raise BackendUnavailable if it cannot be used."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing
        """Release the sensor."""

    @abstractmethod
    def read(self) -> Optional[Sample]:
        """A new sample, or None when the backend has nothing new."""

    def _host_sample(
        self,
        rails_w: Dict[str, Optional[float]],
        total_w: Optional[float],
        t_s: Optional[float] = None,
        gpu_memory_bytes: Optional[int] = None,
        shared_memory_bytes: Optional[int] = None,
    ) -> Sample:
        """A sample stamped now, with the process/system memory every backend can add."""
        now = time.monotonic()
        memory = self.memory.read()
        return Sample(
            t_s=now if t_s is None else t_s,
            host_monotonic_s=now,
            wall_unix_s=time.time(),
            rails_w=rails_w,
            total_w=total_w,
            rss_bytes=memory.rss_bytes,
            system_used_bytes=memory.system_used_bytes,
            gpu_memory_bytes=gpu_memory_bytes,
            shared_memory_bytes=(
                shared_memory_bytes if shared_memory_bytes is not None else memory.shared_bytes
            ),
        )
