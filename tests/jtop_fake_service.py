"""Run jetson-stats' REAL jtop service against a fake AGX Orin tree and read it two ways.

Run as root inside `unshare -m` (a private mount namespace): it mounts tmpfs over /run (so
/run/jtop.sock is private), over /fake_sys (the fixed path JTOP_TESTING reads) and over the
service's config folder under sys.base_prefix, and bind-mounts an /etc/group that has a `jtop`
group. Nothing it writes survives the namespace. Prints one JSON object on stdout.
Usage: unshare -m --propagation private python -m tests.jtop_fake_service
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

FAKE_ROOT = Path("/fake_sys")
DMI_PATH = "/sys/devices/virtual/dmi/id"
# rail → (mV, mA): module = 3.0 + 1.5 + 4.5 = 9.0 W; VDDQ (0.9 W) lies inside VIN_SYS_5V0.
RAILS = {
    "VDD_GPU_SOC": (5000, 600),
    "VDD_CPU_CV": (5000, 300),
    "VIN_SYS_5V0": (5000, 900),
    "VDDQ_VDD2_1V8AO": (1800, 500),
}
RAISED_GPU = (5000, 1200)  # 6.0 W: module becomes 12.0 W
FAKE_CPUS = 2
PARENT_MOUNT_NS_ENV = "JETFED_PARENT_MOUNT_NS"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _private_mounts() -> None:
    """tmpfs over every path the service writes, a `jtop` group visible only in here."""
    config_parent = Path(sys.base_prefix) / "local"
    for target in ("/run", str(FAKE_ROOT), str(config_parent)):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    group_copy = Path(tempfile.mkdtemp()) / "group"
    text = Path("/etc/group").read_text()
    if not any(line.startswith("jtop:") for line in text.splitlines()):
        text = text.rstrip("\n") + f"\njtop:x:{_free_gid(text)}:root\n"
    group_copy.write_text(text)
    subprocess.run(["mount", "--bind", str(group_copy), "/etc/group"], check=True)


def _free_gid(group_text: str) -> int:
    used = {int(line.split(":")[2]) for line in group_text.splitlines() if line.count(":") >= 3}
    return next(gid for gid in range(60000, 65000) if gid not in used)


def _build_fake_jetson() -> Dict[str, Path]:
    """CPU (one `cpuN` stat line per cpu dir), iGPU, EMC as jetson-stats' own conftest does,
    plus the two INA3221 chips of an AGX Orin."""
    from tests.telemetry_trees import build_ina3221_tree

    stat = "cpu  26716126 25174 7198445 948399047 900582 0 354519 0 0 0\n"
    for cpu in range(FAKE_CPUS):
        stat += f"cpu{cpu} 1673575 1889 461134 59280326 55795 0 10322 0 0 0\n"
        freq = FAKE_ROOT / f"devices/system/cpu/cpu{cpu}/cpufreq"
        for name, value in (
            ("scaling_governor", "schedutil"),
            ("scaling_min_freq", "729600"),
            ("scaling_max_freq", "2201600"),
            ("scaling_cur_freq", "1113600"),
            ("cpuinfo_min_freq", "115200"),
            ("cpuinfo_max_freq", "2201600"),
            ("cpuinfo_cur_freq", "1113600"),
        ):
            _write(freq / name, value)
    _write(FAKE_ROOT / "stat", stat + "ctxt 1028840383\nbtime 1674644431\n")
    gpu = FAKE_ROOT / "devices/platform/17000000.gpu/devfreq/17000000.gpu"
    _write(gpu / "device/of_node/name", "gpu")
    for name, value in (
        ("cur_freq", "306000000"),
        ("max_freq", "1300500000"),
        ("min_freq", "306000000"),
        ("governor", "nvhost_podgov"),
    ):
        _write(gpu / name, value)
    for name in ("railgate_enable", "tpc_pg_mask"):
        _write(gpu / "device" / name, "0")
    _write(gpu / "device/enable_3d_scaling", "1")
    _write(gpu / "device/load", "0")
    (FAKE_ROOT / "class/devfreq").mkdir(parents=True, exist_ok=True)
    os.symlink(gpu, FAKE_ROOT / "class/devfreq/17000000.gpu")
    emc = FAKE_ROOT / "kernel/debug/bpmp/debug/clk/emc"
    for name, value in (("rate", "2133000000"), ("max_rate", "3199000000"), ("min_rate", "0")):
        _write(emc / name, value)
    _write(emc / "mrq_rate_locked", "3199000000")
    _write(FAKE_ROOT / "kernel/actmon_avg_activity/mc_all", "0")
    return build_ina3221_tree(FAKE_ROOT, RAILS)


def _start_service() -> Any:
    import jtop.service as service

    if platform.machine() != "aarch64" and not os.path.isdir(DMI_PATH):
        # jetson-stats reads x86 board names from DMI, which many VMs do not expose.
        service.get_hardware = lambda: {"Model": "jetfed fake AGX Orin"}
    server = service.JtopServer()
    server.start()
    return server


def _read_with_jtop() -> Dict[str, Any]:
    from jtop import jtop

    with jtop(interval=0.5) as jetson:
        uptimes: List[float] = []
        while jetson.ok() and len(uptimes) < 2:
            uptimes.append(jetson.uptime.total_seconds())
        power = jetson.power
        return {
            "rail_mw": {name: rail["power"] for name, rail in power["rail"].items()},
            "tot_mw": power["tot"]["power"],
            "uptimes": uptimes,
            "interval_s": jetson.interval,
        }


def _read_with_backend(folders: Dict[str, Path]) -> Dict[str, Any]:
    from jetfed.edge.telemetry.backends.detect import detect_backend
    from jetfed.edge.telemetry.phases import Profiler
    from jetfed.edge.telemetry.sampler import Sampler
    from tests.telemetry_trees import set_rail

    backend = detect_backend("auto")
    result: Dict[str, Any] = {"backend": backend.name}
    samples: List[Tuple[float, Dict[str, Any], Any]] = []
    deadline = time.monotonic() + 10
    while len(samples) < 2 and time.monotonic() < deadline:
        sample = backend.read()
        if sample is not None:
            samples.append((sample.t_s, sample.rails_w, sample.total_w))
        time.sleep(0.05)
    result["samples"] = samples
    with Sampler(backend, rate_hz=10) as sampler:
        profiler = Profiler("exp", "orin-fake", "lora", sampler=sampler)
        result["idle_power_w"] = profiler.measure_idle_baseline(1.6, round_index=0)
        with profiler.phase("train", round_index=1):
            time.sleep(0.3)
            set_rail(folders, "VDD_GPU_SOC", *RAISED_GPU)
            time.sleep(2.2)
        result["records"] = [record.model_dump() for record in profiler.drain()]
        result["effective_rate_hz"] = sampler.effective_rate_hz
    return result


def main() -> None:
    os.environ["JTOP_TESTING"] = "true"
    _private_mounts()
    folders = _build_fake_jetson()
    server = _start_service()
    try:
        result = {"jtop": _read_with_jtop(), "ours": _read_with_backend(folders)}
    finally:
        server.close()
        server.config_clear()
    print(json.dumps(result))


def _in_private_mount_namespace() -> bool:
    """Mounting tmpfs over /run outside a private namespace would hide the host's /run, so the
    launcher passes its own namespace in PARENT_MOUNT_NS_ENV and this must differ from it."""
    parent = os.environ.get(PARENT_MOUNT_NS_ENV)
    return bool(parent) and parent != os.readlink("/proc/self/ns/mnt")


if __name__ == "__main__":
    if os.geteuid() != 0 or shutil.which("mount") is None or not _in_private_mount_namespace():
        sys.exit("run as root inside `unshare -m --propagation private`")
    main()
