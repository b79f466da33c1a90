"""Phase accounting: the agent and the methods mark phases; each closed phase becomes a record."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import psutil
from pydantic import ValidationError

from jetfed.edge.logs import log_event
from jetfed.edge.telemetry.context import DeviceContext, collect_context
from jetfed.edge.telemetry.memory import CudaPhaseProbe, peak_rss_bytes
from jetfed.edge.telemetry.records import MAX_TRACE_POINTS, PhaseRecord
from jetfed.edge.telemetry.sampler import Sampler
from jetfed.edge.telemetry.window import WindowSummary

logger = logging.getLogger(__name__)


def in_range(record: PhaseRecord) -> PhaseRecord:
    """The record as the coordinator's schema accepts it: a field a sensor filled out of its
    range (fields are assigned unchecked after construction) is reset to its default, with one
    log line, rather than getting the whole update refused."""
    values = record.model_dump()
    while True:
        try:
            return PhaseRecord.model_validate(values)
        except ValidationError as exc:
            fields = {str(error["loc"][0]) for error in exc.errors()}
            if any(PhaseRecord.model_fields[name].is_required() for name in fields):
                raise  # set, and checked, when the record was made
            named = ",".join(sorted(fields))
            log_event(logger, logging.WARNING, "phase.out_of_range", fields=named)
            for name in fields:
                values[name] = PhaseRecord.model_fields[name].get_default(call_default_factory=True)


@dataclass
class PhaseCounters:
    """Mutable counters a phase's code adds to while it runs; `record` is set when it closes."""

    bytes_sent: int = 0
    bytes_received: int = 0
    extra: Dict[str, float] = field(default_factory=dict)
    record: Optional[PhaseRecord] = None


def thin_trace(
    points: Sequence[Tuple[float, Optional[float]]],
    start_unix_s: float,
    max_points: int = MAX_TRACE_POINTS,
) -> List[Tuple[float, float]]:
    """Measured (wall s, W) points as (s since start, W), evenly thinned to at most max_points
    (first and last kept) so a record stays small however long the phase ran."""
    measured = [(t - start_unix_s, w) for t, w in points if w is not None]
    if len(measured) > max_points:
        step = (len(measured) - 1) / (max_points - 1)
        measured = [measured[round(i * step)] for i in range(max_points)]
    return [(round(t, 3), round(w, 3)) for t, w in measured]


