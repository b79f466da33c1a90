"""A device's progress through its round: published for the coordinator's live table, logged for
the device's own terminal.

The profiler tells the reporter when a phase starts and the training loop when a step ends; the
reporter publishes a small `Progress` on the device's own `progress` topic at every phase change
and at most once per `publish_interval_s` in between, and logs a line at every phase change and
at most once per `log_interval_s` in between (the default verbosity of `jetfed edge run`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from jetfed.edge.logs import log_event
from jetfed.edge.mqtt import LinkCounters
from jetfed.edge.wire import PROGRESS_PHASES, Progress, encode_message

logger = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(
        self,
        device_id: str,
        publish: Callable[[bytes], object],
        counters: LinkCounters,
        publish_interval_s: float = 1.0,
        log_interval_s: float = 10.0,
    ) -> None:
        self.device_id = device_id
        self.publish = publish
        self.counters = counters
        self.publish_interval_s = publish_interval_s
        self.log_interval_s = log_interval_s
        self._round_index: Optional[int] = None
        self._phase = ""
        self._received_at_start = 0
        self._sent_at_start = 0
        self._last_publish_s = 0.0
        self._last_log_s = 0.0

    def phase(self, phase: str, round_index: int) -> None:
        """A phase started (the profiler's hook); phases outside a round's are not reported."""
        if phase not in PROGRESS_PHASES:
            return
        if round_index != self._round_index:
            self._round_index = round_index
            self._received_at_start = self.counters.bytes_received
            self._sent_at_start = self.counters.bytes_sent
        self._phase = phase
        self._report(None, None, force=True)

    def step(self, step: int, total_steps: int) -> None:
        """A training step ended (the training loop's hook)."""
        if self._round_index is not None:
            self._report(step, total_steps, force=step == total_steps)

    def _report(self, step: Optional[int], total_steps: Optional[int], force: bool) -> None:
        assert self._round_index is not None
        now = time.monotonic()
        message = Progress(
            device_id=self.device_id,
            round_index=self._round_index,
            phase=self._phase,
            step=step,
            total_steps=total_steps,
            bytes_received=max(0, self.counters.bytes_received - self._received_at_start),
            bytes_sent=max(0, self.counters.bytes_sent - self._sent_at_start),
        )
        if force or now - self._last_publish_s >= self.publish_interval_s:
            self._last_publish_s = now
            self.publish(encode_message(message))
        if force or now - self._last_log_s >= self.log_interval_s:
            self._last_log_s = now
            log_event(
                logger,
                logging.INFO,
                "round.progress",
                round_index=message.round_index,
                phase=message.phase,
                step="-" if step is None else f"{step}/{total_steps}",
                received_bytes=message.bytes_received,
                sent_bytes=message.bytes_sent,
            )
