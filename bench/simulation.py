"""`jetfed simulate`'s costs: the framework's share of a simulated round, and sweep throughput.

1. *Per virtual device, no training*: every virtual device selected, trained by
   `NoTraining` (the global state decoded as the real trainer does, a zero delta uploaded, the
   train phase opened): the whole round but its evaluation is the protocol over the in-memory
   link (task, chunked download and verification, upload, validation, ack),
   aggregation, export and checkpoint. Reported per device at 10 and 100 devices and as the
   marginal cost between them.
2. *A 100-virtual-device LoRA round*: real training, one local step each; framework overhead =
   round time − the devices' train phases − evaluation.
3. *Sweep throughput*: a small MiniLM grid (2 learning rates × 2 seeds, 4 clients) on a local
   pool of 1 and of 2 processes: runs per hour and the speed-up of 2 over 1.

Each round is also measured in process CPU time (all threads, evaluation included): on a shared
machine the wall times include other processes' turns on the core, the CPU time is what the
framework itself costs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import yaml

from bench.runner import table
from jetfed.coordinator.demo import DEMO_DATA
from jetfed.edge.local_trainer import TrainingDevice
from jetfed.edge.methods.base import LocalResult
from jetfed.edge.tensorfile import TensorFile
from jetfed.edge.wire import Task


class NoTraining:
    """A `Trainer` that decodes the global state and uploads a zero delta of it."""

    def needs_init(self, task: Task) -> bool:
        return False

    def prepare(self, task: Task, blobs: Dict[str, str], device: TrainingDevice) -> Any:
        return task, dict(TensorFile(blobs["global"])), device.profiler

    def run(self, prepared: Any) -> LocalResult:
        import torch

        task, state, profiler = prepared
        with profiler.phase("train", task.round_index):
            zeros = {name: torch.zeros_like(value) for name, value in state.items()}
        return LocalResult(tensors=zeros, num_samples=1, train_loss=0.0, local_steps=1)


def experiment(name: str, out: Path, devices: int, rounds: int, layers: int) -> Dict[str, Any]:
    return {
        "name": name,
        "model": {"name_or_path": "minilm", "max_length": 32, "num_hidden_layers": layers},
        "method": {"name": "lora"},
        "training": {"local_steps": 1, "batch_size": 4, "learning_rate": 1e-3},
        "data": {
            "path": str(DEMO_DATA),
            "partition": {"kind": "iid", "num_clients": devices},
            "max_eval_samples": 8,
        },
        "rounds": {"count": rounds, "min_clients": devices, "wait_for_devices_s": 120},
        "output_dir": str(out),
    }


def train_phase_s(run_dir: Path) -> Dict[int, float]:
    from jetfed.coordinator.rundir import RunDir

    totals: Dict[int, float] = {}
    for record in RunDir(run_dir).read_profiles():
        if record.phase == "train":
            totals[record.round_index] = totals.get(record.round_index, 0.0) + record.duration_s
    return totals


def simulated_rounds(
    devices: int, rounds: int, layers: int, out: Path, trainer: Any = None
) -> Dict[str, Any]:
    """Rounds after the first (which also builds the models and connects the devices)."""
    from jetfed.coordinator.config import parse_config
    from jetfed.coordinator.simulate import simulate

    name = f"sim-{devices}-{'null' if trainer else 'lora'}"
    config = parse_config(experiment(name, out, devices, rounds, layers), "bench")
    cpu_s_at_round_end: List[float] = []
    metrics = simulate(
        config, trainer=trainer, on_round=lambda _: cpu_s_at_round_end.append(time.process_time())
    )[1:]
    cpu_s = [end - start for start, end in zip(cpu_s_at_round_end, cpu_s_at_round_end[1:])]
    train = train_phase_s(config.run_dir)
    # without training, what happens in the train phase (decode, a zero delta) is framework too
    trained = {} if trainer is not None else train
    framework = [m.round_s - m.eval_s - trained.get(m.round_index, 0.0) for m in metrics]
    return {
        "devices": devices,
        "rounds_measured": len(metrics),
        "round_s_median": statistics.median(m.round_s for m in metrics),
        "eval_s_median": statistics.median(m.eval_s for m in metrics),
        "train_s_median": statistics.median(train.get(m.round_index, 0.0) for m in metrics),
        "framework_s_median": statistics.median(framework),
        "framework_s_max": max(framework),
        "framework_ms_per_device": statistics.median(framework) / devices * 1e3,
        "round_cpu_s_median": statistics.median(cpu_s),
        "cpu_ms_per_device": statistics.median(cpu_s) / devices * 1e3,
    }


def sweep_throughput(out: Path, jobs: int, layers: int, rounds: int) -> Dict[str, Any]:
    from jetfed.coordinator.sweep import run_sweep

    raw = experiment(f"grid-{jobs}", out / "runs", 4, rounds, layers)
    raw["training"]["local_steps"] = 5
    raw["rounds"].update(min_clients=2, clients_per_round=2)
    raw["data"].update(partition={"kind": "dirichlet", "num_clients": 4, "alpha": 0.5})
    raw["data"]["max_eval_samples"] = 64
    path = out / f"grid-{jobs}.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    summary = run_sweep(
        str(path), ["training.learning_rate=5e-4,1e-3"], [0, 1], out / f"sweep-{jobs}", jobs=jobs
    )
    wall_s = time.monotonic() - started
    runs = summary["execution"]["ran"]
    return {"jobs": jobs, "runs": runs, "wall_s": wall_s, "runs_per_hour": runs / wall_s * 3600}


def run(quick: bool) -> Dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    layers = 1 if quick else 6
    results: Dict[str, Any] = {
        "load_average_1m_start": os.getloadavg()[0],
        "layers": layers,
        "cores_available": len(os.sched_getaffinity(0)),
    }
    with tempfile.TemporaryDirectory(prefix="bench-simulation-") as folder:
        out = Path(folder)
        results["no_training"] = [
            simulated_rounds(devices, 4 if quick else 6, layers, out, NoTraining())
            for devices in (10, 100)
        ]
        small, large = results["no_training"]
        results["marginal_ms_per_device"] = (
            (large["framework_s_median"] - small["framework_s_median"]) / 90 * 1e3
        )
        results["lora_100"] = simulated_rounds(100, 2 if quick else 3, layers, out)
        sweep_rounds = 2 if quick else 5
        results["sweep"] = [sweep_throughput(out, jobs, 1, sweep_rounds) for jobs in (1, 2)]
    one, two = results["sweep"]
    results["sweep_speedup_2_over_1"] = one["wall_s"] / two["wall_s"]
    results["load_average_1m_end"] = os.getloadavg()[0]
    torch.set_num_threads(threads)
    return results


def markdown(results: Dict[str, Any]) -> str:
    labelled = [("no training", r) for r in results["no_training"]]
    labelled.append(("LoRA, 1 local step", results["lora_100"]))
    rows: List[List[Any]] = [
        [
            label,
            item["devices"],
            item["rounds_measured"],
            item["round_s_median"],
            item["train_s_median"],
            item["eval_s_median"],
            item["framework_s_median"],
            item["framework_ms_per_device"],
            item["round_cpu_s_median"],
            item["cpu_ms_per_device"],
        ]
        for label, item in labelled
    ]
    header = [
        "trainer",
        "virtual devices",
        "rounds",
        "round s",
        "train s (sum)",
        "eval s",
        "framework s",
        "framework ms / device",
        "round CPU s",
        "CPU ms / device",
    ]
    sweep_rows = [[s["jobs"], s["runs"], s["wall_s"], s["runs_per_hour"]] for s in results["sweep"]]
    return "\n".join(
        [
            f"MiniLM with {results['layers']} layer(s); medians over rounds after the first. "
            f"Load average {results['load_average_1m_start']:.2f} at start, "
            f"{results['load_average_1m_end']:.2f} at end (a shared machine); "
            f"{results['cores_available']} core(s) available to the bench. Round CPU: the "
            "process's CPU time in the round, all threads, evaluation (and in the LoRA row "
            "training) included; the wall times also hold other processes' turns on the core.",
            "",
            table(header, rows),
            "",
            f"Marginal cost of one more virtual device (10 → 100, no training): "
            f"{results['marginal_ms_per_device']:.2f} ms.",
            "",
            "Sweep of 2 learning rates × 2 seeds (4 clients, 2 per round, 5 local steps, "
            f"1-layer MiniLM), local process pool on {results['cores_available']} core(s):",
            "",
            table(["processes", "runs", "wall s", "runs per hour"], sweep_rows),
            "",
            f"Speed-up of 2 processes over 1: {results['sweep_speedup_2_over_1']:.2f}×.",
        ]
    )
