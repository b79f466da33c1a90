"""The fallback everywhere: no power sensor, memory only."""

from __future__ import annotations

from typing import Optional

from jetfed.edge.telemetry.backends.base import Backend
from jetfed.edge.telemetry.samples import Sample


class PsutilBackend(Backend):
    name = "psutil"
    has_power = False

    def read(self) -> Optional[Sample]:
        return self._host_sample({}, None)
