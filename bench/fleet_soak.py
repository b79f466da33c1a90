"""Soak: 1,000 simulated devices through one Mosquitto and through a 3-node NATS cluster.

The devices are bench/sim_device.py's (LoRA on MiniLM, a real-size 298 KB update, no training;
≤ 120 per worker process), the coordinator is the real one in its own process (FedAvg, evaluation
on 32 samples), as in bench/round_overhead.py. Per broker set-up:

- framework overhead per round: the coordinator's `RoundMetrics.overhead_s` (last update
  accepted → next task published) minus the evaluation inside it; goal ≤ 1 s at 1,000 devices
  through one Mosquitto;
- time until all devices have the task: the task's publish → the last device's receipt
  (time.monotonic is system-wide on Linux, so the processes' clocks agree);
- coordinator peak RSS (VmHWM, read from /proc: not ru_maxrss, which a child inherits) and CPU,
  broker CPU (all nodes summed for the cluster), sampled every 0.25 s from this process; CPU as
  seconds per round and as a share of one core over the rounds;
- how long the fleet took to connect.

In the cluster each device lists all three nodes, its own first (spread round-robin), and the
coordinator sits on the third, as tests/test_cluster_failover.py does. Mosquitto's open-file
limit is inherited from this process, which raises its soft limit to the hard one.

Run: python -m bench fleet_soak [--quick]   (quick: 200 devices on Mosquitto, 30 on the cluster)
"""

from __future__ import annotations

import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil

from bench.broker import private_mosquitto
from bench.round_overhead import FleetRun, per_round_overheads, run_fleet
from bench.runner import DEFAULT_DATASETS, table
from bench.stats import median
from bench.tensors import lora_spec, random_tensors
from jetfed.edge.telemetry import memory
from tests.brokers import NatsCluster

GOAL_OVERHEAD_S = 1.0
SAMPLE_S = 0.25
MOSQUITTO_FLEET_CONFIG = "max_queued_messages 100000"
"""Found here: with Mosquitto's default (1,000 queued QoS 1 messages per client) the broker
dropped the coordinator's share of 1,000 retained hellos + statuses ("Outgoing messages are
being dropped"), and the run waited for devices it never heard of; `jetfed broker-config`
writes the same line."""


def raise_open_file_limit() -> int:
    """Soft limit → hard limit for this process and the brokers and workers it starts: 1,000
    devices are 1,000 sockets in the broker alone."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Watch:
    """CPU seconds of labelled processes over time (summed per label) and their peak RSS."""

    samples: List[Tuple[float, Dict[str, float]]] = field(default_factory=list)
    peak_rss_bytes: Dict[str, int] = field(default_factory=dict)
    _processes: Dict[str, List[psutil.Process]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, label: str, pid: int) -> None:
        with self._lock:
            self._processes.setdefault(label, []).append(psutil.Process(pid))

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with self._lock:
                watched = {label: list(found) for label, found in self._processes.items()}
            row: Dict[str, float] = {}
            for label, processes in watched.items():
                total = 0.0
                for process in processes:
                    try:
                        times = process.cpu_times()
                    except psutil.Error:  # gone: its last sample stands
                        continue
                    total += times.user + times.system
                    peak = memory.peak_rss_bytes(process.pid)
                    if peak is not None:
                        self.peak_rss_bytes[label] = max(self.peak_rss_bytes.get(label, 0), peak)
                row[label] = total
            self.samples.append((time.monotonic(), row))

    def cpu_s(self, label: str, start: float, end: float) -> Optional[float]:
        """CPU seconds `label` used between two monotonic times (nearest samples)."""

        def at(moment: float) -> Optional[float]:
            before = [row[label] for t, row in self.samples if t <= moment and label in row]
            return before[-1] if before else None

        first, last = at(start), at(end)
        return None if first is None or last is None else last - first


def _task_spread_s(run: FleetRun, published: List[float]) -> List[float]:
    """Per round: the task's publish → the moment the last device had it."""
    spread = []
    for round_index, moment in enumerate(published):
        seen = [log[round_index].task_s for log in run.rounds.values() if round_index in log]
        if len(seen) == len(run.rounds):
            spread.append(max(seen) - moment)
    return spread


