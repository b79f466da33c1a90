"""jetson-stats' jtop service: the preferred Jetson backend (one reader shared by all tools)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from jetfed.edge.telemetry.backends.base import Backend, BackendUnavailable
from jetfed.edge.telemetry.memory import MemoryProbe
from jetfed.edge.telemetry.rails import module_power_w
from jetfed.edge.telemetry.samples import Sample


def rails_from_jtop_power(power: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Watts per rail from `jtop.power`, using the instantaneous `power` (mW), never `avg`.

    jtop moves a total-input rail (VDD_IN, VIN, POM_5V_IN) out of `rail` into `tot` with its
    `name`; it is put back so module power is computed by our rule. An unnamed `tot` is jtop's
    own sum of every rail, which double counts on AGX Orin, so it is ignored.
    """
    rails: Dict[str, Optional[float]] = {}
    for name, values in power.get("rail", {}).items():
        online = values.get("online", True) and "power" in values
        rails[name] = float(values["power"]) / 1000.0 if online else None
    total = power.get("tot", {})
    if "name" in total and "power" in total:
        rails[total["name"]] = float(total["power"]) / 1000.0
    return rails


class JtopBackend(Backend):
    """Samples timestamped with the service's uptime, deduplicated on it. Jetson shared memory
    comes from our own NvMapMemUsed read (jtop substitutes total RAM when that key is absent)."""

    name = "jtop"
    polled = False

    def __init__(self, interval_s: float = 0.5, memory: Optional[MemoryProbe] = None) -> None:
        super().__init__(memory)
        self.interval_s = interval_s
        self._jetson: Any = None
        self._last_uptime_s: Optional[float] = None

    def open(self) -> None:
        try:
            from jtop import JtopException, jtop
        except ImportError as exc:
            raise BackendUnavailable("jetson-stats not installed") from exc
        jetson = jtop(interval=self.interval_s)
        try:
            jetson.start()
        except (JtopException, OSError) as exc:
            raise BackendUnavailable(f"jtop service not reachable: {exc}") from exc
        self._jetson = jetson

    def close(self) -> None:
        if self._jetson is not None:
            self._jetson.close()
            self._jetson = None

    @property
    def service_interval_s(self) -> Optional[float]:
        """The interval the service actually runs at (the first client sets it for all)."""
        return None if self._jetson is None else float(self._jetson.interval)

    def read(self) -> Optional[Sample]:
        jetson = self._jetson
        if jetson is None:
            return None
        jetson.ok(spin=True)
        uptime_s = jetson.uptime.total_seconds()
        if uptime_s == self._last_uptime_s:
            return None
        self._last_uptime_s = uptime_s
        rails = rails_from_jtop_power(jetson.power)
        return self._host_sample(rails, module_power_w(rails), t_s=uptime_s)
