"""Temporary sysfs trees laid out like a real Jetson AGX Orin (INA3221 hwmon) and an x86 RAPL box.

Layout as on the device (and as jetson-stats reads it): `bus/i2c/devices/1-0040/name` is
`ina3221`, its channels live in `bus/i2c/devices/1-0040/hwmon/hwmonN/in<k>_label`,
`in<k>_input` (mV), `curr<k>_input` (mA), and `class/hwmon/hwmonN` links to that folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple

# AGX Orin: two INA3221 chips; 0x41 has two unconnected channels. Channel 7 is the shunt sum.
AGX_ORIN_CHIPS: Dict[str, Tuple[str, ...]] = {
    "1-0040": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
    "1-0041": ("NC", "VDDQ_VDD2_1V8AO", "NC"),
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def build_ina3221_tree(root: Path, milli: Dict[str, Tuple[int, int]]) -> Dict[str, Path]:
    """Create the AGX Orin INA3221 hwmon files under root; `milli` maps rail → (mV, mA).

    Returns rail → its hwmon folder, for `set_rail`.
    """
    folders: Dict[str, Path] = {}
    for index, (chip, labels) in enumerate(sorted(AGX_ORIN_CHIPS.items()), start=1):
        device = root / "bus" / "i2c" / "devices" / chip
        _write(device / "name", "ina3221")
        hwmon = device / "hwmon" / f"hwmon{index}"
        _write(hwmon / "name", "ina3221")
        for channel, label in enumerate(labels, start=1):
            millivolts, milliamps = milli.get(label, (0, 0))
            _write(hwmon / f"in{channel}_label", label)
            _write(hwmon / f"in{channel}_input", str(millivolts))
            _write(hwmon / f"curr{channel}_input", str(milliamps))
            _write(hwmon / f"curr{channel}_max", "32760")
            if label != "NC":
                folders[label] = hwmon
        _write(hwmon / "in7_label", "Sum of shunt voltages")
        _write(hwmon / "in7_input", "0")
        _write(hwmon / "curr7_input", "0")
        link = root / "class" / "hwmon" / f"hwmon{index}"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(hwmon, link.parent), link)
    return folders


def set_rail(folders: Dict[str, Path], rail: str, millivolts: int, milliamps: int) -> None:
    """Change one rail's readings in place, as sysfs does (same inode: readers keep their fd).

    Written without truncating first, so a concurrent reader sees the old or the new number.
    """
    hwmon = folders[rail]
    labels = {p.read_text().strip(): p.name.split("_")[0][2:] for p in hwmon.glob("in*_label")}
    channel = labels[rail]
    for name, value in (("in", millivolts), ("curr", milliamps)):
        with open(hwmon / f"{name}{channel}_input", "r+") as handle:
            handle.write(f"{value}\n")
            handle.truncate()


def build_rapl_tree(root: Path, zones: Dict[str, Tuple[str, int, int]]) -> Path:
    """powercap zones: folder (`intel-rapl:0`, `intel-rapl:0:0`) → (name, energy_uj, max_uj)."""
    base = root / "class" / "powercap"
    for folder, (name, energy_uj, max_uj) in zones.items():
        _write(base / folder / "name", name)
        _write(base / folder / "energy_uj", str(energy_uj))
        _write(base / folder / "max_energy_range_uj", str(max_uj))
    return base


def set_rapl_energy(root: Path, folder: str, energy_uj: int) -> None:
    _write(root / "class" / "powercap" / folder / "energy_uj", str(energy_uj))
