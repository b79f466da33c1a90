"""Phase accounting: the agent and the methods mark phases; each closed phase becomes a record."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import psutil

from edge.telemetry.records import PhaseRecord


@dataclass
class PhaseCounters:
    """Mutable counters a phase's code adds to while it runs."""

    bytes_sent: int = 0
    bytes_received: int = 0
    extra: Dict[str, float] = field(default_factory=dict)


class Profiler:
    """Turns `with profiler.phase("train", round_index=3):` blocks into PhaseRecords."""

    def __init__(self, experiment: str, device_id: str, method: str = "") -> None:
        self.experiment = experiment
        self.device_id = device_id
        self.method = method
        self._records: List[PhaseRecord] = []
        self._lock = threading.Lock()
        self._process = psutil.Process(os.getpid())

    @contextmanager
    def phase(self, phase: str, round_index: int) -> Iterator[PhaseCounters]:
        counters = PhaseCounters()
        start_unix_s = time.time()
        start_s = time.perf_counter()
        try:
            yield counters
        finally:
            duration_s = time.perf_counter() - start_s
            record = PhaseRecord(
                experiment=self.experiment,
                device_id=self.device_id,
                round_index=round_index,
                phase=phase,
                method=self.method,
                start_unix_s=start_unix_s,
                end_unix_s=start_unix_s + duration_s,
                duration_s=duration_s,
                peak_rss_bytes=self._peak_rss_bytes(),
                bytes_sent=counters.bytes_sent,
                bytes_received=counters.bytes_received,
                extra=dict(counters.extra),
            )
            with self._lock:
                self._records.append(record)

    def _peak_rss_bytes(self) -> Optional[int]:
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            return int(self._process.memory_info().rss)

    def drain(self) -> List[PhaseRecord]:
        """Records closed since the last drain, oldest first."""
        with self._lock:
            records, self._records = self._records, []
        return records
