"""The link emulator process: one per fleet, it owns every TUN pair and moves packets between a
device's end and the hub's end through a `LinkDirection` each way.

Userspace on purpose: sch_netem (tc's delay/loss qdisc) is missing from many VM kernels,
including the ones jetfed is developed and tested on, while TUN is everywhere. Run as
`python -m jetfed.coordinator.links CONFIG_JSON`; it prints `ready` once every TUN exists, and
when the process that started it dies it deletes the fleet's namespaces itself.
"""

from __future__ import annotations

import collections
import os
import random
import selectors
import signal
import sys
import time
from typing import Deque, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict

from jetfed.coordinator.links.model import LinkDirection
from jetfed.coordinator.links.netns import remove_namespaces
from jetfed.coordinator.links.spec import LinkSpec
from jetfed.coordinator.links.tun import MAX_FRAME_BYTES, open_tun, wire_size

READS_PER_WAKEUP = 64
IDLE_WAKEUP_S = 0.2


class TunPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_netns: str
    device_ifname: str
    hub_ifname: str


class RelayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner_pid: int
    link: LinkSpec
    pairs: List[TunPair]
    seed: Optional[int] = None


class _Direction:
    """A `LinkDirection` plus the frames in flight on it, in delivery order."""

    def __init__(self, model: LinkDirection, out_fd: int) -> None:
        self.model = model
        self.out_fd = out_fd
        self.in_flight: Deque[Tuple[float, bytes]] = collections.deque()

    def offer(self, frame: bytes) -> None:
        wire_bytes, packets = wire_size(frame)
        arrival_s = self.model.admit(wire_bytes, time.monotonic(), packets)
        if arrival_s is not None:
            self.in_flight.append((arrival_s, frame))

    def deliver_due(self, now_s: float) -> None:
        while self.in_flight and self.in_flight[0][0] <= now_s:
            _, frame = self.in_flight.popleft()
            try:
                os.write(self.out_fd, frame)
            except OSError:
                self.model.dropped_packets += 1  # the far end is down: the packet is lost


def _directions(config: RelayConfig, rng: random.Random) -> List[Tuple[int, _Direction]]:
    """(input fd, direction) for both directions of every pair."""
    link = config.link
    one_way_delay_s, one_way_jitter_s = link.delay_s / 2, link.jitter_s / 2
    loss = link.loss_pct / 100
    queue_s = max(link.delay_s, 0.1)
    result = []
    for pair in config.pairs:
        device_fd = open_tun(pair.device_ifname, pair.device_netns)
        hub_fd = open_tun(pair.hub_ifname)
        up = LinkDirection(
            link.up_rate_bit_s, one_way_delay_s, one_way_jitter_s, loss, rng, queue_s
        )
        down = LinkDirection(
            link.down_rate_bit_s, one_way_delay_s, one_way_jitter_s, loss, rng, queue_s
        )
        result.append((device_fd, _Direction(up, hub_fd)))
        result.append((hub_fd, _Direction(down, device_fd)))
    return result


def run(config: RelayConfig) -> None:
    stopping: List[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the owner, which tears down
    directions = _directions(config, random.Random(config.seed))
    selector = selectors.DefaultSelector()
    for in_fd, direction in directions:
        selector.register(in_fd, selectors.EVENT_READ, direction)
    print("ready", flush=True)
    while not stopping:
        if os.getppid() != config.owner_pid:
            remove_namespaces(pair.device_netns for pair in config.pairs)
            return
        now_s = time.monotonic()
        next_s = min((d.in_flight[0][0] for _, d in directions if d.in_flight), default=None)
        timeout_s = IDLE_WAKEUP_S if next_s is None else min(IDLE_WAKEUP_S, next_s - now_s)
        for key, _events in selector.select(max(0.0, timeout_s)):
            for _ in range(READS_PER_WAKEUP):
                try:
                    frame = os.read(key.fd, MAX_FRAME_BYTES)
                except OSError:  # EAGAIN: drained; EIO: the interface is not up yet
                    break
                key.data.offer(frame)
        now_s = time.monotonic()
        for _, direction in directions:
            direction.deliver_due(now_s)


def main() -> None:
    run(RelayConfig.model_validate_json(sys.argv[1]))
