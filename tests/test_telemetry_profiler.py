"""Sampler + Profiler with the INA3221 backend on a temp tree whose values change mid-phase."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Tuple

import pytest

from jetfed.edge.telemetry.backends.ina3221 import Ina3221Backend
from jetfed.edge.telemetry.phases import Profiler
from jetfed.edge.telemetry.sampler import Sampler
from tests.telemetry_trees import build_ina3221_tree, set_rail

RAILS = {
    "VDD_GPU_SOC": (5000, 400),  # 2 W
    "VDD_CPU_CV": (5000, 200),  # 1 W
    "VIN_SYS_5V0": (5000, 800),  # 4 W
    "VDDQ_VDD2_1V8AO": (1800, 100),  # 0.18 W, inside VIN_SYS_5V0
}
IDLE_W = 7.0
RAISED_GPU = (5000, 2400)  # 12 W: module 17 W
MODULE_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")


@pytest.fixture
def orin(tmp_path: Path) -> Iterator[Tuple[Sampler, Dict[str, Path]]]:
    folders = build_ina3221_tree(tmp_path, RAILS)
    backend = Ina3221Backend(str(tmp_path))
    backend.open()
    with Sampler(backend, rate_hz=50) as sampler:
        yield sampler, folders


def test_phase_energy_per_rail_and_above_idle(orin: Tuple[Sampler, Dict[str, Path]]) -> None:
    sampler, folders = orin
    profiler = Profiler("exp", "orin-1", "lora", sampler=sampler)
    assert profiler.measure_idle_baseline(0.4) == pytest.approx(IDLE_W)
    with profiler.phase("train", round_index=1) as counters:
        counters.bytes_sent += 10
        time.sleep(0.4)
        set_rail(folders, "VDD_GPU_SOC", *RAISED_GPU)
        switched = time.perf_counter()
        time.sleep(0.6)
        raised_s = time.perf_counter() - switched
    idle, train = profiler.drain()
    assert idle.phase == "idle" and idle.energy_j == pytest.approx(IDLE_W * idle.duration_s, 0.02)
    assert train.backend == "ina3221" and train.sample_count > 10 and train.bytes_sent == 10
    assert train.idle_power_w == pytest.approx(IDLE_W)
    window_s = train.energy_by_rail_j["VDDQ_VDD2_1V8AO"] / 0.18  # a constant rail
    assert window_s == pytest.approx(train.duration_s, abs=0.05)
    assert train.energy_j == pytest.approx(
        sum(train.energy_by_rail_j[rail] for rail in MODULE_RAILS), rel=1e-9
    )
    assert train.energy_j == pytest.approx(IDLE_W * window_s + 10.0 * raised_s, abs=1.0)
    assert train.energy_above_idle_j == pytest.approx(10.0 * raised_s, abs=1.0)
    assert train.peak_power_w == pytest.approx(17.0)
    assert train.peak_power_by_rail_w["VDD_GPU_SOC"] == pytest.approx(12.0)
    assert train.mean_power_w is not None and IDLE_W < train.mean_power_w < 17.0
    assert train.peak_rss_bytes and train.peak_system_used_bytes
    assert train.sample_rate_hz is not None and train.sample_rate_hz > 10


def test_back_to_back_phases_add_up_to_the_enclosing_one(
    orin: Tuple[Sampler, Dict[str, Path]],
) -> None:
    sampler, folders = orin
    profiler = Profiler("exp", "orin-1", sampler=sampler)
    with profiler.phase("round", round_index=0):
        with profiler.phase("download", round_index=0):
            time.sleep(0.25)
        with profiler.phase("train", round_index=0):
            set_rail(folders, "VDD_CPU_CV", 5000, 1000)
            time.sleep(0.35)
    download, train, whole = profiler.drain()
    assert download.energy_j is not None and train.energy_j is not None
    assert whole.energy_j == pytest.approx(download.energy_j + train.energy_j, rel=0.02)


def test_profiler_without_sampler_reports_no_power() -> None:
    profiler = Profiler("exp", "dev")
    with profiler.phase("eval", round_index=2):
        pass
    (record,) = profiler.drain()
    assert record.energy_j is None and record.energy_by_rail_j == {}
    assert record.backend == "none" and record.peak_rss_bytes
    assert profiler.measure_idle_baseline(0.01) is None
    assert profiler.context().backend == "none"


def test_context_reports_backend_and_rates(orin: Tuple[Sampler, Dict[str, Path]]) -> None:
    sampler, _ = orin
    time.sleep(0.2)
    context = Profiler("exp", "orin-1", sampler=sampler).context()
    assert context.backend == "ina3221" and context.sample_rate_hz == pytest.approx(50.0)
    assert context.effective_sample_rate_hz is not None
    assert context.effective_sample_rate_hz > 10


def test_sampler_auto_opens_the_named_backend(tmp_path: Path) -> None:
    build_ina3221_tree(tmp_path, RAILS)
    sampler = Sampler.auto("ina3221", rate_hz=20, sysfs_root=str(tmp_path))
    try:
        time.sleep(0.2)
        assert sampler.backend_name == "ina3221" and sampler.sample_count > 0
    finally:
        sampler.stop()


def test_a_sensor_value_out_of_range_is_dropped_from_the_record_not_the_update(
    orin: Tuple[Sampler, Dict[str, Path]],
) -> None:
    """Fields are filled unchecked after a record is made; drained records must pass the
    coordinator's schema (edge/bounds.py), or the whole update carrying them would be refused."""
    sampler, _ = orin
    profiler = Profiler("exp", "dev-0")
    profiler.sampler = sampler
    with profiler.phase("train", 0) as counters:
        pass
    assert counters.record is not None
    counters.record.peak_power_w = float("inf")
    counters.record.peak_rss_bytes = 2**70
    (record,) = profiler.drain()
    assert record.peak_power_w is None and record.peak_rss_bytes is None
    assert record.energy_j is not None, "the fields in range are kept"


