"""The coordinator's peak memory in a `full` round of SmolLM2-135M (issue 17; fp32 state 538 MB).

A private Mosquitto, 2 real edge processes (`jetfed edge run`) that fine-tune the whole model for
one local step and upload their 538 MB deltas, and the real coordinator in its own process. Its
per-round steps are wrapped so that each one's own peak RSS is known: at every step boundary
VmHWM is read and then reset (`/proc/self/clear_refs`), so each moment of the run belongs to one
segment and the run's peak is the largest segment's. Goal: peak ≤ 2 × model + 300 MB.

Run: python -m bench coordinator_memory [--quick]   (quick: 1 round, full: 2)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil
import yaml

from bench.runner import table
from jetfed.edge.telemetry.memory import peak_rss_bytes

RSS_ALLOWANCE_BYTES = 300 << 20
COORDINATOR_COMMAND = (sys.executable, "-m", "bench.coordinator_memory", "coordinator")
DEVICES = 2
STEPS = {
    "": ("_publish_task", "_collect", "_aggregate", "_evaluate_and_export", "_record"),
    "strategy": ("aggregate", "aggregate_into", "evaluate", "export"),
    "run_dir": ("save_checkpoint",),
}
"""owner attribute of the coordinator ("" itself) → the methods whose own peak is recorded."""


def _reset_peak() -> bool:
    """Start a new VmHWM (Linux ≥ 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakSegments:
    """Each step's own peak RSS: a segment ends at every step boundary, its VmHWM counts for
    every step open then (the outermost, "process", is the whole process)."""

    def __init__(self) -> None:
        self.open: List[str] = ["process"]
        self.peak_bytes: Dict[str, int] = {}
        self.rss_after_bytes: Dict[str, int] = {}
        self.resets = _reset_peak()

    def boundary(self) -> None:
        hwm = peak_rss_bytes() or 0
        for label in self.open:
            self.peak_bytes[label] = max(self.peak_bytes.get(label, 0), hwm)
        _reset_peak()

    def mark(self, label: str) -> None:
        """A point between steps: the RSS now (and the peak so far under `label`)."""
        self.open.append(label)
        self.boundary()
        self.open.pop()
        self.rss_after_bytes[label] = psutil.Process().memory_info().rss

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.boundary()
            self.open.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.boundary()
                self.open.pop()
                self.rss_after_bytes[label] = psutil.Process().memory_info().rss

        setattr(owner, attr, wrapper)


def coordinator_main(config_path: str, broker_url: str, out_path: str) -> None:
    """The coordinator process: build, run, write each step's peak (bytes) as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 - part of the baseline, as in a real coordinator

    from jetfed.coordinator.config import load_config
    from jetfed.coordinator.server import Coordinator
    from jetfed.edge.mqtt import BrokerSpec

    segments = PeakSegments()
    segments.mark("imports")
    coordinator = Coordinator(load_config(config_path), BrokerSpec(url=broker_url))
    segments.mark("build")
    for owner_name, attrs in STEPS.items():
        owner = getattr(coordinator, owner_name) if owner_name else coordinator
        for attr in attrs:
            segments.wrap(owner, attr, f"{owner_name}.{attr}" if owner_name else attr.lstrip("_"))
    coordinator.run()
    segments.mark("end")
    result = {
        "peak_bytes": segments.peak_bytes,
        "rss_after_bytes": segments.rss_after_bytes,
        "segments_reset": segments.resets,
    }
    Path(out_path).write_text(json.dumps(result))


def experiment(name: str, out: Path, rounds: int) -> Dict[str, Any]:
    """The whole SmolLM2 (30 layers), full fine-tuning, the tiniest training and evaluation."""
    from jetfed.coordinator.demo import DEMO_DATA  # SST-2 as generation

    return {
        "name": name,
        "model": {"name_or_path": "smollm2", "max_length": 64},
        "method": {"name": "full"},
        "training": {"local_steps": 1, "batch_size": 1, "learning_rate": 2e-5},
        "evaluation": {"generate_rows": 1, "max_new_tokens": 2},
        "data": {
            "path": str(DEMO_DATA),
            "partition": {"kind": "iid", "num_clients": DEVICES},
            "max_eval_samples": 2,
        },
        "rounds": {"count": rounds, "min_clients": DEVICES, "wait_for_devices_s": 600},
        "output_dir": str(out),
    }


def model_bytes() -> int:
    """SmolLM2-135M's fp32 state (every parameter, the tied embedding once)."""
    from bench.tensors import smollm2_full_spec

    return 4 * sum(math.prod(shape) for shape in smollm2_full_spec().values())


def transfer_seconds(run_dir: Any) -> Dict[str, List[float]]:
    """Each device's download (the global model) and upload (its delta, offered until the
    coordinator acknowledged it: both devices' pulled at once) per round, from their records."""
    seconds: Dict[str, List[float]] = {"download": [], "upload": []}
    for record in run_dir.read_profiles():
        if record.phase in seconds:
            seconds[record.phase].append(record.duration_s)
    return seconds


def run(quick: bool = False) -> Dict[str, Any]:
    from bench.broker import private_mosquitto
    from jetfed.coordinator.config import load_config
    from jetfed.coordinator.fleet import start_edges, stop_processes
    from jetfed.coordinator.rundir import RunDir
    from jetfed.edge.errors import UserError

    try:
        size = model_bytes()
    except UserError as exc:
        return {"skipped": str(exc)}
    rounds = 1 if quick else 2
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="jetfed-coordmem-") as folder, private_mosquitto() as (
        broker
    ):
        work = Path(folder)
        config_path = work / "experiment.yaml"
        config_path.write_text(yaml.safe_dump(experiment("coordmem", work / "runs", rounds)))
        out_path = work / "peaks.json"
        started = time.monotonic()
        coordinator = subprocess.Popen(
            [*COORDINATOR_COMMAND, str(config_path), broker.url, str(out_path)],
            env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
        )
        edges = start_edges(broker.url, load_config(str(config_path)), DEVICES, work / "logs")
        try:
            if coordinator.wait(timeout=1800) != 0:
                raise RuntimeError(f"coordinator exited with {coordinator.returncode}")
        finally:
            stop_processes([coordinator, *edges])
        wall_s = time.monotonic() - started
        peaks = json.loads(out_path.read_text())
        run_dir = RunDir(work / "runs" / "coordmem")
        metrics = run_dir.read_metrics()
        transfers = transfer_seconds(run_dir)
    limit = 2 * size + RSS_ALLOWANCE_BYTES
    peak = peaks["peak_bytes"]["process"]
    return {
        "model_bytes": size,
        "rounds": rounds,
        "devices": DEVICES,
        "peak_rss_bytes": peak,
        "rss_limit_bytes": limit,
        "rss_ok": peak <= limit,
        "step_peak_bytes": peaks["peak_bytes"],
        "rss_after_bytes": peaks["rss_after_bytes"],
        "segments_reset": peaks["segments_reset"],
        "round_s": [m.round_s for m in metrics],
        "aggregate_s": [m.aggregate_s for m in metrics],
        "statuses": [m.status for m in metrics],
        "download_s": transfers["download"],
        "upload_s": transfers["upload"],
        "wall_s": wall_s,
        "load_average_1m_start": load_start,
        "load_average_1m_end": os.getloadavg()[0],
    }


