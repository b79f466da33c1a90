"""What a coordinator tells whoever watches its run (the live page, coordinator/ui/).

Every hook is display only: it runs on the coordinator's protocol thread, must be quick, and an
observer that raises is logged and ignored; no round ever waits on or depends on one.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from jetfed.coordinator.records import RoundMetrics
from jetfed.coordinator.registry import DeviceRecord
from jetfed.edge.wire import LiveTelemetry, Progress, Task


class RunObserver:
    """Override the hooks you need; `wants_telemetry` asks devices for `LiveTelemetry`."""

    wants_telemetry = False

    def on_task(self, task: Task) -> None:
        """A round's task was published."""

    def on_device(self, record: DeviceRecord) -> None:
        """A device's status or hello changed."""

    def on_progress(self, progress: Progress) -> None:
        """A selected device's validated progress report in the round under way."""

    def on_accepted(self, device_id: str, round_index: int) -> None:
        """A device's update was received whole and accepted."""

    def on_telemetry(self, telemetry: LiveTelemetry) -> None:
        """A device's validated live telemetry."""

    def on_round(self, metrics: RoundMetrics) -> None:
        """A round ended (its metrics are in metrics.jsonl already)."""

    def on_finished(self) -> None:
        """The run ended (profile tables written)."""


logger = logging.getLogger(__name__)


def notify(observers: Sequence[RunObserver], tell: Callable[[RunObserver], None]) -> None:
    """Tell every observer; one that raises is logged, never the run's end."""
    for observer in observers:
        try:
            tell(observer)
        except Exception:  # an observer is display only
            logger.exception("observer.failed observer=%s", type(observer).__name__)