def measure(
    label: str,
    broker_url: str,
    broker_pids: List[int],
    devices: int,
    rounds: int,
    datasets: Path,
    blobs: List[bytes],
    device_urls: Optional[List[str]] = None,
) -> Dict[str, Any]:
    watch = Watch()
    for pid in broker_pids:
        watch.add("broker", pid)
    watch.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = run_fleet(
                broker_url,
                devices,
                rounds,
                datasets,
                blobs,
                Path(tmp),
                device_urls=device_urls,
                on_coordinator=lambda pid: watch.add("coordinator", pid),
            )
    finally:
        watch.stop()
    published = [start for name, start, _ in run.events if name == "task_published"]
    per_round = per_round_overheads(run)
    overheads = [r["overhead_excl_eval_s"] for r in per_round]
    first, last = published[0], max(end for _, _, end in run.events)
    rounds_wall_s = last - first
    usage: Dict[str, Any] = {}
    for who in ("coordinator", "broker"):
        spent = watch.cpu_s(who, first, last)
        usage[f"{who}_cpu_s_per_round"] = None if spent is None else spent / len(run.metrics)
        usage[f"{who}_cpu_share_of_a_core"] = None if spent is None else spent / rounds_wall_s
    spread = _task_spread_s(run, published)
    labels = sorted({label for r in per_round for label in r["breakdown_s"]})
    return {
        "broker": label,
        "devices": devices,
        "rounds": len(run.metrics),
        "connect_s": run.connect_s,
        "overhead_excl_eval_median_s": median(overheads),
        "overhead_excl_eval_max_s": max(overheads),
        "breakdown_median_s": {
            label: median([r["breakdown_s"].get(label, 0.0) for r in per_round]) for label in labels
        },
        "all_have_task_median_s": median(spread) if spread else None,
        "all_have_task_max_s": max(spread) if spread else None,
        "round_s_median": median([r["round_s"] for r in per_round]),
        "coordinator_peak_rss_bytes": watch.peak_rss_bytes.get("coordinator"),
        **usage,
        "per_round": per_round,
    }


def run(
    quick: bool,
    datasets: Path = DEFAULT_DATASETS,
    devices: Optional[int] = None,
    cluster_devices: Optional[int] = None,
    rounds: Optional[int] = None,
) -> Dict[str, Any]:
    from jetfed.edge.tensor_codec import encode_tensors

    open_files = raise_open_file_limit()
    devices = devices or (200 if quick else 1000)
    cluster_devices = (30 if quick else 1000) if cluster_devices is None else cluster_devices
    rounds = rounds or 3
    blobs = [encode_tensors(random_tensors(lora_spec("lora"), seed)) for seed in range(20)]
    results: Dict[str, Any] = {
        "goal_overhead_s": GOAL_OVERHEAD_S,
        "update_payload_bytes": len(blobs[0]),
        "open_file_limit": open_files,
        "runs": {},
    }
    with private_mosquitto(MOSQUITTO_FLEET_CONFIG) as broker:
        assert broker.process is not None
        mosquitto = measure(
            "mosquitto", broker.url, [broker.process.pid], devices, rounds, datasets, blobs
        )
    results["runs"]["mosquitto"] = mosquitto
    results["meets_goal"] = (
        mosquitto["devices"] >= 1000 and mosquitto["overhead_excl_eval_median_s"] <= GOAL_OVERHEAD_S
    )
    if cluster_devices:
        try:
            results["runs"]["nats-cluster"] = _through_cluster(
                cluster_devices, rounds, datasets, blobs
            )
        except RuntimeError as exc:  # what failed is the finding: kept, not lost with the rest
            results["runs"]["nats-cluster"] = {
                "broker": "nats-cluster (3 nodes)",
                "failed": str(exc),
            }
    return results


def _through_cluster(
    devices: int, rounds: int, datasets: Path, blobs: List[bytes]
) -> Dict[str, Any]:
    """Each device lists all three nodes, its own first (round-robin); the coordinator's first
    node is the third."""
    orders = [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    with tempfile.TemporaryDirectory(prefix="jetfed-soak-nats-") as tmp:
        cluster = NatsCluster(Path(tmp))
        cluster.start()
        try:
            return measure(
                "nats-cluster (3 nodes)",
                cluster.url(2, 0, 1),
                [node.process.pid for node in cluster.nodes if node.process is not None],
                devices,
                rounds,
                datasets,
                blobs,
                device_urls=[cluster.url(*orders[i % 3]) for i in range(devices)],
            )
        finally:
            cluster.stop()


def markdown(results: Dict[str, Any]) -> str:
    def mb(value: Optional[int]) -> Optional[float]:
        return None if value is None else value / 1e6

    failed = [
        f"{r['broker']}: FAILED: {r['failed']}" for r in results["runs"].values() if "failed" in r
    ]
    rows = [
        [
            r["broker"],
            r["devices"],
            r["connect_s"],
            r["overhead_excl_eval_median_s"],
            r["overhead_excl_eval_max_s"],
            r["all_have_task_median_s"],
            r["round_s_median"],
            mb(r["coordinator_peak_rss_bytes"]),
            r["coordinator_cpu_s_per_round"],
            r["coordinator_cpu_share_of_a_core"],
            r["broker_cpu_s_per_round"],
            r["broker_cpu_share_of_a_core"],
        ]
        for r in results["runs"].values()
        if "failed" not in r
    ]
    header = [
        "broker",
        "devices",
        "connect s",
        "overhead excl. eval, median s",
        "max s",
        "all have the task, median s",
        "round s",
        "coordinator peak RSS MB",
        "coordinator CPU s/round",
        "coordinator CPU (cores)",
        "broker CPU s/round",
        "broker CPU (cores)",
    ]
    return "\n".join(
        [
            f"LoRA update {results['update_payload_bytes']} B per device, no training; "
            f"open-file limit {results['open_file_limit']}.",
            "",
            table(header, rows),
            *failed,
            "",
            f"Goal: overhead ≤ {results['goal_overhead_s']:.0f} s at 1,000 devices through one "
            f"Mosquitto: {'met' if results['meets_goal'] else 'NOT met (or not measured)'}.",
        ]
    )
