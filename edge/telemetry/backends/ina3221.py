"""Direct INA3221 hwmon reader: Jetson rail power from sysfs, no jtop service needed."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from jetfed.edge.telemetry.backends.base import Backend, BackendUnavailable
from jetfed.edge.telemetry.memory import MemoryProbe
from jetfed.edge.telemetry.rails import module_power_w
from jetfed.edge.telemetry.samples import Sample

_LABEL = re.compile(r"^in(\d+)_label$")
SUM_OF_SHUNTS_CHANNEL = 7


@dataclass
class Channel:
    rail: str
    volt_path: str
    curr_path: str


def _read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


def _is_ina3221(hwmon_dir: str) -> bool:
    """The hwmon folder's own `name`, or its i2c device's (`.../1-0040/name`), says ina3221."""
    for name_file in (
        os.path.join(hwmon_dir, "name"),
        os.path.join(hwmon_dir, os.pardir, os.pardir, "name"),
    ):
        try:
            if "ina3221" in _read_text(name_file).lower():
                return True
        except OSError:
            continue
    return False


def find_channels(sysfs_root: str = "/sys") -> List[Channel]:
    """Every labelled, connected INA3221 channel under `sysfs_root`, each device once."""
    candidates = glob.glob(os.path.join(sysfs_root, "class", "hwmon", "*")) + glob.glob(
        os.path.join(sysfs_root, "bus", "i2c", "devices", "*", "hwmon", "*")
    )
    seen = set()
    channels: List[Channel] = []
    for hwmon_dir in sorted(candidates):
        real = os.path.realpath(hwmon_dir)
        if real in seen or not os.path.isdir(real) or not _is_ina3221(real):
            continue
        seen.add(real)
        for entry in sorted(os.listdir(real)):
            match = _LABEL.match(entry)
            if not match or int(match.group(1)) == SUM_OF_SHUNTS_CHANNEL:
                continue
            number = match.group(1)
            rail = _read_text(os.path.join(real, entry))
            volt = os.path.join(real, f"in{number}_input")
            curr = os.path.join(real, f"curr{number}_input")
            if rail.upper() != "NC" and os.path.exists(volt) and os.path.exists(curr):
                channels.append(Channel(rail, volt, curr))
    return channels


class Ina3221Backend(Backend):
    """Reads in<N>_input (mV) and curr<N>_input (mA) per labelled channel; keeps the files open
    and re-reads them with pread, which keeps a 10 Hz sampler far below 1 % of a core."""

    name = "ina3221"

    def __init__(self, sysfs_root: str = "/sys", memory: Optional[MemoryProbe] = None) -> None:
        super().__init__(memory)
        self.sysfs_root = sysfs_root
        self._fds: Dict[str, tuple] = {}

    def open(self) -> None:
        channels = find_channels(self.sysfs_root)
        if not channels:
            raise BackendUnavailable("no INA3221 hwmon channels under " + self.sysfs_root)
        self._fds = {
            channel.rail: (
                os.open(channel.volt_path, os.O_RDONLY),
                os.open(channel.curr_path, os.O_RDONLY),
            )
            for channel in channels
        }

    def close(self) -> None:
        for volt_fd, curr_fd in self._fds.values():
            os.close(volt_fd)
            os.close(curr_fd)
        self._fds = {}

    @staticmethod
    def _read_number(fd: int) -> Optional[float]:
        try:
            return float(os.pread(fd, 32, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def read(self) -> Optional[Sample]:
        rails_w: Dict[str, Optional[float]] = {}
        for rail, (volt_fd, curr_fd) in self._fds.items():
            millivolts = self._read_number(volt_fd)
            milliamps = self._read_number(curr_fd)
            rails_w[rail] = (
                None if millivolts is None or milliamps is None else millivolts * milliamps / 1e6
            )
        return self._host_sample(rails_w, module_power_w(rails_w))
