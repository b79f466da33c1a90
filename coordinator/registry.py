"""Who is out there: devices' retained status, last hello and their stable client index."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

from jetfed.edge.wire import Hello


@dataclass
class DeviceRecord:
    device_id: str
    online: bool = False
    hello: Optional[Hello] = None
    last_seen_s: float = 0.0
    offline_since_s: Optional[float] = None
    """Monotonic time of the `offline` status (last will or goodbye); None while online."""


class DeviceRegistry:
    """Online = retained status `online` and a hello received since; indices never change."""

    def __init__(self, client_indices: Optional[Dict[str, int]] = None) -> None:
        self.devices: Dict[str, DeviceRecord] = {}
        self.client_indices: Dict[str, int] = dict(client_indices or {})
        self.joined: Set[str] = set()
        """Every device that said hello to this process (kept when it goes offline): only
        these may write profile records."""

    def _record(self, device_id: str) -> DeviceRecord:
        record = self.devices.setdefault(device_id, DeviceRecord(device_id))
        record.last_seen_s = time.monotonic()
        return record

    def on_status(self, device_id: str, online: bool) -> None:
        record = self._record(device_id)
        if online:
            record.offline_since_s = None
        elif record.offline_since_s is None:
            record.offline_since_s = record.last_seen_s
        record.online = online
        if not online:
            record.hello = None

    def on_hello(self, hello: Hello) -> None:
        record = self._record(hello.device_id)
        record.hello = hello
        record.online = True
        self.joined.add(hello.device_id)
        record.offline_since_s = None

    def ready(self) -> List[str]:
        return sorted(d.device_id for d in self.devices.values() if d.online and d.hello)

    def offline_for_s(self, device_id: str) -> float:
        """Seconds since the device went offline; 0 while online or never heard of."""
        record = self.devices.get(device_id)
        if record is None or record.offline_since_s is None:
            return 0.0
        return time.monotonic() - record.offline_since_s

    def is_known(self, device_id: str) -> bool:
        record = self.devices.get(device_id)
        return record is not None and record.hello is not None

    def assign_indices(self, device_ids: List[str], num_clients: int) -> None:
        """Give new devices the lowest free client indices, in sorted id order (deterministic)."""
        taken = set(self.client_indices.values())
        free = (i for i in range(num_clients) if i not in taken)
        for device_id in sorted(device_ids):
            if device_id not in self.client_indices:
                index = next(free, None)
                if index is None:
                    return
                self.client_indices[device_id] = index
