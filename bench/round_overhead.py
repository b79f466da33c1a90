"""Coordinator overhead per round vs the number of devices (10, 100, 300).

A real coordinator (its own process, LoRA on MiniLM, FedAvg) runs rounds against N simulated
devices (bench/sim_device.py, ≤ 120 per worker process), all through a private Mosquitto.
Devices do no training: they fetch the task's blobs, upload a real-size LoRA update (74.5 K fp32
parameters, 298 KB), answer the pull and wait for the ack, so what is timed is the coordinator.

Measured: "last update accepted → next task published" from the coordinator's own
`RoundMetrics.overhead_s`, minus the evaluation that sits inside that window (validation on 32
samples; the goal excludes evaluation). The coordinator's methods are wrapped with timers in
its process to break the window down (aggregate, evaluate, export, checkpoint, metrics,
profile tables, device selection, offering the new state). The devices' view (last ack seen →
next task seen, minus evaluation) is reported too.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.broker import private_mosquitto
from bench.coordinator_run import (
    Event,
    experiment_config,
    run_coordinator,
    task_published_times,
    window_breakdown,
)
from bench.runner import DEFAULT_DATASETS, table
from bench.sim_device import RoundLog, SimFleetProcesses
from bench.stats import median
from bench.tensors import lora_spec, random_tensors

GOAL_S = 0.100


def _device_gap_s(rounds: Dict[str, Dict[int, RoundLog]], round_index: int) -> Optional[float]:
    """Devices' view: last ack of round r-1 seen → first task of round r seen."""
    acks = [d[round_index - 1].acked_s for d in rounds.values() if round_index - 1 in d]
    tasks = [d[round_index].task_s for d in rounds.values() if round_index in d]
    if not acks or not tasks or any(a is None for a in acks):
        return None
    return min(tasks) - max(a for a in acks if a is not None)


@dataclass
class FleetRun:
    """What one coordinator run against a simulated fleet left: its timed events, its metrics
    rows, each device's round log and how long the fleet took to connect."""

    events: List[Event]
    metrics: List[Dict[str, Any]]
    rounds: Dict[str, Dict[int, RoundLog]]
    connect_s: float


def run_fleet(
    broker_url: str,
    devices: int,
    rounds: int,
    datasets: Path,
    update_blobs: List[bytes],
    workdir: Path,
    device_urls: Optional[List[str]] = None,
    on_coordinator: Optional[Callable[[int], None]] = None,
) -> FleetRun:
    """A coordinator (its own process; `on_coordinator(pid)` once started) runs `rounds`
    rounds against `devices` simulated devices (`device_urls`: each its own broker URL list)."""
    name = f"bench-overhead-{devices}"
    raw = experiment_config(name, devices, rounds, datasets / "sst2", workdir / "runs")
    fleet = SimFleetProcesses(
        broker_url,
        name,
        [f"sim-{index:04d}" for index in range(devices)],
        [update_blobs[index % len(update_blobs)] for index in range(devices)],
        [100 + index for index in range(devices)],
        device_urls=device_urls,
    )
    started = time.monotonic()
    fleet.start(timeout_s=120 + devices * 0.5)
    connect_s = time.monotonic() - started
    try:
        events, metrics = run_coordinator(
            raw,
            broker_url,
            workdir,
            timeout_s=120 + rounds * (30 + devices * 0.5),
            failed=fleet.failed,
            on_started=on_coordinator,
        )
    finally:
        fleet.close()
    return FleetRun(events, metrics, fleet.rounds, connect_s)


def per_round_overheads(run: FleetRun) -> List[Dict[str, Any]]:
    """Rounds 1.. (round 0 has no previous update): the coordinator's overhead window, minus
    the evaluation inside it, with its breakdown and the devices' view."""
    published = task_published_times(run.events)
    per_round: List[Dict[str, Any]] = []
    for metric in run.metrics[1:]:
        round_index = metric["round_index"]
        end = published[round_index]
        start = end - metric["overhead_s"]
        breakdown = window_breakdown(run.events, start, end)
        evaluation = breakdown.get("evaluate", 0.0)
        gap = _device_gap_s(run.rounds, round_index)
        per_round.append(
            {
                "round": round_index,
                "overhead_s": metric["overhead_s"],
                "overhead_excl_eval_s": metric["overhead_s"] - evaluation,
                "device_gap_excl_eval_s": None if gap is None else gap - evaluation,
                "breakdown_s": breakdown,
                "round_s": metric["round_s"],
                "bytes_up": metric["bytes_up"],
                "bytes_down": metric["bytes_down"],
            }
        )
    return per_round