class Profiler:
    """Turns `with profiler.phase("train", round_index=3):` blocks into PhaseRecords.

    With a started `sampler` the records carry energy per rail and in total, mean/peak power and
    peak memory from the samples inside the phase; without one, time, bytes and RSS only.
    """

    def __init__(
        self,
        experiment: str,
        device_id: str,
        method: str = "",
        sampler: Optional[Sampler] = None,
        memory: bool = True,
    ) -> None:
        """`memory=False`: no RSS readings (virtual devices sharing a process, where the
        process's RSS says nothing about one device, and reading it was 7 % of a round)."""
        self.memory = memory
        self.experiment = experiment
        self.device_id = device_id
        self.method = method
        self.sampler = sampler
        self.idle_power_w: Optional[float] = None
        self._records: List[PhaseRecord] = []
        self._lock = threading.Lock()
        self._process = psutil.Process(os.getpid())
        self.on_phase: Optional[Callable[[str, int], None]] = None
        """Told (phase, round_index) when a phase starts: the device's progress reports."""
        self.on_step: Optional[Callable[[int, int], None]] = None
        """Told (step, total_steps) after each local training step."""

    @property
    def backend_name(self) -> str:
        return self.sampler.backend_name if self.sampler is not None else "none"

    def _peak_rss_bytes(self, lifetime_peak_at_start: Optional[int]) -> int:
        """The phase's RSS peak: the lifetime peak if it rose during the phase, else the larger
        of now and the sampled peak (filled by the caller)."""
        current = int(self._process.memory_info().rss)
        lifetime_peak = peak_rss_bytes()
        if (
            lifetime_peak is not None
            and lifetime_peak_at_start is not None
            and lifetime_peak > lifetime_peak_at_start
        ):
            return max(current, lifetime_peak)
        return current

    @contextmanager
    def phase(self, phase: str, round_index: int) -> Iterator[PhaseCounters]:
        counters = PhaseCounters()
        lifetime_peak_at_start = peak_rss_bytes() if self.memory else None
        if self.on_phase is not None:
            self.on_phase(phase, round_index)
        cuda = CudaPhaseProbe()
        cuda.start()
        window = self.sampler.open_window() if self.sampler is not None else None
        start_unix_s = time.time()
        start_s = time.perf_counter()
        try:
            yield counters
        finally:
            cuda.stop()
            duration_s = time.perf_counter() - start_s
            summary = self.sampler.close_window(window) if self.sampler and window else None
            record = PhaseRecord(
                experiment=self.experiment,
                device_id=self.device_id,
                round_index=round_index,
                phase=phase,
                method=self.method,
                start_unix_s=start_unix_s,
                end_unix_s=start_unix_s + duration_s,
                duration_s=duration_s,
                peak_rss_bytes=(
                    self._peak_rss_bytes(lifetime_peak_at_start) if self.memory else None
                ),
                peak_gpu_memory_bytes=cuda.peak_bytes(),
                bytes_sent=counters.bytes_sent,
                bytes_received=counters.bytes_received,
                idle_power_w=self.idle_power_w,
                extra=dict(counters.extra),
            )
            if summary is not None:
                self._apply(record, summary)
            counters.record = record
            with self._lock:
                self._records.append(record)

    def step(self, step: int, total_steps: int) -> None:
        """The training loop's progress, passed on to `on_step`."""
        if self.on_step is not None:
            self.on_step(step, total_steps)

    def _apply(self, record: PhaseRecord, summary: WindowSummary) -> None:
        """Fill the record's telemetry fields from the sampler's summary of the phase."""
        assert self.sampler is not None
        record.energy_j = summary.energy_j
        record.energy_by_rail_j = summary.energy_by_rail_j
        record.mean_power_w = summary.mean_power_w
        record.peak_power_w = summary.peak_power_w
        record.mean_power_by_rail_w = summary.mean_power_by_rail_w
        record.peak_power_by_rail_w = summary.peak_power_by_rail_w
        # The phase lasts as long as its sampled window, so energy / seconds is the mean power.
        record.duration_s = summary.duration_s
        record.end_unix_s = record.start_unix_s + summary.duration_s
        if summary.energy_j is not None and self.idle_power_w is not None:
            record.energy_above_idle_j = summary.energy_j - self.idle_power_w * summary.duration_s
        record.peak_rss_bytes = max(record.peak_rss_bytes or 0, summary.peak_rss_bytes or 0)
        record.peak_system_used_bytes = summary.peak_system_used_bytes
        if record.peak_gpu_memory_bytes is None:
            record.peak_gpu_memory_bytes = summary.peak_gpu_memory_bytes
        record.peak_shared_memory_bytes = summary.peak_shared_memory_bytes
        record.backend = self.sampler.backend_name
        record.sample_rate_hz = self.sampler.effective_rate_hz
        record.sample_count = summary.sample_count
        if self.sampler.backend.has_power:
            record.power_trace = thin_trace(
                self.sampler.power_trace(record.start_unix_s, record.end_unix_s),
                record.start_unix_s,
            )

    def measure_idle_baseline(self, seconds: float, round_index: int = 0) -> Optional[float]:
        """Sit idle for `seconds` inside an "idle" phase and keep its mean module power as the
        baseline that later phases' `energy_above_idle_j` subtracts. None without power."""
        self.idle_power_w = None
        with self.phase("idle", round_index) as counters:
            time.sleep(seconds)
        record = counters.record
        assert record is not None
        self.idle_power_w = record.mean_power_w
        record.idle_power_w = self.idle_power_w
        if self.idle_power_w is not None:
            record.energy_above_idle_j = 0.0
        return self.idle_power_w

    def context(self) -> DeviceContext:
        """The device context for this profiler's records (backend and measured sample rate)."""
        sampler = self.sampler
        return collect_context(
            backend=self.backend_name,
            sample_rate_hz=1.0 / sampler.interval_s if sampler is not None else None,
            effective_sample_rate_hz=sampler.effective_rate_hz if sampler is not None else None,
        )

    def drain(self) -> List[PhaseRecord]:
        """Records closed since the last drain, oldest first."""
        with self._lock:
            records, self._records = self._records, []
        return [in_range(record) for record in records]
