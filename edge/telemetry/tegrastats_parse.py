"""Parse tegrastats lines (JetPack 4 to 7) into rail powers, RAM and the line's own timestamp."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

# `NAME cur/avg` (JetPack 5/6, mW suffix), `NAME cur/avg/max` (JetPack 7), no suffix before JP 5.
_RAIL = re.compile(
    r"(?<![\w@])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?![\w/])"
)
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_STAMP = re.compile(r"^(\d{2})-(\d{2})-(\d{4}) (\d{2}):(\d{2}):(\d{2})")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


@dataclass
class TegrastatsLine:
    """One tegrastats line: instantaneous power per rail (W), RAM, and its timestamp if printed."""

    rails_w: Dict[str, float] = field(default_factory=dict)
    ram_used_bytes: Optional[int] = None
    timestamp_unix_s: Optional[float] = None


def parse_line(line: str) -> TegrastatsLine:
    """Rails use the first (instantaneous) number; `NC` (unconnected) channels are dropped.

    The timestamp (`MM-DD-YYYY HH:MM:SS`, local time of the device) is read as if it were UTC:
    only differences between lines matter.
    """
    parsed = TegrastatsLine()
    for match in _RAIL.finditer(line):
        name = match.group(1)
        if name == "NC" or name in _NOT_RAILS:
            continue
        parsed.rails_w[name] = int(match.group(2)) / 1000.0
    ram = _RAM.search(line)
    if ram:
        parsed.ram_used_bytes = int(ram.group(1)) * 1024 * 1024
    stamp = _STAMP.match(line.strip())
    if stamp:
        month, day, year, hour, minute, second = (int(part) for part in stamp.groups())
        parsed.timestamp_unix_s = float(
            calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        )
    return parsed
