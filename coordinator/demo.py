"""`jetfed demo`: an embedded broker, a coordinator and N edge subprocesses on one machine.

Everything is real (MQTT broker, separate device processes, the pre-trained MiniLM, SST-2);
only the fleet is local. Defaults finish in a few minutes on 2 CPU cores, offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, List, Optional

from coordinator.config import ExperimentConfig, parse_config
from coordinator.progress import RoundTable
from coordinator.rundir import RoundMetrics

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "sst2"


def demo_config(
    name: str,
    method: str,
    clients: int,
    rounds: int,
    local_steps: int,
    data: str,
    output_dir: str,
    partition: str,
    alpha: float,
    max_eval_samples: Optional[int],
    learning_rate: Optional[float],
) -> ExperimentConfig:
    """The demo's experiment, as a user would write it in YAML (see examples/)."""
    default_lr = {"lora": 1e-3, "federa": 5e-4, "full": 2e-5}.get(method, 5e-4)
    raw: Dict[str, Any] = {
        "name": name,
        "model": {"name_or_path": "minilm", "max_length": 64},
        "method": {"name": method},
        "training": {
            "local_steps": local_steps,
            "batch_size": 16,
            "learning_rate": learning_rate or default_lr,
        },
        "data": {
            "path": data,
            "partition": {"kind": partition, "num_clients": clients, "alpha": alpha, "seed": 0},
            "max_eval_samples": max_eval_samples,
        },
        "rounds": {"count": rounds, "min_clients": clients, "wait_for_devices_s": 180},
        "output_dir": output_dir,
    }
    return parse_config(raw, "demo")


def edge_command(broker_url: str, device_id: str, experiment: str, data: str) -> List[str]:
    return [
        sys.executable,
        "-m",
        "jetfed",
        "edge",
        "run",
        "--broker",
        broker_url,
        "--device-id",
        device_id,
        "--experiment",
        experiment,
        "--data",
        data,
        "--threads",
        "1",
    ]


def start_edges(
    broker_url: str, config: ExperimentConfig, clients: int, log_dir: Path
) -> List[subprocess.Popen[bytes]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    processes = []
    for index in range(clients):
        device_id = f"demo-{index + 1:02d}"
        log = open(log_dir / f"{device_id}.log", "wb")  # noqa: SIM115 - owned by the process
        command = edge_command(broker_url, device_id, config.name, config.data.path)
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    return processes


def stop_processes(processes: List[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_demo(
    config: ExperimentConfig, clients: int, broker_url: Optional[str]
) -> List[RoundMetrics]:
    """Run the whole fleet; returns the per-round metrics (also in runs/<name>/metrics.jsonl)."""
    import torch

    from coordinator.broker import EmbeddedBroker
    from coordinator.server import Coordinator
    from edge.mqtt import BrokerSpec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with ExitStack() as stack:
        if broker_url is None:
            broker_url = stack.enter_context(EmbeddedBroker()).url
        table = stack.enter_context(RoundTable(config, clients))
        coordinator = Coordinator(config, BrokerSpec(url=broker_url), on_round=table.add)
        edges = start_edges(broker_url, config, clients, config.run_dir / "logs")
        stack.callback(stop_processes, edges)
        return coordinator.run()
    return []
