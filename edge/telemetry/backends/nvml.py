"""Desktop/server NVIDIA GPUs through NVML (optional `nvidia-ml-py`); not Orin's iGPU."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from jetfed.edge.telemetry.backends.base import Backend, BackendUnavailable
from jetfed.edge.telemetry.counters import CounterPower
from jetfed.edge.telemetry.memory import MemoryProbe
from jetfed.edge.telemetry.samples import Sample


class NvmlBackend(Backend):
    """GPU board power per device: the total-energy counter where the GPU has one (Volta+),
    else the instantaneous power reading. Rails are `GPU0`, `GPU1`...; total is their sum."""

    name = "nvml"

    def __init__(self, memory: Optional[MemoryProbe] = None) -> None:
        super().__init__(memory)
        self._nvml: Any = None
        self._handles: List[Any] = []
        self._counters: Dict[int, CounterPower] = {}

    def open(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise BackendUnavailable("pynvml not installed (pip install nvidia-ml-py)") from exc
        try:
            pynvml.nvmlInit()
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            if not self._handles:
                raise BackendUnavailable("NVML sees no GPU")
            for index, handle in enumerate(self._handles):
                try:
                    pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    self._counters[index] = CounterPower()
                except pynvml.NVMLError:
                    pynvml.nvmlDeviceGetPowerUsage(handle)
        except pynvml.NVMLError as exc:
            raise BackendUnavailable(f"NVML power not supported: {exc}") from exc
        self._nvml = pynvml

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def _power_w(self, index: int, handle: Any, now: float) -> Optional[float]:
        nvml = self._nvml
        try:
            if index in self._counters:
                millijoules = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                return self._counters[index].update(now, int(millijoules) * 1000)
            return float(nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0
        except nvml.NVMLError:
            return None

    def read(self) -> Optional[Sample]:
        now = time.monotonic()
        rails_w: Dict[str, Optional[float]] = {}
        used_bytes = 0
        for index, handle in enumerate(self._handles):
            rails_w[f"GPU{index}"] = self._power_w(index, handle, now)
            used_bytes += int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used)
        known = [value for value in rails_w.values() if value is not None]
        total = float(sum(known)) if len(known) == len(rails_w) else None
        return self._host_sample(rails_w, total, t_s=now, gpu_memory_bytes=used_bytes)
