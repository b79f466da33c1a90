"""Sampler overhead: CPU of the sampler thread as % of one core at 10 Hz, per-read cost, and the
slowdown of a CPU-bound step loop with the sampler on vs off.

Backends: the best one detected on this machine, and the INA3221 reader on a temporary sysfs
tree laid out like an AGX Orin. Run: python -m bench.telemetry_overhead [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict

from jetfed.edge.telemetry.backends.base import Backend
from jetfed.edge.telemetry.backends.detect import detect_backend
from jetfed.edge.telemetry.backends.ina3221 import Ina3221Backend
from jetfed.edge.telemetry.phases import Profiler
from jetfed.edge.telemetry.sampler import Sampler
from tests.telemetry_trees import build_ina3221_tree

RATE_HZ = 10.0
ORIN_RAILS = {
    "VDD_GPU_SOC": (5000, 400),
    "VDD_CPU_CV": (5000, 200),
    "VIN_SYS_5V0": (5000, 800),
    "VDDQ_VDD2_1V8AO": (1800, 100),
}


def _read_cost_us(backend: Backend, reads: int) -> float:
    start = time.perf_counter()
    for _ in range(reads):
        backend.read()
    return (time.perf_counter() - start) / reads * 1e6


def _sampler_cpu_pct(backend: Backend, seconds: float) -> Dict[str, float]:
    sampler = Sampler(backend, rate_hz=RATE_HZ).start()
    started = time.monotonic()
    time.sleep(seconds)
    elapsed_s = time.monotonic() - started
    cpu_s = sampler.thread_cpu_s
    rate = sampler.effective_rate_hz or 0.0
    sampler.stop(close_backend=False)
    return {"cpu_pct_of_one_core": 100.0 * cpu_s / elapsed_s, "effective_rate_hz": rate}


def _phase_cost_us(backend: Backend, phases: int) -> float:
    """Opening + closing one profiled phase (two boundary reads for polled backends)."""
    sampler = Sampler(backend, rate_hz=RATE_HZ)
    profiler = Profiler("bench", "bench", sampler=sampler)
    start = time.perf_counter()
    for index in range(phases):
        with profiler.phase("train", round_index=index):
            pass
    return (time.perf_counter() - start) / phases * 1e6


def _step() -> float:
    total = 0.0
    for value in range(20000):
        total += value * value
    return total


def _step_time_s(window_s: float) -> float:
    steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < window_s:
        _step()
        steps += 1
    return (time.perf_counter() - start) / steps


def _step_slowdown_pct(make_backend: Callable[[], Backend], window_s: float, repeats: int) -> float:
    """Median step time with a 10 Hz sampler running vs without, interleaved to share noise."""
    off, on = [], []
    for _ in range(repeats):
        off.append(_step_time_s(window_s))
        with Sampler(make_backend(), rate_hz=RATE_HZ):
            on.append(_step_time_s(window_s))
    off.sort()
    on.sort()
    return 100.0 * (on[len(on) // 2] / off[len(off) // 2] - 1.0)


def _measure(name: str, make_backend: Callable[[], Backend], quick: bool) -> Dict[str, Any]:
    backend = make_backend()
    try:
        result: Dict[str, Any] = {"backend": backend.name}
        result["read_us"] = _read_cost_us(backend, 200 if quick else 2000)
        result["phase_open_close_us"] = _phase_cost_us(backend, 100 if quick else 1000)
        result.update(_sampler_cpu_pct(backend, 3.0 if quick else 20.0))
    finally:
        backend.close()
    result["step_slowdown_pct"] = _step_slowdown_pct(
        make_backend, window_s=0.5 if quick else 2.0, repeats=5 if quick else 9
    )
    return {name: result}


def run(quick: bool) -> Dict[str, Any]:
    results: Dict[str, Any] = {"rate_hz": RATE_HZ, "quick": quick}
    results.update(_measure("detected", lambda: detect_backend("auto"), quick))
    with tempfile.TemporaryDirectory() as tmp:
        build_ina3221_tree(Path(tmp), ORIN_RAILS)

        def ina3221() -> Backend:
            backend = Ina3221Backend(tmp)
            backend.open()
            return backend

        results.update(_measure("ina3221_temp_tree", ina3221, quick))
    return results


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
