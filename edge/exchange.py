"""In-round messages between a method on the device and its strategy on the coordinator.

Split learning sends activations up and receives gradients down many times per round; such a
method uses `LocalRound.exchange` instead of touching MQTT. Topics:
`devices/{id}/exchange/up/{subtopic}` (device → coordinator) and
`devices/{id}/exchange/down/{subtopic}` (coordinator → device).
"""

from __future__ import annotations

import queue
from typing import Callable, Tuple

from jetfed.edge.topics import Topics


class Exchange:
    def __init__(
        self, topics: Topics, device_id: str, publish: Callable[[str, bytes], int]
    ) -> None:
        self._topics = topics
        self._device_id = device_id
        self._publish = publish
        self.inbox: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def down_prefix(self) -> str:
        return self._topics.device(self._device_id, "exchange/down/")

    def deliver(self, topic: str, payload: bytes) -> None:
        """paho thread: a coordinator message for the running method."""
        self.bytes_received += len(payload)
        self.inbox.put((topic[len(self.down_prefix) :], payload))

    def send(self, subtopic: str, payload: bytes) -> None:
        self.bytes_sent += self._publish(
            self._topics.device(self._device_id, f"exchange/up/{subtopic}"), payload
        )

    def receive(self, timeout_s: float) -> Tuple[str, bytes]:
        """The next (subtopic, payload); TimeoutError if none arrives in time."""
        try:
            return self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no exchange message within {timeout_s:.1f} s") from None

    def drain(self) -> None:
        """Drop leftovers of an earlier round (late replies to retried requests)."""
        while not self.inbox.empty():
            self.inbox.get_nowait()
