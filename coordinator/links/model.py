"""The timing model of one direction of an emulated link: serialise at the rate, then propagate.

A packet waits for the link to be free, occupies it for `bytes * 8 / rate` seconds, then arrives
after the one-way delay ± jitter. Deliveries never overtake each other (real Wi-Fi and cellular
links rarely reorder, and reordering would punish TCP far more than the jitter itself). A full
transmit queue drops the packet, as a router's tail-drop queue would.
"""

from __future__ import annotations

import random
from typing import Optional

# A queue must hold several 64 KiB segmentation-offload bursts, and at least one round trip of
# data so TCP can keep the link busy.
MIN_QUEUE_BYTES = 4 * 65536
MIN_QUEUE_S = 0.1


class LinkDirection:
    """One direction (device→hub or hub→device) of one device's link."""

    def __init__(
        self,
        rate_bit_s: Optional[float],
        delay_s: float,
        jitter_s: float,
        loss_fraction: float,
        rng: random.Random,
        queue_s: float = MIN_QUEUE_S,
    ) -> None:
        self.rate_bit_s = rate_bit_s
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.loss_fraction = loss_fraction
        self.rng = rng
        self.queue_limit_s = (
            max(queue_s, MIN_QUEUE_BYTES * 8 / rate_bit_s) if rate_bit_s else float("inf")
        )
        self._link_free_at_s = 0.0
        self._last_delivery_s = 0.0
        self.dropped_packets = 0

    def admit(self, wire_bytes: int, now_s: float, packets: int = 1) -> Optional[float]:
        """When a frame offered at `now_s` arrives at the far end, or None when it is lost.

        A frame may be a burst of `packets` (segmentation offload): it is lost when any of its
        packets would be, so TCP sees as many loss events per packet as the loss rate says."""
        if self.loss_fraction and self.rng.random() < 1 - (1 - self.loss_fraction) ** packets:
            self.dropped_packets += 1
            return None
        start_s = max(now_s, self._link_free_at_s)
        if start_s - now_s > self.queue_limit_s:
            self.dropped_packets += 1
            return None
        if self.rate_bit_s:
            self._link_free_at_s = start_s + wire_bytes * 8 / self.rate_bit_s
        else:
            self._link_free_at_s = start_s
        arrival_s = self._link_free_at_s + self.delay_s
        if self.jitter_s:
            arrival_s += self.rng.uniform(-self.jitter_s, self.jitter_s)
        self._last_delivery_s = max(arrival_s, self._last_delivery_s)
        return self._last_delivery_s