def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    """A child started by a big process (pytest, a fleet launcher) reports its own peak:
    ru_maxrss would carry the parent's over fork + exec (CI once saw pytest's 1.6 GB)."""
    import subprocess
    import sys

    held = bytearray(400 << 20)
    held[:: 1 << 12] = b"\x01" * len(held[:: 1 << 12])  # touch every page: resident
    child = "from jetfed.edge.telemetry.memory import peak_rss_bytes; print(peak_rss_bytes())"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert int(done.stdout) < 200 << 20, done.stderr
    del held


class _RecordingCuda:
    """Stands in for `torch.cuda` on a machine without a GPU: records what the profiler asks."""

    def __init__(self, initialized: bool) -> None:
        self.initialized = initialized
        self.calls: List[str] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def reset_peak_memory_stats(self) -> None:
        self.calls.append("reset")

    def max_memory_allocated(self) -> int:
        self.calls.append("peak")
        return 123 * 2**20


def test_a_cuda_phase_is_synchronised_at_both_boundaries_and_records_its_gpu_peak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = _RecordingCuda(initialized=True)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    profiler = Profiler("exp", "dev", memory=False)
    with profiler.phase("train", 0) as counters:
        cuda.calls.append("phase body")
    # queued GPU work ends before the clock starts and before it stops
    assert cuda.calls == ["synchronize", "reset", "phase body", "synchronize", "peak"]
    assert counters.record is not None
    assert counters.record.peak_gpu_memory_bytes == 123 * 2**20


def test_a_process_that_never_started_cuda_is_not_made_to(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _RecordingCuda(initialized=False)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    profiler = Profiler("exp", "dev", memory=False)
    with profiler.phase("train", 0) as counters:
        pass
    assert cuda.calls == []
    assert counters.record is not None and counters.record.peak_gpu_memory_bytes is None
