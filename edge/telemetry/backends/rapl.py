"""Intel/AMD RAPL powercap energy counters (x86 development machines)."""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from jetfed.edge.telemetry.backends.base import Backend, BackendUnavailable
from jetfed.edge.telemetry.counters import CounterPower
from jetfed.edge.telemetry.memory import MemoryProbe
from jetfed.edge.telemetry.samples import Sample

_ZONE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


@dataclass
class Zone:
    rail: str
    energy_path: str
    counted_in_total: bool
    counter: CounterPower


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def find_zones(sysfs_root: str = "/sys") -> List[Zone]:
    """Packages and their subzones, named like `package-0` and `package-0/core`.

    Total = psys if the platform zone exists (it contains the rest), else packages + dram
    (DRAM is not part of a package's energy); core/uncore lie inside their package.
    """
    found = []
    for path in sorted(glob.glob(os.path.join(sysfs_root, "class", "powercap", "intel-rapl:*"))):
        match = _ZONE.match(os.path.basename(path))
        energy_path = os.path.join(path, "energy_uj")
        if not match or _read_int(energy_path) is None:
            continue
        try:
            with open(os.path.join(path, "name")) as handle:
                name = handle.read().strip()
        except OSError:
            name = os.path.basename(path)
        found.append(
            (match, name, energy_path, _read_int(os.path.join(path, "max_energy_range_uj")))
        )
    names = {match.group(1): name for match, name, _, _ in found if match.group(2) is None}
    has_psys = "psys" in names.values()
    zones = []
    for match, name, energy_path, max_range in found:
        top_level = match.group(2) is None
        rail = name if top_level else "{}/{}".format(names.get(match.group(1), "?"), name)
        counted = (name == "psys") if has_psys else (top_level or name == "dram")
        zones.append(Zone(rail, energy_path, counted, CounterPower(max_range)))
    return zones


class RaplBackend(Backend):
    """Power per zone from energy_uj deltas; the first read has no power yet (None)."""

    name = "rapl"

    def __init__(self, sysfs_root: str = "/sys", memory: Optional[MemoryProbe] = None) -> None:
        super().__init__(memory)
        self.sysfs_root = sysfs_root
        self._zones: List[Zone] = []

    def open(self) -> None:
        self._zones = find_zones(self.sysfs_root)
        if not self._zones:
            raise BackendUnavailable("no readable RAPL powercap zones under " + self.sysfs_root)

    def read(self) -> Optional[Sample]:
        now = time.monotonic()
        rails_w: Dict[str, Optional[float]] = {}
        total: Optional[float] = 0.0
        for zone in self._zones:
            energy_uj = _read_int(zone.energy_path)
            power = None if energy_uj is None else zone.counter.update(now, energy_uj)
            rails_w[zone.rail] = power
            if zone.counted_in_total:
                total = None if power is None or total is None else total + power
        return self._host_sample(rails_w, total, t_s=now)
