"""The topic scheme under `jetfed/{experiment}/` (docs/PROTOCOL.md) and the parsing of topics
devices and coordinators receive: a topic level is checked before it names anything."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Tuple

from jetfed.edge.errors import ProtocolError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A device id or experiment name: one topic level, no wildcard, no leading dot or dash."""


@dataclass(frozen=True)
class Topics:
    """The topic scheme under `jetfed/{experiment}/` (see docs/PROTOCOL.md)."""

    experiment: str

    @property
    def root(self) -> str:
        return f"jetfed/{self.experiment}"

    @property
    def task(self) -> str:
        return f"{self.root}/task"

    @property
    def coordinator(self) -> str:
        return f"{self.root}/coordinator"

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.root}/devices/{device_id}/{leaf}"

    def chunk(self, device_id: str, direction: str, digest: str, index: int) -> str:
        return f"{self.root}/devices/{device_id}/{direction}/{digest}/{index}"

    def all_devices(self, leaf: str) -> str:
        return f"{self.root}/devices/+/{leaf}"

    def parse_device_topic(self, topic: str) -> Tuple[str, str, List[str]]:
        """`jetfed/e/devices/ID/leaf/rest...` → (ID, leaf, rest); ProtocolError otherwise."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not under {prefix}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) < 2 or not re.fullmatch(ID_PATTERN, parts[0]):
            raise ProtocolError(f"topic {topic!r} has no valid device id")
        return parts[0], parts[1], parts[2:]


ANNOUNCEMENTS = "jetfed/+/coordinator"
"""Where a device that is not pinned to an experiment listens for running coordinators."""


def announcement_experiment(topic: str) -> str:
    """`jetfed/EXP/coordinator` → EXP; ProtocolError for any other topic."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "jetfed" or parts[2] != "coordinator":
        raise ProtocolError(f"topic {topic!r} is not an announcement")
    if not re.fullmatch(ID_PATTERN, parts[1]):
        raise ProtocolError(f"topic {topic!r} has no valid experiment name")
    return parts[1]


CHUNK_INDEX_PATTERN = re.compile(r"[0-9]{1,12}")


def parse_chunk_index(text: str) -> int:
    """A chunk topic's index: ASCII digits only (`str.isdigit` also takes `²`, which `int`
    refuses) and bounded, so no topic can make `int` raise or parse 4,400 digits."""
    if not CHUNK_INDEX_PATTERN.fullmatch(text):
        raise ProtocolError(f"chunk index {text[:32]!r} is not a number of at most 12 digits")
    return int(text)
