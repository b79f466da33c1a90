"""Memory readings: process RSS, system used, Jetson shared (NvMap) memory, CUDA allocator peak."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Union

import psutil


def peak_rss_bytes(pid: Union[int, str] = "self", proc_root: str = "/proc") -> Optional[int]:
    """A process's peak RSS (VmHWM; this one's by default), None where unknown. Not ru_maxrss:
    Linux carries that over from the parent across fork + exec, so an agent started by a big
    process (pytest, a fleet launcher) would report its parent's peak."""
    try:
        with open(os.path.join(proc_root, str(pid), "status")) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class MemoryReading:
    rss_bytes: Optional[int] = None
    system_used_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None


def parse_meminfo(text: str) -> Dict[str, int]:
    """/proc/meminfo as bytes per key (the file states kB)."""
    values: Dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


class MemoryProbe:
    """Cheap per-sample memory reads. `proc_root` is configurable so tests can use a temp tree.

    System used = MemTotal - MemAvailable (what a new allocation would have to compete with).
    Jetson shared memory is NvMapMemUsed (CPU/GPU shared buffers); it is None off Jetson.
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self._meminfo_path = os.path.join(proc_root, "meminfo")
        self._process = psutil.Process(os.getpid())

    def read(self) -> MemoryReading:
        reading = MemoryReading(rss_bytes=int(self._process.memory_info().rss))
        try:
            with open(self._meminfo_path) as handle:
                info = parse_meminfo(handle.read())
        except OSError:
            reading.system_used_bytes = int(psutil.virtual_memory().used)
            return reading
        if "MemTotal" in info and "MemAvailable" in info:
            reading.system_used_bytes = info["MemTotal"] - info["MemAvailable"]
        reading.shared_bytes = info.get("NvMapMemUsed")
        return reading


def cuda_torch() -> Optional[object]:
    """torch, only if the program already imported it and this process has initialised CUDA
    (never import torch here; never initialise CUDA here: a process that trains on the CPU of a
    machine with a GPU would pay for a context it never uses). A phase that ran on CUDA started
    it, so the first phase on CUDA reads the process's peak, which is that phase's."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda  # type: ignore[attr-defined]
        return torch if cuda.is_available() and cuda.is_initialized() else None
    except Exception:
        return None


class CudaPhaseProbe:
    """A phase's CUDA side: its boundaries synchronised and its allocator peak.

    CUDA kernels run asynchronously: without a synchronise at both boundaries the phase's clock
    stops when the last kernel was queued, not when it finished, and the next phase is charged
    for the rest. `start` waits for earlier work and resets the peak; `stop` waits for the
    phase's own work and must come before the phase's end time is read."""

    def start(self) -> None:
        torch = cuda_torch()
        if torch is not None:
            torch.cuda.synchronize()  # type: ignore[attr-defined]
            torch.cuda.reset_peak_memory_stats()  # type: ignore[attr-defined]

    def stop(self) -> None:
        torch = cuda_torch()
        if torch is not None:
            torch.cuda.synchronize()  # type: ignore[attr-defined]

    def peak_bytes(self) -> Optional[int]:
        torch = cuda_torch()
        if torch is None:
            return None
        return int(torch.cuda.max_memory_allocated())  # type: ignore[attr-defined]
