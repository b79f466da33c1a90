"""A background thread that samples a telemetry backend at a fixed rate and feeds open phases."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

from jetfed.edge.logs import log_event
from jetfed.edge.telemetry.backends.base import Backend
from jetfed.edge.telemetry.backends.detect import detect_backend
from jetfed.edge.telemetry.samples import Sample
from jetfed.edge.telemetry.window import PhaseWindow, WindowSummary

logger = logging.getLogger(__name__)

DEFAULT_RATE_HZ = 10.0
TRACE_LENGTH = 36000


class Sampler:
    """Polls `backend` every 1/rate_hz seconds on a daemon thread.

    Samples are not stored: each one is folded into the phase windows open at the time, so a
    long run costs O(1) memory. Only a bounded (wall time, module W) trace is kept for plots.
    Polled backends are also read at each phase boundary, so a phase starts and ends on a real
    measurement instead of the nearest tick.
    """

    def __init__(self, backend: Backend, rate_hz: float = DEFAULT_RATE_HZ) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        self.backend = backend
        self.interval_s = 1.0 / rate_hz
        self._windows: List[PhaseWindow] = []
        self._last: Optional[Sample] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._trace: Deque[Tuple[float, Optional[float]]] = deque(maxlen=TRACE_LENGTH)
        self.sample_count = 0
        self._tick_samples = 0
        self.thread_cpu_s = 0.0
        self._started_monotonic_s: Optional[float] = None
        self._failed = False
        self._clock_offset_s: Optional[float] = None
        self.listeners: List[Callable[[Sample], None]] = []
        """Told every sample on the sampler's thread (the live telemetry); must be quick."""

    @classmethod
    def auto(
        cls, preference: str = "auto", rate_hz: float = DEFAULT_RATE_HZ, sysfs_root: str = "/sys"
    ) -> Sampler:
        """A started sampler on the best backend here (or the named one; UserError if absent)."""
        backend = detect_backend(preference, sysfs_root=sysfs_root, interval_s=1.0 / rate_hz)
        return cls(backend, rate_hz=rate_hz).start()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def start(self) -> Sampler:
        self._started_monotonic_s = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, close_backend: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if close_backend:
            self.backend.close()

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            cpu_before = time.thread_time()
            self._tick_samples += self.poll()
            self.thread_cpu_s += time.thread_time() - cpu_before
            next_tick += self.interval_s
            delay = next_tick - time.monotonic()
            if delay < 0:
                next_tick = time.monotonic()
                delay = 0.0
            self._stop.wait(delay)

    def poll(self) -> int:
        """Read everything the backend has now, fold it into the open windows; how many."""
        count = 0
        with self._lock:
            while True:
                try:
                    sample = self.backend.read()
                except Exception as exc:
                    if not self._failed:
                        log_event(
                            logger,
                            logging.WARNING,
                            "telemetry.read_failed",
                            backend=self.backend.name,
                            reason=exc,
                        )
                    self._failed = True
                    return count
                if sample is None:
                    return count
                self._ingest(sample)
                count += 1
                if self.backend.polled:
                    return count

    def _ingest(self, sample: Sample) -> None:
        self._last = sample
        # Delivery delay only ever shrinks the observed offset: the largest is the best estimate.
        if self._clock_offset_s is None or sample.clock_offset_s > self._clock_offset_s:
            self._clock_offset_s = sample.clock_offset_s
        self.sample_count += 1
        self._trace.append((sample.wall_unix_s, sample.total_w))
        for window in self._windows:
            window.add(sample)
        for listener in self.listeners:
            listener(sample)

    def _now_on_backend_clock(self) -> float:
        return time.monotonic() + (self._clock_offset_s or 0.0)

    def open_window(self) -> PhaseWindow:
        """Start accumulating a phase now."""
        if self.backend.polled:
            self.poll()
        with self._lock:
            before = self._last
            start_s = before.t_s if self.backend.polled and before else self._now_on_backend_clock()
            window = PhaseWindow(start_s, before)
            if self.backend.polled and before is not None:
                window.add(before)
            self._windows.append(window)
        return window

    def close_window(self, window: PhaseWindow) -> WindowSummary:
        """Stop accumulating a phase now and summarise it."""
        if self.backend.polled:
            self.poll()
        with self._lock:
            self._windows.remove(window)
            last = self._last
            end_s = last.t_s if self.backend.polled and last else self._now_on_backend_clock()
            return window.close(max(end_s, window.start_s))

    @property
    def effective_rate_hz(self) -> Optional[float]:
        """Samples the sampler thread obtained per second since start, phase-boundary reads not
        counted (jtop's service may deliver slower than the sampler polls)."""
        if self._started_monotonic_s is None:
            return None
        elapsed_s = time.monotonic() - self._started_monotonic_s
        return self._tick_samples / elapsed_s if elapsed_s > 0 and self._tick_samples else None

    def power_trace(
        self, start_unix_s: float = 0.0, end_unix_s: float = float("inf")
    ) -> List[Tuple[float, Optional[float]]]:
        """(wall-clock s, module W) pairs in a time range, from the bounded recent history."""
        with self._lock:
            return [(t, w) for t, w in self._trace if start_unix_s <= t <= end_unix_s]
