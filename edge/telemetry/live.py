"""Live telemetry for the coordinator's page: the sampler's samples, decimated to a few per
second, published in one small message a second on the device's own `telemetry` topic.

Only while the current task asks for it (`Task.live_telemetry`): with nobody watching, it costs
one attribute check per sample. A publish that fails is dropped (display only, never retried).
"""

from __future__ import annotations

import logging
import re
from typing import Callable, List, Optional

from jetfed.edge.logs import log_event
from jetfed.edge.telemetry.samples import Sample
from jetfed.edge.wire import (
    LIVE_TELEMETRY_MAX_RAILS,
    LIVE_TELEMETRY_MAX_SAMPLES,
    RAIL_NAME_PATTERN,
    LiveSample,
    LiveTelemetry,
    encode_message,
)

logger = logging.getLogger(__name__)

DEFAULT_LIVE_RATE_HZ = 4.0
DEFAULT_LIVE_PUBLISH_INTERVAL_S = 1.0


def _watts(value: Optional[float]) -> Optional[float]:
    """Milliwatt resolution (what INA3221 measures) keeps the message small; nonsense is None."""
    if value is None or not 0 <= value <= 1e5:
        return None
    return round(value, 3)


def live_sample(sample: Sample) -> LiveSample:
    rails = {
        name: _watts(watts)
        for name, watts in sorted(sample.rails_w.items())
        if re.fullmatch(RAIL_NAME_PATTERN, name)
    }
    return LiveSample(
        wall_unix_s=round(sample.wall_unix_s, 3),
        rails_w=dict(list(rails.items())[:LIVE_TELEMETRY_MAX_RAILS]),
        total_w=_watts(sample.total_w),
        rss_bytes=sample.rss_bytes,
        system_used_bytes=sample.system_used_bytes,
    )


class LivePublisher:
    """`sampler.listeners.append(p.on_sample)`, then `p.enabled = task.live_telemetry`."""

    def __init__(
        self,
        device_id: str,
        publish: Callable[[bytes], object],
        rate_hz: float = DEFAULT_LIVE_RATE_HZ,
        publish_interval_s: float = DEFAULT_LIVE_PUBLISH_INTERVAL_S,
    ) -> None:
        self.device_id = device_id
        self.publish = publish
        self.min_gap_s = 1.0 / rate_hz
        self.publish_interval_s = publish_interval_s
        self.enabled = False
        self.backend = "none"
        self.messages_sent = 0
        self.bytes_sent = 0
        self._pending: List[LiveSample] = []
        self._last_kept_s = float("-inf")
        self._last_publish_s = float("-inf")
        self._failed = False

    def on_sample(self, sample: Sample) -> None:
        """The sampler thread's hook, called with every sample; never raises (the sampler's
        thread also measures the profiles)."""
        if not self.enabled:
            self._pending.clear()
            return
        now_s = sample.host_monotonic_s
        if now_s - self._last_kept_s < self.min_gap_s:
            return
        self._last_kept_s = now_s
        try:
            self._pending.append(live_sample(sample))
            del self._pending[:-LIVE_TELEMETRY_MAX_SAMPLES]
            if now_s - self._last_publish_s >= self.publish_interval_s:
                self._last_publish_s = now_s
                self._flush()
        except Exception as exc:  # display only: a dropped second is no loss
            self._pending = []
            if not self._failed:
                log_event(logger, logging.WARNING, "telemetry.live_dropped", reason=exc)
            self._failed = True

    def _flush(self) -> None:
        message = LiveTelemetry(
            device_id=self.device_id, backend=self.backend, samples=self._pending
        )
        self._pending = []
        payload = encode_message(message)
        self.publish(payload)
        self.messages_sent += 1
        self.bytes_sent += len(payload)