STEP_HEADER = ["step (own peak, nested steps included)", "peak MB", "RSS after MB"]


def markdown(results: Dict[str, Any]) -> str:
    if "skipped" in results:
        return f"Skipped: {results['skipped']}"
    mb = 1e6
    rows = [
        [step, peak / mb, results["rss_after_bytes"].get(step, 0) / mb or None]
        for step, peak in sorted(results["step_peak_bytes"].items(), key=lambda kv: -kv[1])
    ]
    verdict = "met" if results["rss_ok"] else "NOT met"
    return "\n".join(
        [
            f"{results['devices']} edge processes × {results['rounds']} round(s) of `full` on "
            f"SmolLM2-135M ({results['model_bytes'] / mb:.0f} MB fp32) over a private Mosquitto; "
            f"load average {results['load_average_1m_start']:.2f} at start, "
            f"{results['load_average_1m_end']:.2f} at end; rounds of "
            + ", ".join(f"{s:.0f}" for s in results["round_s"])
            + " s.",
            "",
            "Transfers of the 538 MB state, per device and round (s): downloads "
            + ", ".join(f"{s:.1f}" for s in results["download_s"])
            + "; uploads (the coordinator pulls both at once, until acknowledged) "
            + ", ".join(f"{s:.1f}" for s in results["upload_s"])
            + ".",
            "",
            f"Coordinator peak RSS (VmHWM) **{results['peak_rss_bytes'] / mb:.0f} MB**, limit "
            f"2 × model + 300 MB = {results['rss_limit_bytes'] / mb:.0f} MB: {verdict}.",
            "",
            table(STEP_HEADER, rows),
        ]
    )


def main(argv: List[str]) -> None:
    if argv[:1] == ["coordinator"]:
        coordinator_main(*argv[1:4])
    else:
        print(json.dumps(run(quick="--quick" in argv), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
