"""A real coordinator in its own process, with its per-round steps timed, for the benches that
drive it with simulated devices (round overhead, wire efficiency)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

TIMED = {
    "strategy": ("aggregate", "evaluate", "export"),
    "run_dir": ("save_checkpoint", "append_metrics", "write_profile_tables"),
    "blobs": ("offer",),
    "selection": ("select",),
}
Event = Tuple[str, float, float]
"""(step, start, end) on time.monotonic(), which is system-wide on Linux: comparable across
processes."""


def experiment_config(
    name: str,
    devices: int,
    rounds: int,
    data: Path,
    output_dir: Path,
    update_dtype: str = "fp32",
) -> Dict[str, Any]:
    """LoRA on MiniLM; 32 validation samples keep evaluation short (it is subtracted anyway)."""
    return {
        "name": name,
        "model": {"name_or_path": "minilm", "max_length": 64},
        "method": {"name": "lora"},
        "training": {"local_steps": 1, "batch_size": 16, "learning_rate": 1e-3},
        "data": {
            "path": str(data),
            "partition": {"kind": "iid", "num_clients": devices},
            "max_eval_samples": 32,
        },
        "rounds": {
            "count": rounds,
            "min_clients": devices,
            "deadline_s": 600,
            "wait_for_devices_s": 300,
        },
        "transfer": {"update_dtype": update_dtype},
        "output_dir": str(output_dir),
    }


def instrument(coordinator: Any, events: List[Event]) -> None:
    """Wrap the coordinator's per-round steps with timers (bench only; behaviour unchanged)."""

    def timed(owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                events.append((label, started, time.monotonic()))

        setattr(owner, attr, wrapper)

    for owner_name, attrs in TIMED.items():
        owner = getattr(coordinator, owner_name)
        for attr in attrs:
            if hasattr(owner, attr):
                timed(owner, attr, attr)
    publish = coordinator.link.publish
    task_topic = coordinator.topics.task

    def publish_marking_task(topic: str, payload: bytes, retain: bool = False) -> int:
        sent = publish(topic, payload, retain)
        if topic == task_topic and payload:
            now = time.monotonic()
            events.append(("task_published", now, now))
        return int(sent)

    coordinator.link.publish = publish_marking_task


def _coordinator_main(config_raw: Dict[str, Any], broker_url: str, events_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jetfed.coordinator.config import parse_config
    from jetfed.coordinator.server import Coordinator
    from jetfed.edge.mqtt import BrokerSpec

    coordinator = Coordinator(parse_config(config_raw, "bench"), BrokerSpec(url=broker_url))
    events: List[Event] = []
    instrument(coordinator, events)
    coordinator.run()
    Path(events_path).write_text(json.dumps(events))


def run_coordinator(
    config_raw: Dict[str, Any],
    broker_url: str,
    workdir: Path,
    timeout_s: float,
    failed: Optional[Callable[[], Optional[str]]] = None,
    on_started: Optional[Callable[[int], None]] = None,
) -> Tuple[List[Event], List[Dict[str, Any]]]:
    """Run the coordinator to completion; (timed events, metrics.jsonl rows). `failed()` may
    return a reason to give up early (e.g. devices got nacks); `on_started(pid)` hears the
    coordinator's process id (to watch its CPU and memory)."""
    events_path = workdir / "events.json"
    context = multiprocessing.get_context("spawn")
    child = context.Process(
        target=_coordinator_main, args=(config_raw, broker_url, str(events_path)), daemon=True
    )
    child.start()
    if on_started is not None and child.pid is not None:
        on_started(child.pid)
    deadline = time.monotonic() + timeout_s
    reason = None
    while child.is_alive() and time.monotonic() < deadline:
        child.join(timeout=1.0)
        reason = failed() if failed is not None else None
        if reason:
            break
    if child.is_alive():
        child.terminate()
        child.join()
        reason = reason or f"timed out after {timeout_s:.0f} s"
    if child.exitcode != 0 or not events_path.exists():
        raise RuntimeError(f"coordinator run failed: {reason or f'exit code {child.exitcode}'}")
    events = [(str(e[0]), float(e[1]), float(e[2])) for e in json.loads(events_path.read_text())]
    metrics_path = Path(config_raw["output_dir"]) / config_raw["name"] / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return events, metrics


def task_published_times(events: List[Event]) -> List[float]:
    return [start for label, start, _ in events if label == "task_published"]


def window_breakdown(events: List[Event], start: float, end: float) -> Dict[str, float]:
    """Seconds each timed step spent inside [start, end]."""
    spent: Dict[str, float] = {}
    for label, t0, t1 in events:
        overlap = min(t1, end) - max(t0, start)
        if overlap > 0 and label != "task_published":
            spent[label] = spent.get(label, 0.0) + overlap
    return spent
