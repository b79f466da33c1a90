"""Backends on temporary sysfs trees laid out like the real devices, tegrastats replaying real
lines, backend detection, and the device context on a temp root and on this plain Linux box."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from jetfed.edge.errors import UserError
from jetfed.edge.telemetry.backends.detect import detect_backend
from jetfed.edge.telemetry.backends.ina3221 import Ina3221Backend, find_channels
from jetfed.edge.telemetry.backends.psutil_backend import PsutilBackend
from jetfed.edge.telemetry.backends.rapl import RaplBackend
from jetfed.edge.telemetry.backends.tegrastats import TegrastatsBackend
from jetfed.edge.telemetry.context import collect_context, parse_l4t, parse_nvpmodel
from jetfed.edge.telemetry.counters import CounterPower
from tests import tegrastats_lines
from tests.telemetry_trees import build_ina3221_tree, build_rapl_tree, set_rail, set_rapl_energy

ORIN_RAILS = {
    "VDD_GPU_SOC": (5000, 400),
    "VDD_CPU_CV": (5000, 200),
    "VIN_SYS_5V0": (5000, 800),
    "VDDQ_VDD2_1V8AO": (1800, 100),
}


def test_ina3221_finds_connected_channels_once_skipping_nc_and_shunt_sum(tmp_path: Path) -> None:
    build_ina3221_tree(tmp_path, ORIN_RAILS)
    rails = [channel.rail for channel in find_channels(str(tmp_path))]
    # Each chip is reachable via class/hwmon and bus/i2c/devices: listed once.
    assert sorted(rails) == sorted(ORIN_RAILS)


def test_ina3221_reads_watts_and_follows_changes(tmp_path: Path) -> None:
    folders = build_ina3221_tree(tmp_path, ORIN_RAILS)
    backend = Ina3221Backend(str(tmp_path))
    backend.open()
    try:
        sample = backend.read()
        assert sample is not None
        assert sample.rails_w == pytest.approx(
            {"VDD_GPU_SOC": 2.0, "VDD_CPU_CV": 1.0, "VIN_SYS_5V0": 4.0, "VDDQ_VDD2_1V8AO": 0.18}
        )
        assert sample.total_w == pytest.approx(7.0)
        assert sample.rss_bytes and sample.rss_bytes > 0
        set_rail(folders, "VDD_GPU_SOC", 5000, 2400)
        later = backend.read()
        assert later is not None and later.rails_w["VDD_GPU_SOC"] == pytest.approx(12.0)
        assert later.total_w == pytest.approx(17.0)
    finally:
        backend.close()


def test_ina3221_unavailable_without_devices(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ina3221 is unavailable"):
        detect_backend("ina3221", sysfs_root=str(tmp_path))


def test_rapl_power_across_counter_wrap_around(tmp_path: Path) -> None:
    max_uj = 262_143_328_850
    build_rapl_tree(
        tmp_path,
        {
            "intel-rapl:0": ("package-0", max_uj - 1_000_000, max_uj),
            "intel-rapl:0:0": ("core", 5_000_000, max_uj),
            "intel-rapl:0:1": ("dram", 7_000_000, max_uj),
        },
    )
    backend = RaplBackend(str(tmp_path))
    backend.open()
    first = backend.read()
    assert first is not None and first.rails_w["package-0"] is None and first.total_w is None
    set_rapl_energy(tmp_path, "intel-rapl:0", 2_000_000)  # wrapped: +3 J
    set_rapl_energy(tmp_path, "intel-rapl:0:0", 6_000_000)  # +1 J, inside the package
    set_rapl_energy(tmp_path, "intel-rapl:0:1", 7_500_000)  # +0.5 J, not in the package
    second = backend.read()
    assert second is not None
    elapsed_s = second.t_s - first.t_s
    assert second.rails_w["package-0"] * elapsed_s == pytest.approx(3.0)
    assert second.rails_w["package-0/core"] * elapsed_s == pytest.approx(1.0)
    assert second.rails_w["package-0/dram"] * elapsed_s == pytest.approx(0.5)
    assert second.total_w is not None and second.total_w * elapsed_s == pytest.approx(3.5)


def test_counter_without_known_range_reports_unknown_after_wrap() -> None:
    counter = CounterPower()
    assert counter.update(0.0, 900) is None
    assert counter.update(1.0, 100) is None
    assert counter.update(2.0, 1_000_100) == pytest.approx(1.0)


def _fake_tegrastats(tmp_path: Path) -> Path:
    """A stand-in for the binary (absent here) that prints real AGX Orin lines every 50 ms."""
    script = tmp_path / "tegrastats"
    script.write_text(
        "import sys, time\n"
        f"lines = {[tegrastats_lines.JP5_IDLE, tegrastats_lines.JP5_LOAD]!r}\n"
        + "for i in range(400):\n"
        "    print(lines[i % 2], flush=True)\n"
        "    time.sleep(0.05)\n"
    )
    return script


def test_tegrastats_backend_streams_real_lines(tmp_path: Path) -> None:
    backend = TegrastatsBackend(command=[sys.executable, str(_fake_tegrastats(tmp_path))])
    backend.open()
    try:
        assert backend.wait_first(10)
        samples = []
        while len(samples) < 2:
            sample = backend.read()
            if sample is not None:
                samples.append(sample)
        idle, load = samples
        assert idle.total_w == pytest.approx(6.831) and load.total_w == pytest.approx(22.430)
        assert idle.rails_w["VDDQ_VDD2_1V8AO"] == pytest.approx(0.301)
        assert idle.system_used_bytes == 1282 * 1024 * 1024
        assert load.t_s > idle.t_s
    finally:
        backend.close()


def test_detect_auto_prefers_ina3221_over_psutil(tmp_path: Path) -> None:
    build_ina3221_tree(tmp_path, ORIN_RAILS)
    backend = detect_backend("auto", sysfs_root=str(tmp_path), jtop_socket=str(tmp_path / "no"))
    try:
        assert backend.name == "ina3221"
    finally:
        backend.close()


def test_detect_auto_falls_back_to_psutil_with_no_power(tmp_path: Path) -> None:
    backend = detect_backend("auto", sysfs_root=str(tmp_path), jtop_socket=str(tmp_path / "no"))
    assert backend.name in ("nvml", "tegrastats", "psutil")
    if isinstance(backend, PsutilBackend):
        sample = backend.read()
        assert sample is not None and sample.total_w is None and sample.rails_w == {}
        assert sample.system_used_bytes and sample.system_used_bytes > 0
    backend.close()


def test_detect_rejects_unknown_names() -> None:
    with pytest.raises(UserError, match="telemetry backend must be"):
        detect_backend("watts")


def _jetson_root(root: Path, pinned: bool) -> Path:
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n"
    )
    for cpu in range(2):
        freq = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        freq.mkdir(parents=True)
        (freq / "scaling_cur_freq").write_text("2201600\n")
        (freq / "cpuinfo_max_freq").write_text("2201600\n")
        (freq / "scaling_min_freq").write_text("2201600\n" if pinned else "729600\n")
    gpu = root / "sys/class/devfreq/17000000.gpu"
    gpu.mkdir(parents=True)
    (gpu / "cur_freq").write_text("1300500000\n")
    nvpmodel = root / "nvpmodel"
    nvpmodel.write_text("#!/bin/sh\necho 'NV Fan Mode:quiet'\necho 'NV Power Mode: MAXN'\necho 0\n")
    nvpmodel.chmod(nvpmodel.stat().st_mode | stat.S_IEXEC)
    return nvpmodel


def test_context_on_a_jetson_tree(tmp_path: Path) -> None:
    nvpmodel = _jetson_root(tmp_path, pinned=True)
    context = collect_context(
        root=str(tmp_path),
        backend="ina3221",
        sample_rate_hz=10.0,
        effective_sample_rate_hz=9.9,
        nvpmodel_command=[str(nvpmodel), "-q"],
    )
    assert context.device_model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert context.l4t_release == "36.4.3" and context.jetpack_major == 6
    assert (context.nvpmodel_mode, context.nvpmodel_id) == ("MAXN", 0)
    assert context.jetson_clocks_active is True
    assert context.cpu_cur_freq_khz == [2201600, 2201600]
    assert context.gpu_cur_freq_hz == 1300500000
    assert context.package_versions["torch"] is not None
    assert (context.backend, context.sample_rate_hz, context.effective_sample_rate_hz) == (
        "ina3221",
        10.0,
        9.9,
    )


def test_context_jetson_clocks_off_when_min_below_max(tmp_path: Path) -> None:
    _jetson_root(tmp_path, pinned=False)
    assert collect_context(root=str(tmp_path)).jetson_clocks_active is False


def test_context_on_plain_linux_is_all_none(tmp_path: Path) -> None:
    context = collect_context(root=str(tmp_path))
    assert context.device_model is None and context.l4t_release is None
    assert context.nvpmodel_mode is None and context.jetson_clocks_active is None
    assert context.gpu_cur_freq_hz is None and context.cpu_cur_freq_khz == []
    assert collect_context().kernel_release  # the real root works too


def test_parsers_for_release_and_power_mode() -> None:
    assert parse_l4t("# R35 (release), REVISION: 5.0, GCID: 1") == "35.5.0"
    assert parse_l4t("garbage") is None
    assert parse_nvpmodel("NV Power Mode: 30W\n2\n") == ("30W", 2)


def test_nvml_backend_on_a_real_gpu() -> None:
    from jetfed.edge.telemetry.backends.base import BackendUnavailable
    from jetfed.edge.telemetry.backends.nvml import NvmlBackend

    backend = NvmlBackend()
    try:
        backend.open()
    except BackendUnavailable as exc:
        pytest.skip(f"no NVML GPU with power readings here: {exc}")
    try:
        first, second = backend.read(), backend.read()
        assert first is not None and second is not None
        assert second.gpu_memory_bytes is not None and second.gpu_memory_bytes > 0
        assert all(name.startswith("GPU") for name in second.rails_w)
    finally:
        backend.close()
