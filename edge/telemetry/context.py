"""The device context stored with every profile: what hardware, software and settings ran it."""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field

PACKAGES = ("torch", "transformers", "peft", "jetfed", "jetson-stats")
JETPACK_BY_L4T_MAJOR = {32: 4, 34: 5, 35: 5, 36: 6, 38: 7, 39: 7}
_L4T = re.compile(r"R(\d+) \(release\), REVISION: ([\d.]+)")
_POWER_MODE = re.compile(r"NV Power Mode:\s*(.+)")
_GPU_DEVFREQ = ("gpu", "ga10b", "gv11b", "gp10b", "gb10b")
NVPMODEL_TIMEOUT_S = 5


class DeviceContext(BaseModel):
    """Enough to tell two profiles apart: a 15 W and a MAXN run are different experiments."""

    model_config = ConfigDict(extra="forbid")

    machine: str
    device_model: Optional[str] = None
    l4t_release: Optional[str] = None
    jetpack_major: Optional[int] = None
    nvpmodel_mode: Optional[str] = None
    nvpmodel_id: Optional[int] = None
    jetson_clocks_active: Optional[bool] = None
    cpu_cur_freq_khz: List[int] = Field(default_factory=list)
    gpu_cur_freq_hz: Optional[int] = None
    kernel_release: str
    python_version: str
    package_versions: Dict[str, Optional[str]] = Field(default_factory=dict)
    backend: str = "none"
    sample_rate_hz: Optional[float] = None
    effective_sample_rate_hz: Optional[float] = None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as handle:
            return handle.read().replace(b"\0", b"").decode(errors="replace").strip()
    except OSError:
        return None


def _read_int(path: str) -> Optional[int]:
    text = _read(path)
    return int(text) if text is not None and text.isdigit() else None


def parse_l4t(text: Optional[str]) -> Optional[str]:
    """`# R36 (release), REVISION: 4.3, ...` → `36.4.3`."""
    match = _L4T.search(text or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None


def parse_nvpmodel(output: str) -> Tuple[Optional[str], Optional[int]]:
    """`nvpmodel -q` prints `NV Power Mode: MAXN` and then the mode id on its own line."""
    mode = _POWER_MODE.search(output)
    ids = [line.strip() for line in output.splitlines() if line.strip().isdigit()]
    return (mode.group(1).strip() if mode else None, int(ids[-1]) if ids else None)


def _nvpmodel(command: Optional[Sequence[str]]) -> Tuple[Optional[str], Optional[int]]:
    if not command:
        return None, None
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=NVPMODEL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return parse_nvpmodel(result.stdout)


def _cpu_dirs(sys_root: str) -> List[str]:
    paths = glob.glob(os.path.join(sys_root, "devices", "system", "cpu", "cpu[0-9]*", "cpufreq"))
    return sorted(paths, key=lambda p: int(re.findall(r"cpu(\d+)", p)[-1]))


def _jetson_clocks_active(cpu_dirs: List[str]) -> Optional[bool]:
    """jetson_clocks pins every CPU's minimum frequency to its maximum; inferred from sysfs
    because `jetson_clocks --show` needs root."""
    pinned = []
    for path in cpu_dirs:
        low = _read_int(os.path.join(path, "scaling_min_freq"))
        high = _read_int(os.path.join(path, "cpuinfo_max_freq"))
        if low is None or high is None:
            return None
        pinned.append(low == high)
    return all(pinned) if pinned else None


def _gpu_freq_hz(sys_root: str) -> Optional[int]:
    for path in sorted(glob.glob(os.path.join(sys_root, "class", "devfreq", "*"))):
        if any(tag in os.path.basename(path) for tag in _GPU_DEVFREQ):
            return _read_int(os.path.join(path, "cur_freq"))
    return None


def package_versions(names: Sequence[str] = PACKAGES) -> Dict[str, Optional[str]]:
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect_context(
    root: str = "/",
    backend: str = "none",
    sample_rate_hz: Optional[float] = None,
    effective_sample_rate_hz: Optional[float] = None,
    nvpmodel_command: Optional[Sequence[str]] = None,
) -> DeviceContext:
    """Read the context under `root` (a temp tree in tests); every unreadable item is None.

    `nvpmodel -q` runs only when found on PATH for the real root, or when a command is given.
    """
    if nvpmodel_command is None and os.path.abspath(root) == "/":
        binary = shutil.which("nvpmodel")
        nvpmodel_command = [binary, "-q"] if binary else None
    sys_root = os.path.join(root, "sys")
    l4t = parse_l4t(_read(os.path.join(root, "etc", "nv_tegra_release")))
    cpu_dirs = _cpu_dirs(sys_root)
    frequencies = [_read_int(os.path.join(path, "scaling_cur_freq")) for path in cpu_dirs]
    nvpmodel_mode, nvpmodel_id = _nvpmodel(nvpmodel_command)
    return DeviceContext(
        machine=platform.machine(),
        device_model=_read(os.path.join(root, "proc", "device-tree", "model")) or None,
        l4t_release=l4t,
        jetpack_major=JETPACK_BY_L4T_MAJOR.get(int(l4t.split(".")[0])) if l4t else None,
        nvpmodel_mode=nvpmodel_mode,
        nvpmodel_id=nvpmodel_id,
        jetson_clocks_active=_jetson_clocks_active(cpu_dirs),
        cpu_cur_freq_khz=[f for f in frequencies if f is not None],
        gpu_cur_freq_hz=_gpu_freq_hz(sys_root),
        kernel_release=platform.release(),
        python_version=platform.python_version(),
        package_versions=package_versions(),
        backend=backend,
        sample_rate_hz=sample_rate_hz,
        effective_sample_rate_hz=effective_sample_rate_hz,
    )