def measure(devices: int, rounds: int, datasets: Path, update_blobs: List[bytes]) -> Dict[str, Any]:
    """One coordinator run with `devices` simulated devices; per-round overheads."""
    with private_mosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
        run = run_fleet(broker.url, devices, rounds, datasets, update_blobs, Path(tmp))
    metrics, connect_s = run.metrics, run.connect_s
    per_round = per_round_overheads(run)
    values = [r["overhead_excl_eval_s"] for r in per_round]
    gaps = [
        r["device_gap_excl_eval_s"] for r in per_round if r["device_gap_excl_eval_s"] is not None
    ]
    labels = sorted({label for r in per_round for label in r["breakdown_s"]})
    return {
        "devices": devices,
        "rounds": len(metrics),
        "connect_s": connect_s,
        "overhead_excl_eval_median_s": median(values),
        "overhead_excl_eval_max_s": max(values),
        "device_gap_excl_eval_median_s": median(gaps) if gaps else None,
        "breakdown_median_s": {
            label: median([r["breakdown_s"].get(label, 0.0) for r in per_round]) for label in labels
        },
        "round_s_median": median([r["round_s"] for r in per_round]),
        "per_round": per_round,
    }


def run(
    quick: bool,
    datasets: Path = DEFAULT_DATASETS,
    device_counts: Tuple[int, ...] = (10, 100, 300),
    rounds: Optional[int] = None,
) -> Dict[str, Any]:
    spec = lora_spec("lora")
    from jetfed.edge.tensor_codec import encode_tensors

    blobs = [
        encode_tensors(random_tensors(spec, seed)) for seed in range(min(max(device_counts), 50))
    ]
    rounds = rounds or (3 if quick else 6)
    results: Dict[str, Any] = {
        "goal_s": GOAL_S,
        "method": "lora",
        "update_payload_bytes": len(blobs[0]),
        "rounds_per_run": rounds,
        "measured": "coordinator RoundMetrics.overhead_s (last update accepted → next task "
        "published) minus the evaluation inside that window",
        "runs": {},
    }
    for devices in device_counts:
        results["runs"][str(devices)] = measure(devices, rounds, datasets, blobs)
    ten = results["runs"].get("10")
    if ten is not None:
        results["meets_goal_10_devices"] = ten["overhead_excl_eval_median_s"] <= GOAL_S
    return results


def markdown(results: Dict[str, Any]) -> str:
    labels = sorted({k for r in results["runs"].values() for k in r["breakdown_median_s"]})
    rows = []
    for run_result in results["runs"].values():
        rows.append(
            [
                run_result["devices"],
                run_result["overhead_excl_eval_median_s"] * 1000,
                run_result["overhead_excl_eval_max_s"] * 1000,
                None
                if run_result["device_gap_excl_eval_median_s"] is None
                else run_result["device_gap_excl_eval_median_s"] * 1000,
                *[run_result["breakdown_median_s"].get(k, 0.0) * 1000 for k in labels],
                run_result["round_s_median"],
            ]
        )
    header = [
        "devices",
        "overhead excl. eval, median ms",
        "max ms",
        "devices' view ms",
        *[f"{k} ms" for k in labels],
        "round s",
    ]
    goal = results.get("meets_goal_10_devices")
    return "\n".join(
        [
            f"LoRA update {results['update_payload_bytes']} B per device; "
            f"{results['rounds_per_run']} rounds per run; measured: {results['measured']}.",
            "",
            table(header, rows),
            "",
            f"Goal ≤ {results['goal_s'] * 1000:.0f} ms with 10 devices: "
            f"{'met' if goal else 'NOT met' if goal is not None else 'not measured'}.",
        ]
    )
