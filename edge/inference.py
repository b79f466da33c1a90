"""On-device inference benchmark of an exported ONNX model with ONNX Runtime.

The provider is picked best first (TensorRT, CUDA, CPU) among those this onnxruntime build
offers, but what is reported is `session.get_providers()`: onnxruntime-gpu silently drops a
provider whose libraries fail to load and runs on CPU, which `get_available_providers()` hides.
Energy comes from the telemetry sampler over the timed loop only (session creation, TensorRT
engine building and warm-up are timed separately); it is None without a power sensor.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field

from jetfed.edge.errors import UserError
from jetfed.edge.telemetry.context import DeviceContext, collect_context

if TYPE_CHECKING:
    from jetfed.edge.telemetry.sampler import Sampler

PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
TOKEN_ID_RANGE = (100, 1000)
"""Synthetic token ids: inside every real vocabulary, clear of the special tokens."""
FIRST_SAMPLE_TIMEOUT_S = 3.0
TRT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jetfed", "tensorrt")
"""TensorRT engines take minutes to build on a Jetson; cached so only the first run pays."""


class BenchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_path: str
    batch_size: int = Field(default=1, ge=1)
    seq_len: int = Field(default=64, ge=1)
    iterations: int = Field(default=100, ge=1)
    warmup: int = Field(default=5, ge=0)
    min_seconds: float = Field(default=3.0, ge=0)
    providers: Optional[List[str]] = None
    threads: Optional[int] = Field(default=None, ge=1)
    telemetry: str = "auto"
    sample_rate_hz: float = Field(default=10.0, gt=0)


class BenchResult(BaseModel):
    """One benchmark: what ran where, how fast, and what it cost in energy (None = no sensor)."""

    model_config = ConfigDict(extra="forbid")

    settings: BenchSettings
    provider_used: str
    providers_active: List[str]
    providers_requested: List[str]
    providers_available: List[str]
    onnxruntime_version: str
    setup_s: float
    iterations: int
    duration_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_mean_ms: float
    throughput_per_s: float
    energy_j: Optional[float] = None
    energy_per_inference_j: Optional[float] = None
    energy_per_batch_j: Optional[float] = None
    mean_power_w: Optional[float] = None
    peak_power_w: Optional[float] = None
    peak_rss_bytes: Optional[int] = None
    telemetry_backend: str
    telemetry_samples: int
    context: DeviceContext


def resolve_providers(requested: Optional[Sequence[str]], available: Sequence[str]) -> List[str]:
    """The providers to ask for, best first: the requested ones (aliases allowed) or every
    available one in PROVIDER_PREFERENCE order. CPU is always last as the fallback."""
    if not requested:
        chosen = [name for name in PROVIDER_PREFERENCE if name in available]
    else:
        chosen = []
        for item in requested:
            name = PROVIDER_ALIASES.get(item.strip().lower(), item.strip())
            if name not in available:
                raise UserError(
                    f"--providers: {item!r} is not available in this onnxruntime build; "
                    f"available: {', '.join(available)}"
                )
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _provider_options(name: str) -> Dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": TRT_CACHE_DIR}
    return {}


def synthetic_inputs(inputs: Sequence[Any], batch_size: int, seq_len: int) -> Dict[str, Any]:
    """Token ids, an all-ones attention mask and zero token types shaped (batch, seq)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds: Dict[str, Any] = {}
    for spec in inputs:
        dtype = np.int32 if "int32" in spec.type else np.int64
        shape = (batch_size, seq_len)
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(*TOKEN_ID_RANGE, size=shape).astype(dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif "int" in spec.type:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
        else:
            raise UserError(
                f"{spec.name!r} is a {spec.type} input: only token-id models are supported"
            )
    return feeds


def open_session(settings: BenchSettings) -> Tuple[Any, List[str], List[str]]:
    """(session, requested providers, available providers)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "bench-inference needs onnxruntime (onnxruntime-gpu on a Jetson): "
            "pip install -c /etc/jetfed/constraints.txt onnxruntime"
        ) from None
    if not os.path.isfile(settings.model_path):
        raise UserError(f"MODEL {settings.model_path!r} is not a file")
    available = list(onnxruntime.get_available_providers())
    requested = resolve_providers(settings.providers, available)
    options = onnxruntime.SessionOptions()
    if settings.threads is not None:
        options.intra_op_num_threads = settings.threads
    if "TensorrtExecutionProvider" in requested:
        os.makedirs(TRT_CACHE_DIR, exist_ok=True)
    session = onnxruntime.InferenceSession(
        settings.model_path,
        sess_options=options,
        providers=[(name, _provider_options(name)) for name in requested],
    )
    return session, requested, available


def _timed_loop(session: Any, feeds: Dict[str, Any], settings: BenchSettings) -> List[float]:
    latencies_s: List[float] = []
    started_s = time.perf_counter()
    while len(latencies_s) < settings.iterations or (
        time.perf_counter() - started_s < settings.min_seconds
    ):
        before_s = time.perf_counter()
        session.run(None, feeds)
        latencies_s.append(time.perf_counter() - before_s)
    return latencies_s


def _wait_first_sample(sampler: Sampler) -> None:
    """Pushed backends (jtop) need one sample to place the window on their clock."""
    deadline_s = time.monotonic() + FIRST_SAMPLE_TIMEOUT_S
    while sampler.sample_count == 0 and time.monotonic() < deadline_s:
        time.sleep(0.05)


def _per(total: Optional[float], count: int) -> Optional[float]:
    return None if total is None or count <= 0 else total / count


def bench_inference(settings: BenchSettings, sampler: Optional[Sampler] = None) -> BenchResult:
    """Create the session, warm up, then time `iterations` runs (at least `min_seconds`)."""
    import numpy as np
    import onnxruntime

    from jetfed.edge.telemetry.sampler import Sampler

    setup_started_s = time.perf_counter()
    session, requested, available = open_session(settings)
    feeds = synthetic_inputs(session.get_inputs(), settings.batch_size, settings.seq_len)
    for _ in range(max(1, settings.warmup)):
        session.run(None, feeds)
    setup_s = time.perf_counter() - setup_started_s
    owned = sampler is None
    active = sampler or Sampler.auto(settings.telemetry, rate_hz=settings.sample_rate_hz)
    try:
        _wait_first_sample(active)
        window = active.open_window()
        loop_started_s = time.perf_counter()
        latencies_s = _timed_loop(session, feeds, settings)
        duration_s = time.perf_counter() - loop_started_s
        summary = active.close_window(window)
    finally:
        if owned:
            active.stop()
    runs = len(latencies_s)
    inferences = runs * settings.batch_size
    latencies_ms = np.asarray(latencies_s) * 1000.0
    return BenchResult(
        settings=settings,
        provider_used=session.get_providers()[0],
        providers_active=list(session.get_providers()),
        providers_requested=requested,
        providers_available=available,
        onnxruntime_version=onnxruntime.__version__,
        setup_s=setup_s,
        iterations=runs,
        duration_s=duration_s,
        latency_p50_ms=float(np.percentile(latencies_ms, 50)),
        latency_p95_ms=float(np.percentile(latencies_ms, 95)),
        latency_mean_ms=float(latencies_ms.mean()),
        throughput_per_s=inferences / duration_s if duration_s > 0 else 0.0,
        energy_j=summary.energy_j,
        energy_per_inference_j=_per(summary.energy_j, inferences),
        energy_per_batch_j=_per(summary.energy_j, runs),
        mean_power_w=summary.mean_power_w,
        peak_power_w=summary.peak_power_w,
        peak_rss_bytes=summary.peak_rss_bytes,
        telemetry_backend=active.backend_name,
        telemetry_samples=summary.sample_count,
        context=collect_context(
            backend=active.backend_name,
            sample_rate_hz=settings.sample_rate_hz,
            effective_sample_rate_hz=active.effective_rate_hz,
        ),
    )
